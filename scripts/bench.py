#!/usr/bin/env python
"""What SASA costs, as ratios to the unpatched model, in one run: latency, patch time and memory.

    python scripts/bench.py [--model smol-qwen-vl] [--runtimes pytorch,onnxruntime] [--json bench.json]

A real model on a GPU machine (weights in the local Hugging Face cache or reachable on the Hub):

    python scripts/bench.py --model qwen-vl --device cuda --json bench.json

(`--device cuda` with `onnxruntime` needs the CUDA build of ONNX Runtime: `pip install .[gpu]`, then
`pip uninstall onnxruntime`; `--runtimes pytorch` skips it.)

Latency (`evaluation.latency`): prefill of a `--prompt-tokens` prompt and the mean time per decode
token over `--decode-tokens` steps (cache fed back), for the unpatched model, the patched model in
gate mode and in augment mode, in PyTorch (`torch.inference_mode`, the base class's own forward as
the baseline) and in ONNX Runtime (the decoder graphs: the unpatched one exported by the same
exporter with `probe=False`, and the gate and augment graphs). Same token ids for every variant,
`--warmup` untimed runs, median of `--repeats`.

Floors beside each ratio count decoder-layer passes over the base model's L (layers 0..L-1):
- prefill (gate): the ordinary forward plus the probe's second pass over layers s+1..L-1: 1 + (L-s-1)/L;
- prefill (augment): the original stream up to layer f and the projected stream over s+1..L-1:
  ((f+1) + (L-s-1))/L (plus (L-f-1)/L when the probe reads the unprojected logits);
- decode per token, gate: the original stream only: 1;
- decode per token, augment: `sasa_serving_streams` runs the original stream up to layer f and the
  projected stream for layers s+1..L-1, both cached: ((f+1) + (L-s-1))/L.
Work outside the layers (embedding, lm_head, projection, probe) is not counted: a measured ratio can
fall below its floor where that shared work is large (the ONNX graphs compute the logits of every
prompt position), or rise above it by the patch's per-call overhead.

Patch wall time, as `scripts/patch.py` spends it: load, patch, calibration (the forward passes of
localisation and feature extraction, then the probe fit and leave-one-source-out), then the export
(safetensors artifact, then the ONNX artifact with its parity check). The full built-in calibration
takes about 20 minutes on 2 CPU cores, so the bench calibrates on a subsample: `--calibration-prompts`
prompts of the built-in set, built the same deterministic way with the same number of prompts in
each label x form cell. The output says so; localisation image pairs are capped at 64 whatever the size.
`--layers auto` lets calibration localise (s, f), and the latency runs use what it chose; with
`--skip-patch-timing` it falls back to the default rule (two fifths of the depth, f = s + 2).

Memory: peak resident memory (VmHWM, reset between stages where the kernel allows; see
`scripts/measure_memory.py`) of load + patch + calibration + export, over the bytes of the base
checkpoint's weights; the latency stage's peak (ONNX Runtime sessions included) is reported apart.

Time, measured on the embedded smol-qwen-vl with 2 CPU cores shared with other jobs: each ONNX decoder
export takes 1.5-2.5 minutes (three of them: the artifact's gate decoder, reused for timing, then the
baseline and augment decoders); the default run took 20 minutes, 8.5 with `--threads 1`. On a busy
machine keep `--threads` below the free cores: with 2 threads on those 2 shared cores the PyTorch
timings came out bimodal and up to 10x slow, unevenly between the variants (the output warns when the
load average at the start is 1 or more).

JSON (`--json PATH`); milliseconds are medians over the repeats, ratios are patched / baseline:

    {
      "model": str, "device": "cpu" | "cuda", "dtype": str, "wall_seconds": float,
      "layers": {"num_layers": L, "safety_layer": s, "semantic_layer": f, "chosen_by": str, "probe_features": str},
      "inputs": {"batch_size", "prompt_tokens", "decode_tokens", "repeats", "warmup", "threads",
                 "statistic": "median", "token_ids": str},
      "runtimes": {                       # one entry per runtime measured
        "pytorch" | "onnxruntime": {
          "prefill" | "prefill_augment" | "decode_gate" | "decode_augment": {
            "ratio": float, "floor": float, "baseline_ms": float, "patched_ms": float,
            "baseline_samples_ms": [float], "patched_samples_ms": [float]},   # decode: per token
          "runtime": {...}                # device/dtype/threads, or providers and export seconds
        }
      },
      "patch_seconds": {"load", "patch", "localisation", "features", "calibration_forward", "fit",
                        "export_safetensors", "export_onnx", "export", "other", "total"} | null,
      "patch": {"forward_share", "calibration_prompts", "builtin_prompts", "subsample", "formats"} | null,
      "peak_rss_over_weights": float | null,
      "memory": {"weight_bytes", "baseline_rss", "peak_reset_per_stage", "patch_stage", "latency_stage",
                 "patch_stage_covers", "latency_peak_rss_over_weights", "cuda_peak_allocated_bytes"},
      "machine": {"cpu_count", "load_average_at_start"},   # 1-minute load average, before the model loads
      "versions": {"torch", "transformers", "onnxruntime"}
    }

`prefill` is gate mode (the default); `patch_seconds` and `patch` are null with `--skip-patch-timing`.

Exit code 2 and a one-line reason on bad input, before any model is loaded.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sasa_patcher.console import log, report_user_error
from sasa_patcher.errors import UserInputError
from sasa_patcher.loading import ALIASES, DEFAULT_MODEL, check_architecture, check_device, resolve_model, torch_dtype
from scripts.measure_memory import current_rss_bytes, memory_snapshot, reset_peak, weight_bytes

RUNTIMES = ("pytorch", "onnxruntime")
BUILTIN_CELLS = 4  # the built-in set's harmful/benign x imperative/question cells
MIN_CALIBRATION_PROMPTS = 32  # below this the held-out split can miss a class
GIB = 2**30


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"alias ({', '.join(ALIASES)}), embedded model (smol-qwen-vl, smol-llava), "
                             f"local directory or Hub id (default: {DEFAULT_MODEL})")
    parser.add_argument("--layers", default="auto",
                        help="'s,f', or 'auto' (default): localised by the timed calibration, else the default rule")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES),
                        help="comma-separated subset of pytorch, onnxruntime (default: both). onnxruntime exports "
                             "the baseline, gate and augment decoders, 1.5-2.5 min each for smol-qwen-vl on 2 cores")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="prefill length (default: 256)")
    parser.add_argument("--decode-tokens", type=int, default=32, help="decode steps per run (default: 32)")
    parser.add_argument("--batch-size", type=int, default=1, help="rows per run (default: 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported (default: 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: 1)")
    parser.add_argument("--threads", type=int, help="torch and ONNX Runtime intra-op threads (default: all cores)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", default="float32",
                        help="float32 (default: the ONNX graphs are float32, so both runtimes compare like with "
                             "like), bfloat16 or float16 with --runtimes pytorch")
    parser.add_argument("--calibration-prompts", type=int, default=64,
                        help="size of the deterministic, label- and form-balanced subsample of the built-in "
                             "calibration prompts the patch timing calibrates on; a multiple of 4 (default: 64)")
    parser.add_argument("--skip-patch-timing", action="store_true",
                        help="no calibration and no artifact export: latency and memory of load + patch only")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every figure as JSON here")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="also write the report as markdown here")
    return parser


# ----- options --------------------------------------------------------------------------------------
def parse_runtimes(text: str) -> list[str]:
    runtimes = [part.strip() for part in text.split(",") if part.strip()]
    if not runtimes or any(part not in RUNTIMES for part in runtimes):
        raise UserInputError(f"--runtimes takes a comma-separated subset of {', '.join(RUNTIMES)}, got {text!r}")
    return [name for name in RUNTIMES if name in runtimes]


def check_options(args: argparse.Namespace) -> list[str]:
    """Everything that can be checked before the model is touched; returns the runtimes."""
    runtimes = parse_runtimes(args.runtimes)
    for name, value, least in (("--prompt-tokens", args.prompt_tokens, 1), ("--decode-tokens", args.decode_tokens, 1),
                               ("--batch-size", args.batch_size, 1), ("--repeats", args.repeats, 1),
                               ("--warmup", args.warmup, 0), ("--threads", args.threads, 1)):
        if value is not None and value < least:
            raise UserInputError(f"{name} must be at least {least}, got {value}")
    count = args.calibration_prompts
    limit = builtin_prompt_count()
    if not args.skip_patch_timing and (count % BUILTIN_CELLS or not MIN_CALIBRATION_PROMPTS <= count <= limit):
        raise UserInputError(f"--calibration-prompts must be a multiple of {BUILTIN_CELLS} between "
                             f"{MIN_CALIBRATION_PROMPTS} and {limit}, got {count}")
    check_device(args.device)
    dtype = torch_dtype(args.dtype, args.device)
    if "onnxruntime" in runtimes:
        from sasa_patcher.evaluation.latency import onnxruntime_providers

        if dtype != torch.float32:
            raise UserInputError(f"the ONNX graphs are float32: --dtype {args.dtype} needs --runtimes pytorch")
        onnxruntime_providers(args.device)
    if args.json is not None and not args.json.parent.is_dir():
        raise UserInputError(f"--json {args.json}: the directory {args.json.parent} does not exist")
    return runtimes


def check_model(args: argparse.Namespace) -> tuple[Path, int]:
    """The model directory and its layer count; fixed layers and the run's length checked against it."""
    from transformers import AutoConfig

    from sasa_patcher.modeling_sasa import SasaSettings
    from sasa_patcher.patching import parse_layers

    directory = resolve_model(args.model)
    check_architecture(directory)
    text_config = AutoConfig.from_pretrained(directory).get_text_config()
    if args.layers != "auto":
        try:
            SasaSettings(*parse_layers(args.layers)).validate(text_config.num_hidden_layers)
        except ValueError as error:
            raise UserInputError(f"--layers: {error}") from None
    length = args.prompt_tokens + args.decode_tokens
    if length > text_config.max_position_embeddings:
        raise UserInputError(f"--prompt-tokens + --decode-tokens = {length} exceeds the model's "
                             f"{text_config.max_position_embeddings} positions")
    return directory, text_config.num_hidden_layers


def builtin_prompt_count() -> int:
    """Size of the full built-in calibration set: four cells of its default prompts per cell."""
    from sasa_patcher.probes.datasets import builtin_calibration_set

    return BUILTIN_CELLS * inspect.signature(builtin_calibration_set).parameters["per_cell"].default


def calibration_subsample(count: int) -> list:
    """The built-in set built with count/4 prompts per label x form cell: deterministic and balanced."""
    from sasa_patcher.probes.datasets import builtin_calibration_set

    return builtin_calibration_set(per_cell=count // BUILTIN_CELLS)


# ----- the patch, timed -----------------------------------------------------------------------------
@dataclass
class PatchStage:
    """The patched model, the processor and what patching it cost (seconds per part)."""

    model: object
    processor: object
    source: Path
    layers_chosen_by: str
    seconds: dict
    details: dict | None = None
    gate_decoder: Path | None = None  # the artifact's own decoder graph, reused for ONNX Runtime timing


def load_and_patch(args: argparse.Namespace, num_layers: int) -> PatchStage:
    """Load as the CLI does and patch with the given layers (or the default rule until calibration)."""
    from sasa_patcher.loading import load_model
    from sasa_patcher.modeling_sasa import SasaSettings
    from sasa_patcher.patching import default_layers, parse_layers, patch_model

    started = time.perf_counter()
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    seconds = {"load": time.perf_counter() - started}
    started = time.perf_counter()
    settings = SasaSettings(*(default_layers(num_layers) if args.layers == "auto" else parse_layers(args.layers)))
    model = patch_model(loaded.model, settings, loaded.processor.tokenizer)
    seconds["patch"] = time.perf_counter() - started
    chosen_by = "user" if args.layers != "auto" else "default rule"
    log(f"loaded in {seconds['load']:.1f}s, patched in {seconds['patch']:.2f}s (s={settings.safety_layer}, "
        f"f={settings.semantic_layer}, {chosen_by})")
    return PatchStage(model, loaded.processor, loaded.source, chosen_by, seconds)


def calibrate_and_export(args: argparse.Namespace, stage: PatchStage, prompts: list, artifact: Path) -> None:
    """The rest of `scripts/patch.py`'s work on `stage.model`, timed part by part into `stage`."""
    from sasa_patcher.evaluation.latency import on_cpu
    from sasa_patcher.export.checkpoint import write_safetensors_artifact
    from sasa_patcher.export.model_card import CardInfo
    from sasa_patcher.probes.calibrate import calibrate

    seconds = stage.seconds
    model, processor = stage.model, stage.processor
    full = builtin_prompt_count()
    log(f"calibrating on a subsample of {len(prompts)} of the {full} built-in prompts")
    layers = "auto" if args.layers == "auto" else (model.sasa.safety_layer, model.sasa.semantic_layer)
    report = calibrate(model, processor, prompts, layers=layers)
    timings = report.timings
    seconds["localisation"] = timings.get("localisation_s", 0.0)
    seconds["features"] = timings["features_s"]
    seconds["calibration_forward"] = seconds["localisation"] + seconds["features"]
    seconds["fit"] = timings["fit_s"] + timings["loso_s"]
    if args.layers == "auto":
        stage.layers_chosen_by = "calibration"
    log(f"calibrated in {timings['total_s']:.1f}s: s={report.layers[0]}, f={report.layers[1]}, "
        f"probe on {report.feature}")

    started = time.perf_counter()
    write_safetensors_artifact(model, processor, stage.source, artifact, card_info=CardInfo(base_model=args.model))
    seconds["export_safetensors"] = time.perf_counter() - started
    formats = ["safetensors"]
    if model.dtype == torch.float32:
        from sasa_patcher.export.onnx_export import export_onnx
        from sasa_patcher.export.onnx_names import DECODER_FILE

        started = time.perf_counter()
        with on_cpu(model):
            export_onnx(model, processor, artifact / "onnx", log=log)
        seconds["export_onnx"] = time.perf_counter() - started
        stage.gate_decoder = artifact / "onnx" / DECODER_FILE
        formats.append("onnx")
    seconds["export"] = seconds["export_safetensors"] + seconds.get("export_onnx", 0.0)
    stage.details = {"calibration_prompts": len(prompts), "builtin_prompts": full, "subsample": len(prompts) < full,
                     "formats": formats}


def finish_patch_seconds(stage: PatchStage, started: float) -> None:
    """Total wall time of the patch, what the named parts leave over, and the forward passes' share."""
    seconds = stage.seconds
    seconds["total"] = time.perf_counter() - started
    named = ("load", "patch", "calibration_forward", "fit", "export")
    seconds["other"] = seconds["total"] - sum(seconds[name] for name in named)
    stage.details["forward_share"] = seconds["calibration_forward"] / seconds["total"]


# ----- the run --------------------------------------------------------------------------------------
def measure_latency(args: argparse.Namespace, runtimes: list[str], stage: PatchStage, work_dir: Path) -> dict:
    from sasa_patcher.evaluation.latency import bench_onnxruntime, bench_pytorch, bench_token_ids

    model = stage.model
    ids = bench_token_ids(model.config, args.batch_size, args.prompt_tokens, args.decode_tokens)
    results = {}
    if "pytorch" in runtimes:
        log("timing PyTorch (baseline, gate, augment interleaved)")
        results["pytorch"] = bench_pytorch(model, ids, args.prompt_tokens, repeats=args.repeats, warmup=args.warmup,
                                           progress=True)
    if "onnxruntime" in runtimes:
        log("exporting and timing the ONNX decoders (baseline, gate, augment)")
        reuse = {"gate": stage.gate_decoder} if stage.gate_decoder is not None else None
        results["onnxruntime"] = bench_onnxruntime(model, ids, args.prompt_tokens, work_dir, device=args.device,
                                                   threads=args.threads, repeats=args.repeats, warmup=args.warmup,
                                                   reuse=reuse, progress=True, log=log)
    return results


def memory_report(weights: int | None, baseline: int, resettable: bool, patch_stage: dict, latency_stage: dict,
                  covers: str) -> tuple[float | None, dict]:
    def over_weights(value: int) -> float | None:
        return value / weights if weights else None

    memory = {"weight_bytes": weights, "baseline_rss": baseline, "peak_reset_per_stage": resettable,
              "patch_stage": patch_stage, "latency_stage": latency_stage, "patch_stage_covers": covers,
              "latency_peak_rss_over_weights": over_weights(latency_stage["peak_rss"]),
              "cuda_peak_allocated_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}
    return over_weights(patch_stage["peak_rss"]), memory


def run(args: argparse.Namespace) -> dict:
    runtimes = check_options(args)
    directory, num_layers = check_model(args)
    prompts = None if args.skip_patch_timing else calibration_subsample(args.calibration_prompts)
    weights = weight_bytes(directory)

    import onnxruntime
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    wall = time.perf_counter()
    resettable = reset_peak()
    baseline = current_rss_bytes()
    with tempfile.TemporaryDirectory(prefix="sasa-bench-") as scratch:
        started = time.perf_counter()
        stage = load_and_patch(args, num_layers)
        if prompts is not None:
            calibrate_and_export(args, stage, prompts, Path(scratch) / "artifact")
            finish_patch_seconds(stage, started)
        patch_memory = memory_snapshot()
        reset_peak()
        results = measure_latency(args, runtimes, stage, Path(scratch))
        latency_memory = memory_snapshot()
    covers = "load, patch"
    if prompts is not None:
        covers += f", calibration, {' and '.join(stage.details['formats'])} export"
    peak_over_weights, memory = memory_report(weights, baseline, resettable, patch_memory, latency_memory, covers)
    settings = stage.model.sasa
    return {
        "model": args.model,
        "device": args.device,
        "dtype": str(stage.model.dtype).removeprefix("torch."),
        "wall_seconds": time.perf_counter() - wall,
        "layers": {"num_layers": num_layers, "safety_layer": settings.safety_layer,
                   "semantic_layer": settings.semantic_layer, "chosen_by": stage.layers_chosen_by,
                   "probe_features": settings.probe_features},
        "inputs": {"batch_size": args.batch_size, "prompt_tokens": args.prompt_tokens,
                   "decode_tokens": args.decode_tokens, "repeats": args.repeats, "warmup": args.warmup,
                   "threads": args.threads or torch.get_num_threads(), "statistic": "median",
                   "token_ids": "seeded random text ids (no image placeholders), the same for every variant"},
        "runtimes": results,
        "patch_seconds": stage.seconds if prompts is not None else None,
        "patch": stage.details,
        "peak_rss_over_weights": peak_over_weights,
        "memory": memory,
        "machine": {"cpu_count": os.cpu_count(), "load_average_at_start": load_average},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "onnxruntime": onnxruntime.__version__},
    }


# ----- printing -------------------------------------------------------------------------------------
MEASURE_LABELS = {"prefill": "prefill, gate", "prefill_augment": "prefill, augment",
                  "decode_gate": "decode per token, gate", "decode_augment": "decode per token, augment"}


def format_table(rows: list[list[str]]) -> list[str]:
    """Left-aligned first column, right-aligned others, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width)
                      in enumerate(zip(row, widths, strict=True))).rstrip() for row in rows]


def markdown_table(rows: list[list[str]]) -> list[str]:
    """The same rows as a GitHub markdown table (first row the header)."""
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    return [lines[0], "| " + " | ".join("---" for _ in rows[0]) + " |", *lines[1:]]


def latency_lines(report: dict) -> list[str]:
    return format_table(latency_rows(report))


def latency_rows(report: dict) -> list[list[str]]:
    runtimes = report["runtimes"]
    header = ["measure", "floor"]
    for name, result in runtimes.items():
        providers = result["runtime"].get("providers")
        label = f"ort {providers[0].removesuffix('ExecutionProvider')}" if providers else name
        header += [f"{label} base ms", "patched ms", "ratio"]
    rows = [header]
    for measure, label in MEASURE_LABELS.items():
        row = [label, f"{next(iter(runtimes.values()))[measure]['floor']:.3f}"]
        for result in runtimes.values():
            entry = result[measure]
            row += [f"{entry['baseline_ms']:.1f}", f"{entry['patched_ms']:.1f}", f"{entry['ratio']:.3f}"]
        rows.append(row)
    return rows


def patch_lines(report: dict) -> list[str]:
    seconds, details = report["patch_seconds"], report["patch"]
    if seconds is None:
        return ["patch wall time: not measured (--skip-patch-timing)"]
    sample = (f"a {details['calibration_prompts']}-prompt subsample of the {details['builtin_prompts']} built-in "
              "prompts" if details["subsample"] else f"all {details['builtin_prompts']} built-in prompts")
    parts = [
        ("load", "load", ""),
        ("patch (class swap, fixed modules)", "patch", ""),
        ("calibration forward passes", "calibration_forward",
         f"localisation {seconds['localisation']:.1f} s, features {seconds['features']:.1f} s"),
        ("probe fit (+ leave-one-source-out)", "fit", ""),
        ("export", "export", ", ".join(f"{name} {seconds['export_' + name]:.1f} s" for name in details["formats"])),
        ("other", "other", ""),
        ("total", "total", f"forward passes {100 * details['forward_share']:.0f}% of it"),
    ]
    return [f"patch wall time (calibrated on {sample}):"] + [
        f"  {label:<36}{seconds[key]:>8.1f} s  {note}".rstrip() for label, key, note in parts]


def memory_line(report: dict) -> str:
    memory = report["memory"]
    peak = memory["patch_stage"]["peak_rss"]
    ratio = report["peak_rss_over_weights"]
    weights = f"{ratio:.2f} x the weights ({memory['weight_bytes'] / GIB:.2f} GiB)" if ratio else "no weight size"
    return f"memory: peak RSS {peak / GIB:.2f} GiB over {memory['patch_stage_covers']} = {weights}"


RATIO_NOTE = "ratio = patched / unpatched; floor = decoder-layer passes over L (work outside the layers not counted)"


def heading_lines(report: dict) -> list[str]:
    layers, inputs = report["layers"], report["inputs"]
    return [
        f"SASA bench: {report['model']} on {report['device']} ({report['dtype']}), L={layers['num_layers']}, "
        f"s={layers['safety_layer']}, f={layers['semantic_layer']} ({layers['chosen_by']}), "
        f"probe on {layers['probe_features']}",
        f"batch {inputs['batch_size']}, prompt {inputs['prompt_tokens']} tokens, decode {inputs['decode_tokens']} "
        f"tokens; median of {inputs['repeats']} runs after {inputs['warmup']} warm-up; threads: {inputs['threads']}",
    ]


def closing_lines(report: dict) -> list[str]:
    return [*patch_lines(report), memory_line(report), f"wall time of this run: {report['wall_seconds']:.0f} s",
            *contention_note(report)]


def format_report(report: dict) -> str:
    lines = [*heading_lines(report), "", *latency_lines(report), RATIO_NOTE, "", *closing_lines(report)]
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    """The same report for a README: the latency table as markdown, the rest verbatim."""
    heading = heading_lines(report)
    lines = [f"**{heading[0]}**", "", heading[1], "", *markdown_table(latency_rows(report)), "", RATIO_NOTE, "",
             "```text", *closing_lines(report), "```"]
    return "\n".join(lines) + "\n"


def contention_note(report: dict) -> list[str]:
    """A warning when other processes were using the CPU as the run started.

    Measured on a 2-core machine shared with other jobs: with as many threads as cores, PyTorch
    timings were distorted up to 10x, unevenly between the variants; with one thread they were not.
    """
    load, cores = report["machine"]["load_average_at_start"], report["machine"]["cpu_count"]
    if load is None or load < 1:
        return []
    return [f"note: load average {load:.1f} on {cores} cores at the start: other processes compete for the CPU, so "
            "timings are noisy, and with as many threads as cores they can be distorted many-fold; use an idle "
            "machine, or --threads below the number of free cores"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # exporter chatter; stdout carries the table only
            report = run(args)
    except UserInputError as error:
        return report_user_error(error)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown is not None:
        args.markdown.write_text(format_markdown(report))
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

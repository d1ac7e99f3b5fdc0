"""One bench run: the user's patch path timed stage by stage, then latency and memory against the base model.

Why through the pipeline: the patch timing must be what `scripts/patch.py` spends, so the bench
builds `PatchOptions` and calls `run_patch` (same loading, calibration record, model card and
exports) on an evenly strided subsample of the built-in calibration set. The latency
harness (`evaluation.latency`) then times the patched model it returns. Input is checked before any
model is loaded (`UserInputError`, exit code 2).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from sasa_patcher.console import log
from sasa_patcher.errors import UserInputError
from sasa_patcher.loading import check_device, torch_dtype
from sasa_patcher.memory import current_rss_bytes, memory_snapshot, reset_peak, weight_bytes
from sasa_patcher.pipeline import PatchOptions, PatchResult, StageClock, load_and_patch, resolve, run_patch

RUNTIMES = ("pytorch", "onnxruntime")
MIN_CALIBRATION_PROMPTS = 32  # below this the held-out split can miss a class


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
    if not args.skip_patch_timing and count < MIN_CALIBRATION_PROMPTS:
        raise UserInputError(f"--calibration-prompts must be at least {MIN_CALIBRATION_PROMPTS}, got {count}")
    check_device(args.device)
    dtype = torch_dtype(args.dtype, args.device)
    if not args.skip_patch_timing:  # the pipeline's own checks, before a shape-true model is built (minutes)
        patch_options(args, Path(tempfile.gettempdir()) / "sasa-bench-unwritten", []).validate()
    if "onnxruntime" in runtimes:
        from sasa_patcher.evaluation.latency import onnxruntime_providers

        if dtype != torch.float32:
            raise UserInputError(f"the ONNX graphs are float32: --dtype {args.dtype} needs --runtimes pytorch")
        onnxruntime_providers(args.device)
    if args.json is not None and not args.json.parent.is_dir():
        raise UserInputError(f"--json {args.json}: the directory {args.json.parent} does not exist")
    return runtimes


def patch_options(args: argparse.Namespace, out: Path, prompts: list | None) -> PatchOptions:
    """The options `scripts/patch.py` would get for this model, on the subsample; ONNX only where it is float32."""
    onnx = torch_dtype(args.dtype, args.device) == torch.float32
    return PatchOptions(out=out, model=args.model, layers=args.layers, calibration="builtin subsample",
                        calibration_prompts=prompts, formats=("safetensors", "onnx") if onnx else ("safetensors",),
                        dtype=args.dtype, device=args.device, force=True,
                        allow_random_calibration=args.allow_random_calibration, semantic_pairs=args.semantic_pairs)


def check_model(args: argparse.Namespace) -> tuple[Path, int]:
    """The model directory (resolved once) and its layer count; fixed layers and the run's length checked."""
    from transformers import AutoConfig

    from sasa_patcher.pipeline import initial_settings

    options = patch_options(args, Path("unused"), None)
    directory, num_layers = resolve(options)
    if args.layers != "auto":
        initial_settings(options, num_layers)
    positions = AutoConfig.from_pretrained(directory).get_text_config().max_position_embeddings
    length = args.prompt_tokens + args.decode_tokens
    if length > positions:
        raise UserInputError(f"--prompt-tokens + --decode-tokens = {length} exceeds the model's {positions} positions")
    return directory, num_layers


def calibration_subsample(count: int) -> tuple[list, int]:
    """An evenly strided `count` of what `--calibration builtin` calibrates on (all of it when `count` is not
    smaller), and the full set's size. Why strided: the set is its parts end to end (the balanced core, real
    traffic, image prompts), so every part, image prompts included (the costly forward passes), keeps its
    share within one prompt. Deterministic."""
    from sasa_patcher.probes.calibration_set import default_calibration_set

    prompts = default_calibration_set()
    if count >= len(prompts):
        return prompts, len(prompts)
    step = len(prompts) / count
    return [prompts[int(index * step)] for index in range(count)], len(prompts)


# ----- the patch, as users run it ---------------------------------------------------------------------
def patch_seconds(result: PatchResult) -> dict[str, float]:
    """The pipeline's stage seconds in the bench's parts; `other` is what the named parts leave over."""
    seconds = result.seconds
    parts = {"load": seconds["load"], "patch": seconds["patch"], "localisation": seconds["localisation"],
             "features": seconds["features"]}
    parts["calibration_forward"] = parts["localisation"] + parts["features"]
    parts["forward_passes"] = seconds["forward_passes"]  # the part of those passes inside the model's calls
    parts["calibrate"] = seconds["calibrate"]
    parts["fit"] = seconds["fit"]
    for name in ("export_safetensors", "export_onnx"):
        if name in seconds:
            parts[name] = seconds[name]
    parts["export"] = parts["export_safetensors"] + parts.get("export_onnx", 0.0)
    parts["total"] = seconds["total"]
    named = ("load", "patch", "calibration_forward", "fit", "export")
    parts["other"] = parts["total"] - sum(parts[name] for name in named)
    return parts


def patch_memory(result: PatchResult) -> dict[str, int]:
    """One snapshot over all the pipeline's stages: the highest peak, and what is resident after the last."""
    last = list(result.memory.values())[-1]
    return {**last, "peak_rss": max(snapshot["peak_rss"] for snapshot in result.memory.values())}


# ----- the run --------------------------------------------------------------------------------------
def measure_latency(args: argparse.Namespace, runtimes: list[str], model, gate_decoder: Path | None,
                    work_dir: Path) -> dict:
    from sasa_patcher.evaluation.latency import bench_onnxruntime, bench_pytorch, bench_token_ids

    ids = bench_token_ids(model.config, args.batch_size, args.prompt_tokens, args.decode_tokens)
    results = {}
    if "pytorch" in runtimes:
        log("timing PyTorch (baseline, gate, augment interleaved)")
        results["pytorch"] = bench_pytorch(model, ids, args.prompt_tokens, repeats=args.repeats, warmup=args.warmup,
                                           progress=True)
    if "onnxruntime" in runtimes:
        log("exporting and timing the ONNX decoders (baseline, gate, augment in rounds, one session at a time)")
        reuse = {"gate": gate_decoder} if gate_decoder is not None else None
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
    """Every figure of the bench report (see `sasa_patcher.cli.bench` for the JSON layout)."""
    runtimes = check_options(args)
    directory, num_layers = check_model(args)
    prompts, full = (None, None) if args.skip_patch_timing else calibration_subsample(args.calibration_prompts)
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
        options = patch_options(args, Path(scratch) / "artifact", prompts)
        if prompts is None:
            result = load_and_patch(options, directory, num_layers, StageClock(), log)
        else:
            log(f"patching as scripts/patch.py does, calibrated on a subsample of {len(prompts)} of the {full} "
                "built-in prompts")
            result = run_patch(options, log=log, resolved=(directory, num_layers))
        patch_stage = patch_memory(result)
        reset_peak()
        model = result.model.to(args.device)  # the ONNX export leaves a GPU model on the CPU
        gate_decoder = None
        if "onnx" in result.artifacts:
            from sasa_patcher.export.onnx_names import DECODER_FILE

            gate_decoder = result.artifacts["onnx"] / DECODER_FILE
        results = measure_latency(args, runtimes, model, gate_decoder, Path(scratch))
        latency_stage = memory_snapshot()
    details = None
    seconds = None
    covers = "load, patch"
    if prompts is not None:
        seconds = patch_seconds(result)
        formats = [name for name in ("safetensors", "onnx") if name in result.artifacts]
        details = {"calibration_prompts": len(prompts), "builtin_prompts": full, "subsample": len(prompts) < full,
                   "formats": formats, "forward_share": seconds["forward_passes"] / seconds["total"],
                   "calibration_over_forward": seconds["calibrate"] / max(seconds["forward_passes"], 1e-9)}
        covers += f", calibration, {' and '.join(formats)} export"
    peak_over_weights, memory = memory_report(weights, baseline, resettable, patch_stage, latency_stage, covers)
    settings = model.sasa
    return {
        "model": args.model,
        "device": args.device,
        "dtype": str(model.dtype).removeprefix("torch."),
        "wall_seconds": time.perf_counter() - wall,
        "layers": {"num_layers": num_layers, "safety_layer": settings.safety_layer,
                   "semantic_layer": settings.semantic_layer, "chosen_by": result.layers_chosen_by,
                   "probe_features": settings.probe_features},
        "inputs": {"batch_size": args.batch_size, "prompt_tokens": args.prompt_tokens,
                   "decode_tokens": args.decode_tokens, "repeats": args.repeats, "warmup": args.warmup,
                   "threads": args.threads or torch.get_num_threads(), "statistic": "median",
                   "token_ids": "seeded random text ids (no image placeholders), the same for every variant"},
        "runtimes": results,
        "patch_seconds": seconds,
        "patch": details,
        "peak_rss_over_weights": peak_over_weights,
        "memory": memory,
        "machine": {"cpu_count": os.cpu_count(), "load_average_at_start": load_average},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "onnxruntime": onnxruntime.__version__},
    }

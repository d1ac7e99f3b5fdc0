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

Patch wall time, as `scripts/patch.py` spends it (the bench runs the same pipeline,
`sasa_patcher.pipeline`, with its calibration record and model card): load, patch, calibration (the
forward passes of localisation and feature extraction, then the probe fit and leave-one-source-out),
then the export (safetensors artifact, then the ONNX artifact with its parity check). The full built-in calibration
takes about 20 minutes on 2 CPU cores, so the bench calibrates on a subsample: `--calibration-prompts`
prompts of the built-in set, evenly strided so that each of its parts (balanced core, real traffic, image
prompts) keeps its share. The output says so; localisation image pairs are capped at 64 whatever the size.
`--layers auto` lets calibration localise (s, f), and the latency runs use what it chose; with
`--skip-patch-timing` it falls back to the default rule (two fifths of the depth, f = s + 2).

Memory: peak resident memory (VmHWM, reset between stages where the kernel allows; see
`sasa_patcher.memory`) of load + patch + calibration + export, over the bytes of the base
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
      "patch_seconds": {"load", "patch", "localisation", "features", "calibration_forward", "forward_passes",
                        "calibrate", "fit", "export_safetensors", "export_onnx", "export", "other", "total"} | null,
      "patch": {"forward_share", "calibration_over_forward", "calibration_prompts", "builtin_prompts",
                "subsample", "formats"} | null,   # forward_passes: seconds inside the model's own calls
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
import json
import sys
from pathlib import Path

from sasa_patcher.console import report_user_error
from sasa_patcher.errors import UserInputError
from sasa_patcher.evaluation.bench import RUNTIMES, run
from sasa_patcher.evaluation.bench_report import format_markdown, format_report
from sasa_patcher.loading import ALIASES, DEFAULT_MODEL
from sasa_patcher.pipeline import PatchOptions


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
                        help="size of the deterministic subsample of the built-in calibration prompts the patch "
                             "timing calibrates on, each part of the set in its share (default: 64)")
    parser.add_argument("--semantic-pairs", type=int, default=PatchOptions.semantic_pairs,
                        help="typographic image/text pairs of the calibration's semantic curve, as sasa-patch "
                             f"(default {PatchOptions.semantic_pairs}; at 2B on a CPU each pair costs ~25 s)")
    parser.add_argument("--allow-random-calibration", action="store_true",
                        help="time the calibration of a shape-true model anyway (random weights: its probe means "
                             "nothing, only the patch-time split does)")
    parser.add_argument("--skip-patch-timing", action="store_true",
                        help="no calibration and no artifact export: latency and memory of load + patch only")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every figure as JSON here")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="also write the report as markdown here")
    return parser


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

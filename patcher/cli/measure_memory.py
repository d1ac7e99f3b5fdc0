"""Peak resident memory of load + patch + artifact writing, against the size of the weights.

    python scripts/measure_memory.py [--model smol-qwen-vl] [--layers 12,14] [--base-weights check] [--out DIR]

Runs the patch pipeline (`sasa_patcher.pipeline.run_patch`, untrained probe, safetensors only) and
prints one JSON object: the kernel's high-water mark per stage (reset between stages where the
kernel allows; see `sasa_patcher.memory`), with the split of resident memory into private (RssAnon)
and mapped-file pages (RssFile: transformers 5 maps same-dtype safetensors weights instead of
copying them, so they count as file pages once touched), the weight bytes of the base checkpoint,
and the ratios peak / weights and (peak - baseline after imports) / weights. A patch that held two
copies of the weights would show a ratio of 2 or more on the stage that did it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from sasa_patcher.console import report_user_error
from sasa_patcher.errors import UserInputError

STAGE_NAMES = {"load": "load", "patch": "patch", "export_safetensors": "write"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smol-qwen-vl")
    parser.add_argument("--layers", default="12,14")
    parser.add_argument("--base-weights", choices=("check", "trust", "save"), default="check",
                        help="check: compare bytes with the base files (default); trust: headers only; "
                             "save: re-serialise from memory (what an adapter merge forces)")
    parser.add_argument("--out", type=Path, help="where to write the artifact (default: a temporary directory)")
    return parser


def measure(args: argparse.Namespace) -> dict:
    """The pipeline on an untrained probe, and its per-stage memory against the base weights."""
    import torch  # noqa: F401 - imported before the baseline so it is not counted as weights
    import transformers

    from sasa_patcher.memory import current_rss_bytes, reset_peak, weight_bytes
    from sasa_patcher.pipeline import PatchOptions, resolve, run_patch

    resettable = reset_peak()
    baseline = current_rss_bytes()
    out = args.out or Path(tempfile.mkdtemp(prefix="sasa-measure-")) / "artifact"
    options = PatchOptions(out=out, model=args.model, layers=args.layers, calibration="none",
                           formats=("safetensors",), base_weights=args.base_weights, force=True)
    resolved = resolve(options)
    weights = weight_bytes(resolved[0])
    if weights is None:
        raise UserInputError(f"{resolved[0]} has no safetensors weights to measure against")
    result = run_patch(options, resolved=resolved)
    stages = {STAGE_NAMES[name]: {**snapshot, "seconds": round(result.seconds[name], 2)}
              for name, snapshot in result.memory.items() if name in STAGE_NAMES}
    peak = max(values["peak_rss"] for values in stages.values())
    return {
        "model": args.model,
        "transformers": transformers.__version__,
        "weight_bytes": weights,
        "baseline_rss_after_imports": baseline,
        "peak_reset_per_stage": resettable,
        "stages": stages,
        "peak_rss": peak,
        "peak_over_weights": round(peak / weights, 3),
        "peak_minus_baseline_over_weights": round((peak - baseline) / weights, 3),
        "base_weights": result.safetensors["base_weights"],
        "verified_tensors": result.safetensors["verified"],
        "artifact": str(out),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = measure(args)
    except UserInputError as error:
        return report_user_error(error)
    print(json.dumps(report, indent=2))
    return 0

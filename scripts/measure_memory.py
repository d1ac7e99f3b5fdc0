#!/usr/bin/env python
"""Peak resident memory of load + patch + artifact writing, against the size of the weights.

    python scripts/measure_memory.py [--model smol-qwen-vl] [--layers 12,14] [--base-weights check] [--out DIR]

Reads the kernel's high-water mark (VmHWM in /proc/self/status; ru_maxrss elsewhere) after each
stage, resetting it between stages where the kernel allows (`echo 5 > /proc/self/clear_refs`), with
the split of resident memory into private (RssAnon) and mapped-file pages (RssFile: transformers 5
maps same-dtype safetensors weights instead of copying them, so they count as file pages once
touched), and prints one JSON object: per-stage peaks, the weight bytes of the base checkpoint, and the ratios
peak / weights and (peak - baseline after imports) / weights. A patch that held two copies of the
weights would show a ratio of 2 or more on the stage that did it.

The model is loaded as the CLI loads it: `patcher.loading.load_model` (float32 on CPU).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def current_rss_bytes(field: str = "VmRSS") -> int:
    """VmRSS, or its parts RssAnon (private memory) and RssFile (mapped file pages, e.g. mmap'd weights)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_snapshot() -> dict[str, int]:
    """The peak since the last reset, and what is resident now, split into private and mapped-file pages."""
    return {"peak_rss": peak_rss_bytes(), "rss_after": current_rss_bytes(),
            "anon_after": current_rss_bytes("RssAnon"), "file_after": current_rss_bytes("RssFile")}


def weight_bytes(directory: Path) -> int | None:
    """Bytes of the base checkpoint's safetensors tensors (None when it has no safetensors weights)."""
    from sasa_patcher.export.checkpoint import base_weight_files

    base = base_weight_files(directory)
    if base is None:
        return None
    return sum(entry["data_offsets"][1] - entry["data_offsets"][0] for _, entry in base.tensors.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smol-qwen-vl")
    parser.add_argument("--layers", default="12,14")
    parser.add_argument("--base-weights", choices=("check", "trust", "save"), default="check",
                        help="check: compare bytes with the base files (default); trust: headers only; "
                             "save: re-serialise from memory (what an adapter merge forces)")
    parser.add_argument("--out", type=Path, help="where to write the artifact (default: a temporary directory)")
    args = parser.parse_args(argv)

    import torch  # noqa: F401 - imported before the baseline so it is not counted as weights
    import transformers

    from sasa_patcher.export.atomic import atomic_output_dir
    from sasa_patcher.export.checkpoint import write_safetensors_artifact
    from sasa_patcher.export.model_card import CardInfo
    from sasa_patcher.loading import load_model, resolve_model
    from sasa_patcher.modeling_sasa import SasaSettings
    from sasa_patcher.patching import parse_layers, patch_model

    stages: dict[str, dict[str, int | float]] = {}
    resettable = reset_peak()
    baseline = current_rss_bytes()

    def stage(name: str, started: float) -> None:
        stages[name] = {**memory_snapshot(), "seconds": round(time.perf_counter() - started, 2)}
        reset_peak()

    directory = resolve_model(args.model)
    weights = weight_bytes(directory)
    if weights is None:
        parser.error(f"{directory} has no safetensors weights to measure against")

    started = time.perf_counter()
    loaded = load_model(args.model, dtype="auto", device="cpu")
    model, processor = loaded.model, loaded.processor
    stage("load", started)

    started = time.perf_counter()
    safety, semantic = parse_layers(args.layers)
    model = patch_model(model, SasaSettings(safety, semantic))
    stage("patch", started)

    started = time.perf_counter()
    out = args.out or Path(tempfile.mkdtemp(prefix="sasa-measure-")) / "artifact"
    with atomic_output_dir(out, force=True) as staging:
        modified = {"check": None, "trust": False, "save": True}[args.base_weights]
        summary = write_safetensors_artifact(model, processor, loaded.source, staging, weights_modified=modified,
                                             card_info=CardInfo(base_model=args.model))
    stage("write", started)

    peak = max(values["peak_rss"] for values in stages.values())
    report = {
        "model": args.model,
        "transformers": transformers.__version__,
        "weight_bytes": weights,
        "baseline_rss_after_imports": baseline,
        "peak_reset_per_stage": resettable,
        "stages": stages,
        "peak_rss": peak,
        "peak_over_weights": round(peak / weights, 3),
        "peak_minus_baseline_over_weights": round((peak - baseline) / weights, 3),
        "base_weights": summary["base_weights"],
        "verified_tensors": summary["verified"],
        "artifact": str(out),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

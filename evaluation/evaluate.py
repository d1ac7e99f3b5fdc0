"""One evaluation run: a SASA artifact against its base model on held-out prompts, every figure of the report.

Why in the package: the run (which artifact, which modes, which prompts, the systems side by side)
is tested on tiny models here, and the CLI only parses flags. The prompt sets are in
`evaluation.held_out`, generation in `evaluation.systems`, the figures in `evaluation.metrics` and
`evaluation.utility`; the table, markdown and charts in `evaluation.evaluation_report`. Input is
checked before any model is loaded (`UserInputError`, exit code 2).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sasa_patcher.console import log
from sasa_patcher.errors import UserInputError
from sasa_patcher.export.atomic import check_output_dir
from sasa_patcher.loading import load_model, resolve_model, torch_dtype
from sasa_patcher.modeling_sasa import SERVING_MODES

RUNTIMES = ("auto", "safetensors", "onnx")


# ----- checking the input ---------------------------------------------------------------------------------
def detect_runtime(patched: Path, runtime: str) -> tuple[str, dict]:
    """Which artifact to run (the safetensors one at PATCHED's root, or the ONNX one in PATCHED or
    PATCHED/onnx), and its SASA settings as stored (mode, threshold, refusal text, calibration metrics)."""
    from sasa_patcher.export.onnx_runtime import CONFIG_NAME, find_onnx_dir

    if not patched.is_dir():
        raise UserInputError(f"artifact directory {patched} does not exist")
    config = patched / "config.json"
    has_safetensors = config.is_file() and "sasa" in json.loads(config.read_text())
    try:
        onnx_config = json.loads((find_onnx_dir(patched) / CONFIG_NAME).read_text())
    except FileNotFoundError:
        onnx_config = None
    if runtime == "auto":
        runtime = "safetensors" if has_safetensors else "onnx" if onnx_config else ""
    if runtime == "safetensors" and not has_safetensors:
        raise UserInputError(f"{patched} is not a SASA safetensors artifact (no config.json with a 'sasa' section); "
                             "pass the directory scripts/patch.py wrote")
    if runtime == "onnx" and not onnx_config:
        raise UserInputError(f"{patched} holds no SASA ONNX artifact (no sasa_onnx.json in it or in its onnx/); "
                             "write one with scripts/patch.py --format onnx")
    if not runtime:
        raise UserInputError(f"{patched} is not a SASA artifact: no config.json with a 'sasa' section and no onnx/ "
                             "folder; pass the directory scripts/patch.py wrote")
    settings = onnx_config["sasa"] if runtime == "onnx" else json.loads(config.read_text())["sasa"]
    return runtime, settings


def parse_modes(text: str | None, runtime: str, baked: str) -> list[str]:
    """The serving modes to evaluate; an ONNX artifact serves only the mode baked into its graph."""
    if text is None:
        return [baked] if runtime == "onnx" else list(SERVING_MODES)
    modes = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [mode for mode in modes if mode not in SERVING_MODES]
    if unknown or not modes:
        raise UserInputError(f"--modes takes a comma-separated subset of {', '.join(SERVING_MODES)}, got {text!r}")
    if runtime == "onnx" and modes != [baked]:
        raise UserInputError(f"the ONNX artifact has mode {baked!r} baked into its graph and cannot serve "
                             f"{', '.join(m for m in modes if m != baked)}; use --modes {baked}, or evaluate "
                             "the safetensors artifact for both modes")
    return list(dict.fromkeys(modes))


def check_options(args: argparse.Namespace) -> None:
    """Counts the run needs, checked before anything is loaded (`--threads` is optional)."""
    for name, least in (("limit", 0), ("max_new_tokens", 1), ("batch_size", 1), ("threads", 1)):
        value = getattr(args, name)
        if value is not None and value < least:
            raise UserInputError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")


def home_relative(path: Path) -> str:
    """`~/...` for paths under the home directory, so a shared report does not name the user's machine."""
    home = Path.home()
    return f"~/{path.relative_to(home).as_posix()}" if path.is_relative_to(home) else str(path)


# ----- loading ---------------------------------------------------------------------------------------------
def load_torch_artifact(patched: Path, device: str):
    """The safetensors artifact as its users load it: transformers + the artifact's own modeling_sasa.py."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(patched, trust_remote_code=True,
                                                        dtype=torch_dtype("auto", device)).to(device).eval()
    if not hasattr(model, "set_sasa"):
        raise UserInputError(f"{patched} loaded as {type(model).__name__}, not a SASA-patched class")
    return model


def build_systems(args, runtime: str, modes: list[str], base) -> tuple[list, object]:
    """The base system, then one system per evaluated mode; and the ONNX runtime (None for safetensors)."""
    from sasa_patcher.evaluation.systems import OnnxSystem, TorchSystem

    systems = [TorchSystem("base", base.model, base.processor)]
    vocab = base.model.config.get_text_config().vocab_size
    if runtime == "onnx":
        from sasa_patcher.export.onnx_runtime import OnnxVlm

        vlm = OnnxVlm(args.patched, threads=args.threads)
        check_same_vocabulary(vocab, vlm.config["vocab_size"], args)
        return [*systems, OnnxSystem(f"onnx-{modes[0]}", vlm)], vlm
    patched = load_torch_artifact(args.patched, args.device)
    check_same_vocabulary(vocab, patched.config.get_text_config().vocab_size, args)
    systems += [TorchSystem(mode, patched, base.processor, mode=mode) for mode in modes]
    return systems, None


def check_same_vocabulary(base: int, patched: int, args: argparse.Namespace) -> None:
    """KL between base and artifact needs one vocabulary: catch an artifact made from another base."""
    if base != patched:
        raise UserInputError(f"{args.patched} has a vocabulary of {patched} tokens and {args.base} one of {base}: "
                             "the artifact was not made from this base model")


def prompts_to_evaluate(args, metrics: dict) -> tuple[list, list, dict]:
    """(harmful and benign held-out prompts, over-refusal prompts, where they came from)."""
    from sasa_patcher.evaluation.held_out import over_refusal_prompts
    from sasa_patcher.probes.calibration_set import default_calibration_set
    from sasa_patcher.probes.probe import data_digest
    from sasa_patcher.probes.splits import DEFAULT_HELDOUT_FRACTION, split

    fraction = metrics.get("heldout_fraction", DEFAULT_HELDOUT_FRACTION)
    builtin = split(default_calibration_set(), fraction)
    recorded = metrics.get("calibration_digest")
    matches = None if recorded is None else data_digest(builtin.calibration) == recorded
    if matches is False:
        log("warning: the artifact was not calibrated on the built-in set's calibration side, so its held-out "
            "side is not guaranteed unseen")
    source = {"heldout_fraction": fraction, "calibration_digest_matches_builtin": matches}
    if args.data is not None:
        from sasa_patcher.probes.manifest import load_manifest

        source["data"] = str(args.data)
        return load_manifest(args.data), over_refusal_prompts(builtin.calibration), source
    source["data"] = "builtin held-out split"
    return builtin.heldout, over_refusal_prompts(builtin.calibration), source


def typographic_size(onnx_vlm) -> tuple[int, int]:
    """(width, height) to render typographic prompts at: the ONNX artifact's one supported image size
    (its vision graph has a fixed grid), else the size calibration rendered them at."""
    from sasa_patcher.probes.typographic import DEFAULT_SIZE

    if onnx_vlm is None:
        return DEFAULT_SIZE
    height, width = onnx_vlm.config["image"]["sizes"][0]
    return width, height


# ----- the run -----------------------------------------------------------------------------------------------
def evaluate(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """Every figure of the report, and the per-prompt records."""
    from sasa_patcher.evaluation.held_out import build_prompt_sets
    from sasa_patcher.evaluation.metrics import generation_metrics
    from sasa_patcher.evaluation.systems import generation_records
    from sasa_patcher.evaluation.utility import utility_metrics

    started = time.perf_counter()
    check_output_dir(args.out, args.force)
    check_options(args)
    runtime, settings = detect_runtime(args.patched, args.runtime)
    modes = parse_modes(args.modes, runtime, settings["mode"])
    resolve_model(args.base)
    held, over_refusal, source = prompts_to_evaluate(args, settings.get("metrics") or {})

    if args.threads:
        torch.set_num_threads(args.threads)
    log(f"loading {args.base} and the {runtime} artifact {args.patched}")
    base = load_model(args.base, device=args.device)
    systems, onnx_vlm = build_systems(args, runtime, modes, base)
    timings = {"load_s": time.perf_counter() - started}

    mark = time.perf_counter()
    image_size = typographic_size(onnx_vlm)
    prompt_sets = build_prompt_sets(held, over_refusal, limit=args.limit or None, image_size=image_size)
    counts = {prompt_set.name: len(prompt_set.prompts) for prompt_set in prompt_sets}
    log("prompts per set: " + ", ".join(f"{name} {count}" for name, count in counts.items()))
    timings["typographic_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    names = [system.name for system in systems]
    records = generation_records(systems, prompt_sets, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                 refusal_texts=[settings["refusal_text"]], progress=not args.no_progress)
    timings["generation_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    benign_text = next((s.prompts for s in prompt_sets if s.name == "benign_text"), [])
    utility = utility_metrics(systems, base.processor, benign_text, batch_size=args.batch_size,
                              progress=not args.no_progress) if benign_text else {}
    timings["utility_s"] = time.perf_counter() - mark
    timings["total_s"] = time.perf_counter() - started

    figures = generation_metrics(records, prompt_sets, names, settings.get("threshold"))
    figures["utility"] = utility
    report = {
        "base": args.base,
        "base_dir": home_relative(base.source),
        "artifact": str(args.patched),  # as given: the report is meant to be shared, absolute paths are private
        "runtime": runtime,
        "systems": names,
        "counts": counts,
        "data": source,
        "options": {"limit": args.limit, "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                    "threads": torch.get_num_threads(), "typographic_size": list(image_size), "decoding": "greedy"},
        "sasa": {key: value for key, value in settings.items() if key != "metrics"},
        "calibration_metrics": settings.get("metrics") or {},
        "metrics": figures,
        "seconds": timings,
    }
    return report, records

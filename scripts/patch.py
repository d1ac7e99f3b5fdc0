#!/usr/bin/env python
"""Patch a vision-language model with SASA and write the checkpoint.

    python scripts/patch.py --model smol-qwen-vl --out patched/

Exit code 2 and a one-line reason on bad input; nothing is written then.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from sasa_patcher.console import log, report_user_error
from sasa_patcher.errors import UserInputError
from sasa_patcher.export.atomic import atomic_output_dir, check_output_dir
from sasa_patcher.export.checkpoint import write_safetensors_artifact
from sasa_patcher.export.model_card import CardInfo
from sasa_patcher.loading import (
    ALIASES,
    DEFAULT_MODEL,
    DEVICES,
    check_adapter,
    check_architecture,
    check_device,
    load_model,
    resolve_model,
    torch_dtype,
)
from sasa_patcher.modeling_sasa import (
    DEFAULT_REFUSAL,
    PROBE_FEATURES,
    PROJECTION_MODES,
    SERVING_MODES,
    SasaSettings,
)
from sasa_patcher.patching import default_layers, parse_layers, patch_model

FORMATS = ("safetensors", "onnx")
EMBEDDED_SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"alias ({', '.join(ALIASES)}), embedded model (smol-qwen-vl, smol-llava), "
                             f"local directory or Hub id (default: {DEFAULT_MODEL})")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--layers", default="auto",
                        help="'s,f' (safety-perception and semantic layer) or 'auto' (default: localised on the "
                             "calibration data)")
    parser.add_argument("--projection", choices=PROJECTION_MODES, default="replace")
    parser.add_argument("--beta", type=float, default=1.0, help="weight for residual/interpolate projection")
    parser.add_argument("--eps", type=float, default=1e-6)
    parser.add_argument("--mode", choices=SERVING_MODES, default="gate",
                        help="gate: original stream + refusal when flagged; augment: generate from projected stream")
    parser.add_argument("--refusal-text", default=DEFAULT_REFUSAL)
    parser.add_argument("--calibration", default="builtin",
                        help="'builtin' (real offline sets), a JSONL manifest path, or 'none' (untrained probe)")
    parser.add_argument("--probe-features", choices=("auto", *PROBE_FEATURES), default="auto",
                        help="probe input; auto picks by cross-validated AUROC on the calibration split")
    parser.add_argument("--target-fpr", type=float, default=0.05,
                        help="false-positive rate the threshold is chosen for on calibration data")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-calibration-record", action="store_true",
                        help="do not write calibration.jsonl (text, label, source, split) into the artifact")
    parser.add_argument("--format", default=",".join(FORMATS), help="comma-separated: safetensors, onnx")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the artifact to this Hub repository")
    parser.add_argument("--adapter", type=Path, help="PEFT LoRA adapter directory merged before patching")
    parser.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16")
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="cpu, cuda, or auto (accelerate device map for models larger than one GPU)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    return parser


def parse_formats(text: str) -> list[str]:
    formats = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [part for part in formats if part not in FORMATS]
    if unknown or not formats:
        raise UserInputError(f"--format takes a comma-separated subset of {', '.join(FORMATS)}, got {text!r}")
    return formats


def load_calibration_prompts(spec: str) -> list | None:
    """The calibration prompts named by --calibration, validated before any model is loaded."""
    if spec == "none":
        return None
    if spec == "builtin":
        from sasa_patcher.probes.datasets import builtin_calibration_set

        return builtin_calibration_set()
    from sasa_patcher.probes.manifest import load_manifest

    return load_manifest(Path(spec))


def check_options(args: argparse.Namespace) -> None:
    if not 0.0 < args.target_fpr < 1.0:
        raise UserInputError(f"--target-fpr must be a rate in (0, 1), got {args.target_fpr}")
    if args.batch_size < 1:
        raise UserInputError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.calibration == "none" and args.layers == "auto":
        log("no calibration: layers fall back to the default rule (two fifths of the depth, f = s + 2)")


def check_onnx_options(args: argparse.Namespace, formats: list[str]) -> None:
    """The ONNX graphs are float32 and traced on one device: say so before any work, not after calibration."""
    if "onnx" not in formats:
        return
    dtype = torch_dtype(args.dtype, args.device)
    if dtype != torch.float32:
        raise UserInputError(f"the ONNX export is float32, but the model would load as {str(dtype).split('.')[-1]}: "
                             "pass --dtype float32, or --format safetensors")
    if args.device == "auto":
        raise UserInputError("the ONNX export needs the whole model on one device: pass --device cpu or cuda, "
                             "or --format safetensors")


def initial_settings(args: argparse.Namespace, num_layers: int) -> SasaSettings:
    """Settings before calibration: given layers, or the fallback rule until localisation replaces them."""
    safety, semantic = default_layers(num_layers) if args.layers == "auto" else parse_layers(args.layers)
    features = "projected-logits" if args.probe_features == "auto" else args.probe_features
    settings = SasaSettings(safety, semantic, projection=args.projection, beta=args.beta, eps=args.eps,
                            mode=args.mode, refusal_text=args.refusal_text, probe_features=features)
    try:
        settings.validate(num_layers)
    except ValueError as error:
        raise UserInputError(f"--layers: {error}") from None
    return settings


def print_calibration(report) -> None:
    held = report.heldout
    s, f = report.layers
    log(f"layers: s={s}, f={f} ({report.metrics['layers_chosen_by']})")
    log("probe features (cross-validated AUROC on the calibration split): "
        + ", ".join(f"{name} {value:.3f}" for name, value in report.metrics["candidates_cv_auroc"].items())
        + f" -> {report.feature}")
    log(f"held-out ({held['n_harmful']} harmful, {held['n_benign']} benign): AUROC {held['auroc']:.3f}, "
        f"TPR {held['tpr']:.3f}, FPR {held['fpr']:.3f} at threshold {report.threshold:.4f} "
        f"(target FPR {report.target_fpr:.2f} on calibration data)")
    log(f"leave-one-source-out AUROC: mean {report.metrics['loso_mean_auroc']:.3f}, "
        f"min {report.metrics['loso_min_auroc']:.3f}; per source: "
        + ", ".join(f"{name} {value:.3f}" for name, value in report.metrics["loso_auroc"].items()
                    if value is not None))


def write_calibration_record(records: list[dict], path: Path) -> None:
    with path.open("w") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def card_info(args: argparse.Namespace, plot: Path | None, calibration: str) -> CardInfo:
    embedded = args.model.startswith("smol-")
    return CardInfo(
        base_model=ALIASES.get(args.model, args.model),
        license="apache-2.0" if embedded else None,
        localisation_plot=plot,
        source_models=[EMBEDDED_SOURCE] if embedded else [],
        calibration_data=[] if calibration == "none" else [calibration],
    )


def run(args: argparse.Namespace) -> Path:
    check_output_dir(args.out, args.force)
    check_options(args)
    formats = parse_formats(args.format)
    check_device(args.device)
    check_onnx_options(args, formats)
    if args.adapter is not None:
        check_adapter(args.adapter)
    directory = resolve_model(args.model)
    check_architecture(directory)
    from transformers import AutoConfig

    num_layers = AutoConfig.from_pretrained(directory).get_text_config().num_hidden_layers
    settings = initial_settings(args, num_layers)
    prompts = load_calibration_prompts(args.calibration)

    started = time.perf_counter()
    log(f"loading {args.model} ({directory})")
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, adapter=args.adapter)
    model = patch_model(loaded.model, settings, loaded.processor.tokenizer)
    log(f"loaded and patched in {time.perf_counter() - started:.1f}s ({num_layers} layers, "
        f"projection {settings.projection}, mode {settings.mode})")

    with atomic_output_dir(args.out, args.force) as staging:
        plot = None
        if prompts is None:
            log("probe head: untrained (zero weights, threshold +inf: nothing is flagged)")
        else:
            from sasa_patcher.probes.calibrate import calibrate

            log(f"calibrating on {len(prompts)} prompts ({args.calibration})")
            layers = "auto" if args.layers == "auto" else parse_layers(args.layers)
            report = calibrate(model, loaded.processor, prompts, layers=layers, features=args.probe_features,
                               target_fpr=args.target_fpr, batch_size=args.batch_size, plot_dir=staging)
            print_calibration(report)
            plot = next(iter(sorted(staging.glob("*.png"))), None)
            if not args.no_calibration_record:
                write_calibration_record(report.records, staging / "calibration.jsonl")
        if "safetensors" in formats:
            mark = time.perf_counter()
            write_safetensors_artifact(model, loaded.processor, loaded.source, staging,
                                       card_info=card_info(args, plot, args.calibration),
                                       weights_modified=True if args.adapter else None)
            log(f"safetensors artifact written in {time.perf_counter() - mark:.1f}s")
        if "onnx" in formats:
            from sasa_patcher.export.onnx_export import export_onnx

            mark = time.perf_counter()
            if model.device.type != "cpu":
                log("moving the model to the CPU for the ONNX export (traced and parity-checked there)")
                model = model.to("cpu")
            export_onnx(model, loaded.processor, staging / "onnx", log=log)
            log(f"ONNX artifact written in {time.perf_counter() - mark:.1f}s; parity figures in onnx/parity.json")
    if args.push_to_hub:
        from sasa_patcher.export.hub import push_to_hub

        log(f"uploaded to {push_to_hub(args.out, args.push_to_hub)}")
    return args.out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = run(args)
    except UserInputError as error:
        return report_user_error(error)
    print(f"patched checkpoint written to {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

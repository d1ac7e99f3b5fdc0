"""Patch a vision-language model with SASA and write the checkpoint.

    python scripts/patch.py --model smol-qwen-vl --out patched/

Exit code 2 and a one-line reason on bad input; nothing is written then.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sasa_patcher.console import log, report_user_error
from sasa_patcher.errors import UserInputError
from sasa_patcher.loading import ALIASES, DEFAULT_MODEL, DEVICES
from sasa_patcher.modeling_sasa import DEFAULT_REFUSAL, PROBE_FEATURES, PROJECTION_MODES, SERVING_MODES
from sasa_patcher.pipeline import FORMATS, PatchOptions, parse_formats, run_patch
from sasa_patcher.shapes import SHAPE_NAMES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"alias ({', '.join(ALIASES)}), embedded model (smol-qwen-vl, smol-llava), "
                             f"shape-true random-weight model ({', '.join(SHAPE_NAMES)}), "
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
                        help="probe input; auto picks by transfer: the mean of leave-one-category-out and "
                             "leave-one-source-out AUROC on the calibration data")
    parser.add_argument("--target-fpr", type=float, default=0.05,
                        help="false-positive rate the threshold is chosen for on calibration data")
    parser.add_argument("--policy", default="all",
                        help="hazards that count as harmful: 'all' (default), a comma list (hate,privacy), or "
                             "all minus some (all,-sexual_content,-specialized_advice); AILuminate categories")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--semantic-pairs", type=int, default=PatchOptions.semantic_pairs,
                        help="typographic image/text pairs for --layers auto's semantic curve (default "
                             f"{PatchOptions.semantic_pairs}; 0: none). At real size they are the longest part of a "
                             "small calibration (an image prompt costs ~10 text prompts): fewer pairs, weaker evidence")
    parser.add_argument("--no-calibration-record", action="store_true",
                        help="do not write calibration.jsonl (text, label, source, split) into the artifact")
    parser.add_argument("--format", default=",".join(FORMATS), help="comma-separated: safetensors, onnx")
    parser.add_argument("--onnx-precision", default="fp32",
                        help="precision of the ONNX graphs: fp32 (default), fp16 (for CUDA; float32 inputs and "
                             "outputs), int4 (weight-only MatMulNBits, CPU and GPU); the probe head, the projection "
                             "and the threshold comparison stay float32 in every precision; fp16/int4 vs fp32 figures "
                             "in onnx/parity.json")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the artifact to this Hub repository")
    parser.add_argument("--adapter", type=Path, help="PEFT LoRA adapter directory merged before patching")
    parser.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU), float32, bfloat16, float16")
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="cpu, cuda, or auto (accelerate device map for models larger than one GPU)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument("--allow-random-calibration", action="store_true",
                        help="calibrate a shape-true model anyway (random weights: only its timings mean something)")
    return parser


def options_from_args(args: argparse.Namespace) -> PatchOptions:
    """The parsed flags as pipeline options (`--format` checked here: it is the one flag parsed from text)."""
    return PatchOptions(
        out=args.out, model=args.model, layers=args.layers, projection=args.projection, beta=args.beta,
        eps=args.eps, mode=args.mode, refusal_text=args.refusal_text, calibration=args.calibration,
        probe_features=args.probe_features, target_fpr=args.target_fpr, policy=args.policy, batch_size=args.batch_size,
        semantic_pairs=args.semantic_pairs,
        calibration_record=not args.no_calibration_record, formats=parse_formats(args.format),
        push_to_hub=args.push_to_hub, adapter=args.adapter, dtype=args.dtype, device=args.device, force=args.force,
        allow_random_calibration=args.allow_random_calibration, keep_model=False, onnx_precision=args.onnx_precision,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run_patch(options_from_args(args), log=log)
    except UserInputError as error:
        return report_user_error(error)
    print(f"patched checkpoint written to {result.out.resolve()}")
    return 0

"""Convert an exported SASA ONNX artifact (fp32) to fp16 or int4 graphs, with no PyTorch.

    python scripts/quantize_onnx.py patched/ --precision int4 --out patched-int4/

int4: weight-only MatMulNBits (ONNX Runtime's quantizer), for CPU and GPU. fp16: float16 graphs
for CUDA (float32 inputs and outputs; ONNX Runtime's CPU provider runs them too, slowly). The probe
head, the projection and the threshold comparison stay float32. OUT is a complete ONNX directory
(same file names, so genai_config.json and the project's runtime load it as they load the fp32
one) with `precision.json`: what was converted, sizes, and the figures against the fp32 graphs on a
few prompts. Bad input ends with one `error:` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from sasa_patcher.console import log, report_user_error
from sasa_patcher.errors import UserInputError
from sasa_patcher.export.onnx_precision import (
    DEFAULT_BLOCK_SIZE,
    PRECISION_NAME,
    PRECISIONS,
    PrecisionError,
    check_precision,
    convert_onnx_dir,
)
from sasa_patcher.export.onnx_precision_parity import describe_parity, precision_parity
from sasa_patcher.export.onnx_runtime import find_onnx_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, metavar="ARTIFACT", help="patch output directory or its onnx/ (fp32)")
    parser.add_argument("--precision", required=True,
                        help=f"one of {', '.join(p for p in PRECISIONS if p != 'fp32')}: int4 (CPU and GPU), "
                             "fp16 (for CUDA)")
    parser.add_argument("--out", required=True, type=Path, help="the new ONNX directory")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                        help=f"int4 quantisation block (32, 64 or 128; default {DEFAULT_BLOCK_SIZE})")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the comparison with the fp32 graphs (a few prompts through ONNX Runtime on CPU)")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    staged = None
    try:
        if args.precision == "fp32":
            raise UserInputError("--precision fp32 is the export itself: choose fp16 or int4")
        try:
            check_precision(args.precision, args.block_size)
        except PrecisionError as error:
            raise UserInputError(str(error).replace("--onnx-precision", "--precision")) from None
        try:
            source = find_onnx_dir(args.artifact)
        except FileNotFoundError as error:
            raise UserInputError(str(error)) from None
        out = args.out
        if out.exists() and not args.force:
            raise UserInputError(f"{out} exists: pass --force to replace it")
        if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
            raise UserInputError(f"--out {out} is inside the source artifact: choose another directory")
        staged = out.with_name(f".{out.name}.partial")
        shutil.rmtree(staged, ignore_errors=True)
        try:
            record = convert_onnx_dir(source, staged, args.precision, block_size=args.block_size, log=log)
        except PrecisionError as error:
            raise UserInputError(str(error)) from None
        if not args.no_check:
            record["parity"] = precision_parity(source, staged)
            log(describe_parity(args.precision, record["parity"]))
            (staged / PRECISION_NAME).write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
        staged = None
    except UserInputError as error:
        return report_user_error(error)
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
    sizes = record["total_bytes"]
    print(f"{args.precision} graphs written to {out.resolve()} ({sizes[args.precision] / 1024**2:.0f} MiB; "
          f"fp32 {sizes['fp32'] / 1024**2:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

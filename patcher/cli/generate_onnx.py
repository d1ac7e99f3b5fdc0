"""Answer one prompt (and optionally one image) with the SASA ONNX artifact and ONNX Runtime.

    python scripts/generate_onnx.py patched/ --prompt "What is in this picture?" --image cat.png

Prints the answer and nothing else on stdout (diagnostics go to stderr). Greedy decoding; in gate
mode a prompt whose unsafe_prob passes the artifact's threshold is answered with its refusal text.
Needs only onnxruntime (onnxruntime-gpu for CUDA), numpy, tokenizers and Pillow; jinja2, when
installed, renders the chat template. ARTIFACT_DIR is the ONNX directory or its parent.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sasa_patcher.export.onnx_runtime import OnnxVlm, default_providers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, metavar="ARTIFACT_DIR", help="patch output directory or its onnx/")
    parser.add_argument("--prompt", required=True, help="the user's message")
    parser.add_argument("--image", type=Path, help="an image file (resized to the artifact's supported size)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--cpu", action="store_true", help="use the CPU provider even when CUDA is available")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        print("error: --max-new-tokens must be at least 1", file=sys.stderr)
        return 2
    if args.image is not None and not args.image.is_file():
        print(f"error: image {args.image} does not exist", file=sys.stderr)
        return 2
    providers = ["CPUExecutionProvider"] if args.cpu else default_providers()
    try:
        runtime = OnnxVlm(args.artifact, providers=providers)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(runtime.answer(args.prompt, args.image, args.max_new_tokens))
    return 0


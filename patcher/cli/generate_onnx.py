"""Answer one prompt (and optionally one image) with the SASA ONNX artifact and ONNX Runtime.

    python scripts/generate_onnx.py patched/ --prompt "What is in this picture?" --image cat.png

Prints the answer and nothing else on stdout (diagnostics go to stderr). Greedy decoding of the graph's
logits: in gate mode the decoder graph itself answers a prompt whose unsafe_prob passes the artifact's
threshold with its refusal text (this script has no gate of its own).
Needs only onnxruntime (onnxruntime-gpu for CUDA), numpy, tokenizers and Pillow; jinja2, when
installed, renders the chat template. ARTIFACT_DIR is the ONNX directory or its parent.

Runtime: ONNX Runtime GenAI (its own processor and generation loop) when `onnxruntime_genai` is
installed and the artifact has a `genai_config.json` (gate-mode Qwen artifacts), else the project's
numpy + ONNX Runtime loop; `--runtime` picks one. Neither imports torch. Bad input (unreadable image,
damaged artifact, prompt beyond the context length) ends with one `error:` line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sasa_patcher.export.genai import GenAiVlm, genai_installed, has_genai_config
from sasa_patcher.export.onnx_runtime import (
    ArtifactError,
    ImageError,
    OnnxVlm,
    PromptTooLongError,
    default_providers,
    find_onnx_dir,
)

USER_ERRORS = (FileNotFoundError, ArtifactError, ImageError, PromptTooLongError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, metavar="ARTIFACT_DIR", help="patch output directory or its onnx/")
    parser.add_argument("--prompt", required=True, help="the user's message")
    parser.add_argument("--image", type=Path, action="append", default=[],
                        help="an image file, shown before the prompt (repeat for several; Qwen artifacts take any "
                             "size, LLaVA resizes to its one size)")
    parser.add_argument("--runtime", choices=("auto", "genai", "onnxruntime"), default="auto",
                        help="auto: ONNX Runtime GenAI when installed and the artifact has genai_config.json")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--cpu", action="store_true", help="use the CPU provider even when CUDA is available")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        print("error: --max-new-tokens must be at least 1", file=sys.stderr)
        return 2
    for image in args.image:
        if not image.is_file():
            print(f"error: image {image} does not exist", file=sys.stderr)
            return 2
    try:
        runtime = load_runtime(args.artifact, args.runtime, args.cpu)
        answer = runtime.answer(args.prompt, args.image or None, args.max_new_tokens)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(answer)
    return 0


def load_runtime(artifact: Path, runtime: str = "auto", cpu: bool = False) -> GenAiVlm | OnnxVlm:
    """GenAI where asked (`runtime="genai"`) or possible (`"auto"`), else the project's runtime (`"onnxruntime"`).
    auto falls back to the project's runtime when GenAI cannot load the artifact, with a note once that runtime
    has loaded it (a damaged artifact: one error line, that runtime's). Shared with `sasa-serve`."""
    onnx_dir = find_onnx_dir(artifact)
    use_genai = runtime == "genai" or (runtime == "auto" and genai_installed() and has_genai_config(onnx_dir))
    providers = ["CPUExecutionProvider"] if cpu else default_providers()
    if not use_genai:
        return OnnxVlm(onnx_dir, providers=providers)
    try:
        return GenAiVlm(onnx_dir)
    except ArtifactError as error:
        if runtime == "genai":
            raise
        fallback = OnnxVlm(onnx_dir, providers=providers)
        print(f"note: {error}; using ONNX Runtime", file=sys.stderr)
        return fallback

"""Evaluate a SASA artifact against its base model on held-out data.

    python scripts/evaluate.py smol-qwen-vl patched/ --out eval-out

BASE is what `scripts/patch.py --model` accepts; PATCHED is a directory `scripts/patch.py` wrote (the
safetensors artifact, run in-process with its own remote code) or its `onnx/` folder (run with ONNX
Runtime; `--runtime onnx` picks it from the root too). Writes `evaluation.json` (every figure),
`evaluation.md` (the tables), `evaluation.png` and `categories.png` (the charts: overall, and per hazard
and benign family) and `generations.jsonl` (every answer, to audit the figures) into --out, atomically.
Exit code 2 and a one-line reason on bad input.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sasa_patcher.console import report_user_error
from sasa_patcher.errors import UserInputError
from sasa_patcher.evaluation.evaluate import RUNTIMES, evaluate
from sasa_patcher.evaluation.evaluation_report import markdown, write_report
from sasa_patcher.evaluation.held_out import DEFAULT_LIMIT
from sasa_patcher.evaluation.systems import DEFAULT_MAX_NEW_TOKENS
from sasa_patcher.loading import DEFAULT_MODEL

DEFAULT_OUT = Path("eval-out")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help=f"base model: alias, embedded model (e.g. {DEFAULT_MODEL}) or directory")
    parser.add_argument("patched", type=Path, help="artifact directory written by scripts/patch.py, or its onnx/")
    parser.add_argument("--runtime", choices=RUNTIMES, default="auto",
                        help="safetensors (in-process transformers) or onnx (ONNX Runtime); auto: safetensors "
                             "when PATCHED has it, else onnx")
    parser.add_argument("--modes", help="comma-separated serving modes to evaluate (default: gate,augment for "
                                        "safetensors; the baked mode for onnx)")
    parser.add_argument("--data", type=Path, help="JSONL manifest of your own held-out prompts (text, label, "
                                                  "optional image); replaces the built-in held-out split")
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT,
                        help=f"prompts per prompt set, a deterministic subset (default {DEFAULT_LIMIT}; 0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the PyTorch models run (cuda: bfloat16, as patch.py loads them)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch and ONNX Runtime (default: their own)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report, records = evaluate(args)
        write_report(report, records, args.out, args.force)
    except UserInputError as error:
        return report_user_error(error)
    print(markdown(report))
    print(f"evaluation written to {args.out.resolve()}")
    return 0

"""Splice the tables that evaluate.py and bench.py wrote into README.md's Results section.

    python scripts/readme_results.py results/

Run from the repository root (the README there is the default). Exit code 2 and one line when the
results or the README's markers are missing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sasa_patcher.evaluation.readme import update_readme


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", type=Path, help="folder holding evaluation/ (evaluate.py --out) and bench.md")
    parser.add_argument("--readme", type=Path, default=Path("README.md"),
                        help="the README to update (default: README.md in the current directory)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        update_readme(args.readme, args.results_dir)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"updated the Results section of {args.readme}")
    return 0

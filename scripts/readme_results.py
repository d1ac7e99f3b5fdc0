#!/usr/bin/env python
"""Splice the tables that evaluate.py and bench.py wrote into README.md's Results section.

    python scripts/readme_results.py results/

Why a script: the README must show the figures the scripts produced, never numbers typed by hand.
Everything between the two marker comments is replaced by the markdown files of the results
folder (in a fixed order) and a link to the evaluation chart; the rest of the README is untouched.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

START, END = "<!-- results:start -->", "<!-- results:end -->"
TABLES = ("evaluation/evaluation.md", "bench.md")
CHART = "evaluation/evaluation.png"


def results_block(results_dir: Path, readme_dir: Path) -> str:
    """The generated section body: every table that exists, then the chart."""
    parts = [(results_dir / name).read_text(encoding="utf-8").strip() for name in TABLES
             if (results_dir / name).is_file()]
    if not parts:
        raise FileNotFoundError(f"no {' or '.join(TABLES)} in {results_dir}: run `make results` first")
    chart = results_dir / CHART
    if chart.is_file():
        parts.append(f"![evaluation chart]({chart.resolve().relative_to(readme_dir.resolve()).as_posix()})")
    return "\n\n".join(parts)


def splice(readme: str, block: str) -> str:
    """Replace the text between the markers; both markers must be present, once, in order."""
    if readme.count(START) != 1 or readme.count(END) != 1 or readme.index(START) > readme.index(END):
        raise ValueError(f"README.md must contain {START} and then {END}, once each")
    head, rest = readme.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{block}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results_dir", type=Path, help="folder holding evaluation/ (evaluate.py --out) and bench.md")
    parser.add_argument("--readme", type=Path, default=Path(__file__).resolve().parent.parent / "README.md")
    args = parser.parse_args(argv)
    try:
        text = splice(args.readme.read_text(encoding="utf-8"), results_block(args.results_dir, args.readme.parent))
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    staged = args.readme.with_name(args.readme.name + ".tmp")
    staged.write_text(text, encoding="utf-8")
    os.replace(staged, args.readme)
    print(f"updated the Results section of {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

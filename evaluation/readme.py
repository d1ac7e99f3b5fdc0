"""Splice the tables that evaluate and bench wrote into README.md's Results section.

Why: the README must show the figures the scripts produced, never numbers typed by hand.
Everything between the two marker comments is replaced by the markdown files of the results
folder (in a fixed order) and a link to the evaluation chart; the rest of the README is untouched.
"""

from __future__ import annotations

import os
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


def update_readme(readme: Path, results_dir: Path) -> None:
    """Rewrite `readme`'s Results section from `results_dir`, replacing the file atomically."""
    text = splice(readme.read_text(encoding="utf-8"), results_block(results_dir, readme.parent))
    staged = readme.with_name(readme.name + ".tmp")
    staged.write_text(text, encoding="utf-8")
    os.replace(staged, readme)

"""The one table helper: aligned plain-text tables, GitHub markdown tables and their cell text.

Why one module: the bench report, the evaluation report and the model card each printed tables with
their own helpers, and each formatted or escaped cells its own way under the same name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

MISSING = "–"


def text_table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows as aligned text: first column left-aligned, the others right-aligned, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width)
                      in enumerate(zip(row, widths, strict=True))).rstrip() for row in rows]


def markdown_table(rows: Sequence[Sequence[str]], align: Sequence[str] | None = None) -> list[str]:
    """Rows as a GitHub markdown table, the first row the header; cells are escaped.

    `align` is one separator per column (`---`, `---:`); by default every column is `---`.
    """
    separators = list(align) if align is not None else ["---"] * len(rows[0])
    lines = ["| " + " | ".join(escape_cell(str(cell)) for cell in row) + " |" for row in rows]
    return [lines[0], "| " + " | ".join(separators) + " |", *lines[1:]]


def escape_cell(text: str) -> str:
    """Cell text that cannot break a markdown table: no `|`, no line breaks."""
    return text.replace("|", "\\|").replace("\n", " ")


def format_metric(value: float | None) -> str:
    """A rate or score for a report: three decimals, tiny values in significant digits, `–` for none/NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return f"{value:.3g}" if 0 < abs(value) < 1e-3 else f"{value:.3f}"

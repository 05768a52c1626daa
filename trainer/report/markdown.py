"""Markdown pieces of the report: tables and number formatting (no numbers are typed by hand)."""

from __future__ import annotations

import math
from typing import Any


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: numbers rounded, missing or NaN values as an en dash."""
    if value is None or isinstance(value, bool):
        return "–" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return "–" if math.isnan(value) or math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


class Table:
    """A GitHub-flavoured markdown table; the first column left-aligned, the rest right-aligned."""

    def __init__(self, header: list[str]) -> None:
        self.header = header
        self.rows: list[list[str]] = []

    def add(self, cells: list[Any]) -> None:
        if len(cells) != len(self.header):
            raise ValueError(f"row has {len(cells)} cells, header has {len(self.header)}")
        self.rows.append([c if isinstance(c, str) else fmt(c) for c in cells])

    def render(self) -> str:
        align = ["---"] + ["---:"] * (len(self.header) - 1)
        lines = ["| " + " | ".join(self.header) + " |", "| " + " | ".join(align) + " |"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)

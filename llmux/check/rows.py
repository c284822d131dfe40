"""A check's result (one row of `llmux check`'s table) and the table itself."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["pass", "fail", "skipped"]


@dataclass
class Row:
    """One TST row: what it checks, how it went, the figures it measured, and for a failure or a
    skip the reason. `details` are one line per model where a row covers several."""

    id: str
    name: str
    status: Status
    figures: str = ""
    reason: str = ""
    details: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def passed(figures: str, details: list[str] | None = None) -> Row:
    return Row("", "", "pass", figures=figures, details=details or [])


def failed(reason: str, figures: str = "", details: list[str] | None = None) -> Row:
    return Row("", "", "fail", figures=figures, reason=reason, details=details or [])


def skipped(reason: str, figures: str = "", details: list[str] | None = None) -> Row:
    return Row("", "", "skipped", figures=figures, reason=reason, details=details or [])


def table(rows: list[Row]) -> str:
    """ID, RESULT, CHECK and what it found (the reason first for a failure or a skip), with the
    per-model details indented below their row."""
    header = ("ID", "RESULT", "CHECK", "FIGURES / REASON")
    cells = [header] + [
        (
            row.id,
            row.status,
            row.name,
            "; ".join(part for part in (row.reason, row.figures) if part),
        )
        for row in rows
    ]
    widths = [max(len(cell[i]) for cell in cells) for i in range(3)]
    indent = " " * (sum(widths) + 6)
    lines = []
    for cell, row in zip(cells, [None, *rows]):
        lines.append("  ".join(c.ljust(w) for c, w in zip(cell[:3], widths)) + "  " + cell[3])
        if row is not None:
            lines.extend(f"{indent}- {detail}" for detail in row.details)
    return "\n".join(line.rstrip() for line in lines)


def summary(rows: list[Row]) -> str:
    counts = {status: sum(row.status == status for row in rows) for status in ("pass", "fail")}
    skipped_rows = len(rows) - counts["pass"] - counts["fail"]
    return (
        f"{len(rows)} checks: {counts['pass']} passed, {counts['fail']} failed, "
        f"{skipped_rows} skipped"
    )

"""The bench's output: a text table per section, the targets' PASS/FAIL lines, and the JSON.

Pure: takes the report dictionary (what `bench.run` writes as JSON) and returns text.
"""

from __future__ import annotations

from typing import Any

from bench.stats import Cell


def cell(value: Cell) -> str:
    """A number as a person reads it: three significant figures or so, '-' when missing."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        size = abs(value)
        if size >= 1000:
            return f"{value:,.0f}"
        if size >= 100:
            return f"{value:.0f}"
        if size >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def table(columns: list[str], rows: list[dict[str, Cell]]) -> list[str]:
    """Columns left-aligned for text, right-aligned for numbers."""
    shown = [[cell(row.get(column)) for column in columns] for row in rows]
    widths = [
        max([len(column), *(len(line[i]) for line in shown)]) for i, column in enumerate(columns)
    ]
    numeric = [
        all(isinstance(row.get(column), int | float | None) for row in rows) for column in columns
    ]

    def line(values: list[str]) -> str:
        parts = [
            v.rjust(w) if is_number else v.ljust(w)
            for v, w, is_number in zip(values, widths, numeric)
        ]
        return "  ".join(parts).rstrip()

    return [line(columns), line(["-" * w for w in widths]), *(line(values) for values in shown)]


def machine_lines(machine: dict[str, Any]) -> list[str]:
    return [f"  {key}: {value}" for key, value in machine.items()]


def render(report: dict[str, Any]) -> str:
    """The whole report as text."""
    out = ["llmux bench", "", "machine:", *machine_lines(report["machine"])]
    settings = ", ".join(f"{k} {v}" for k, v in report["settings"].items())
    out += ["", f"settings: {settings}"]
    for section in report["sections"].values():
        out += ["", f"== {section['title']}"]
        if section.get("error"):
            out.append(f"  not measured: {section['error']}")
        if section["rows"]:
            out += ["  " + line for line in table(section["columns"], section["rows"])]
        figures = {k: v for k, v in section["figures"].items() if v is not None}
        if figures:
            out.append("  " + ", ".join(f"{k} {cell(v)}" for k, v in figures.items()))
        out += [f"  note: {note}" for note in section["notes"]]
    out += ["", "targets (issue #16; reported, not asserted):"]
    out += ["  " + verdict["line"] for verdict in report["targets"]]
    out += ["", f"bench took {report['elapsed_s']:.0f} s"]
    return "\n".join(out)

"""Medians, percentiles, ratios and the Section every part of the bench reports as.

Pure: no I/O, no clock. A figure that could not be measured is None, never a made-up number, and
every helper passes None through.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")
Number = float | int
Cell = str | float | int | None


def median(values: Iterable[Number | None]) -> float | None:
    """The median of the values that were measured; None when none was."""
    measured = [float(v) for v in values if v is not None and math.isfinite(v)]
    return statistics.median(measured) if measured else None


def percentile(values: Iterable[Number | None], share: float) -> float | None:
    """The `share` percentile (0..1), linearly interpolated between the nearest ranks."""
    ordered = sorted(float(v) for v in values if v is not None and math.isfinite(v))
    if not ordered:
        return None
    position = share * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ratio(numerator: Number | None, denominator: Number | None) -> float | None:
    """numerator / denominator, None when either is missing or the denominator is zero."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return float(numerator) / float(denominator)


def difference(a: Number | None, b: Number | None) -> float | None:
    if a is None or b is None:
        return None
    return float(a) - float(b)


def interval(
    statistic: Callable[[list[float], list[float]], float | None],
    a: Iterable[Number | None],
    b: Iterable[Number | None],
    *,
    share: float = 0.9,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float] | None:
    """The central `share` of `statistic(a, b)` over bootstrap resamples of each side's
    measurements (drawn with replacement, each side on its own): how far this run's rounds let
    the figure move. Seeded, so a report is reproducible from its rounds. None with fewer than
    two measurements a side."""
    a_values = [float(v) for v in a if v is not None and math.isfinite(v)]
    b_values = [float(v) for v in b if v is not None and math.isfinite(v)]
    if len(a_values) < 2 or len(b_values) < 2:
        return None
    draw = random.Random(seed).choices
    found = [
        value
        for _ in range(resamples)
        if (value := statistic(draw(a_values, k=len(a_values)), draw(b_values, k=len(b_values))))
        is not None
    ]
    tail = (1 - share) / 2
    low, high = percentile(found, tail), percentile(found, 1 - tail)
    return None if low is None or high is None else (low, high)


def ratio_of_medians(a: list[float], b: list[float]) -> float | None:
    return ratio(median(a), median(b))


def difference_of_medians(a: list[float], b: list[float]) -> float | None:
    return difference(median(a), median(b))


def interleave(contenders: Sequence[T], round_index: int) -> list[T]:
    """The order of one round: the contenders rotated by the round's index, so that no one of
    them is always first (first after an idle pause, or right after another's load)."""
    if not contenders:
        return []
    shift = round_index % len(contenders)
    return [*contenders[shift:], *contenders[:shift]]


@dataclass
class Section:
    """One part of the bench: a table (`columns` name the keys of each row, in order), the
    named `figures` the targets and the JSON read, and notes that say how to read it."""

    key: str
    title: str
    columns: list[str]
    rows: list[dict[str, Cell]] = field(default_factory=list)
    figures: dict[str, float | None] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "columns": self.columns,
            "rows": self.rows,
            "figures": self.figures,
            "notes": self.notes,
            "error": self.error,
        }


def numbers_in(section: dict[str, Any]) -> list[float]:
    """Every number a section's JSON carries in its rows and figures (for checking that a
    section measured something)."""
    found: list[float] = []
    for row in section.get("rows", []):
        found.extend(
            float(v) for v in row.values() if isinstance(v, int | float) and not isinstance(v, bool)
        )
    figures = section.get("figures", {}).values()
    found.extend(float(v) for v in figures if isinstance(v, int | float))
    return found

"""Order statistics, computed here so the harness needs no statistics package.

Percentiles use linear interpolation between closest ranks (the "R-7" definition,
what ``numpy.percentile`` does by default): the p-th percentile of sorted values
``x[0..n-1]`` is ``x[i] + (x[i+1] - x[i]) * f`` where ``i + f = (n - 1) * p / 100``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

__all__ = ["Summary", "percentile", "summarize"]


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0 <= p <= 100) of ``values``, interpolated linearly.

    Raises:
        ValueError: ``values`` is empty or ``p`` is outside [0, 100].
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be within [0, 100] (got {p})")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclasses.dataclass(frozen=True)
class Summary:
    """The median, min and max of one metric over the rounds, and how many rounds."""

    median: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict[str, float]:
        """For the JSON report."""
        return {"median": self.median, "min": self.low, "max": self.high, "n": self.n}


def summarize(values: Iterable[float]) -> Summary | None:
    """Median, min and max of ``values``; ``None`` when there are none."""
    collected = list(values)
    if not collected:
        return None
    return Summary(percentile(collected, 50), min(collected), max(collected), len(collected))

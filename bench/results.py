"""What one measurement returns, and the metrics derived from it.

A measurement records, for every command, how long its caller waited for it
(``perf_counter`` before the call and after it returned), plus the completion times of
the first caller's commands (W1's slices are cut from those). Throughput is commands
divided by the wall time from the start of the timed phase until the last caller
finished.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from .stats import percentile

__all__ = ["Timed", "Trial", "Verdict", "plan_metrics"]


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Whether a measurement left exactly the state its plan says (balances, events)."""

    ok: bool
    detail: str

    @classmethod
    def of(cls, problems: Sequence[str], checked: str) -> Verdict:
        """OK when there are no ``problems``; the detail names the first few otherwise."""
        if not problems:
            return cls(True, checked)
        shown = "; ".join(problems[:3])
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        return cls(False, f"{len(problems)} wrong: {shown}{more}")


@dataclasses.dataclass(frozen=True)
class Timed:
    """The raw timings of one plan run.

    Attributes:
        elapsed: seconds from the start of the timed phase until every caller finished.
        latencies: seconds each command was awaited, all callers together.
        marks: the first caller's completion times, seconds after the start.
        retries: commands the peer had to retry after an optimistic-concurrency conflict.
    """

    elapsed: float
    latencies: list[float]
    marks: list[float]
    retries: int = 0

    @classmethod
    def of(
        cls,
        started: float,
        elapsed: float,
        latencies: Sequence[Sequence[float]],
        marks: Sequence[float],
        retries: int = 0,
    ) -> Timed:
        """From per-caller latencies and absolute completion times."""
        flat = [latency for per_caller in latencies for latency in per_caller]
        return cls(elapsed, flat, [mark - started for mark in marks], retries)


@dataclasses.dataclass
class Trial:
    """One library's result for one (workload, store) in one round.

    Attributes:
        metrics: metric name -> value (see :data:`bench.report.METRICS`).
        verdict: whether the final state was the expected one.
    """

    metrics: dict[str, float]
    verdict: Verdict


def plan_metrics(timed: Timed, *, slice_size: int | None = None) -> dict[str, float]:
    """Throughput, latency percentiles and (with ``slice_size``) per-slice throughput.

    Slice k (from 1) covers the first caller's commands ``(k-1)*slice_size`` to
    ``k*slice_size - 1``; its rate is ``slice_size`` over the time from the completion of
    the previous slice's last command (or the start) to the completion of its own last.
    ``last_over_first`` is the last full slice's rate divided by the first's.
    """
    commands = len(timed.latencies)
    metrics: dict[str, float] = {
        "commands": commands,
        "throughput": commands / timed.elapsed if timed.elapsed > 0 else float("inf"),
        "p50_ms": percentile(timed.latencies, 50) * 1000,
        "p99_ms": percentile(timed.latencies, 99) * 1000,
        "p999_ms": percentile(timed.latencies, 99.9) * 1000,
        "retries": timed.retries,
    }
    if slice_size:
        rates: list[float] = []
        previous = 0.0
        for end in range(slice_size, len(timed.marks) + 1, slice_size):
            finished = timed.marks[end - 1]
            span = finished - previous
            rates.append(slice_size / span if span > 0 else float("inf"))
            previous = finished
        for k, rate in enumerate(rates, start=1):
            metrics[f"slice_{k}"] = rate
        if rates:
            metrics["last_over_first"] = rates[-1] / rates[0]
    return metrics

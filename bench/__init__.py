"""Benchmarks: trio_es against its Python peer, the ``eventsourcing`` package (v9.5).

Run ``python -m bench --quick`` (a few minutes) or ``python -m bench --full`` (20-25
minutes on a 2-core machine). Each workload runs trio_es and the peer back to back,
alternating which goes first, for several rounds, on each store (memory, SQLite,
PostgreSQL), and reports the median, min and max of every metric with the ratio of the
medians. The markdown table is printed and written with the raw JSON to
``bench/results/``. See ``docs/benchmarks.md`` and :mod:`bench.workloads`.
"""

from __future__ import annotations

from .report import Report
from .runner import run
from .settings import Settings

__all__ = ["Report", "Settings", "run"]

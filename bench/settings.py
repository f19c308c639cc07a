"""What a benchmark run does: its mode's sizes, the stores and workloads it covers.

Three modes share one code path and differ only in sizes and rounds:

- ``smoke``: tiny sizes, one round; proves the harness works (the test suite runs it).
- ``quick``: the issue's sizes, 3 rounds; a few minutes on a 2-core machine.
- ``full``: the same sizes with more concurrent work, 5 rounds (C1: 3 rounds over
  1,000,000 events); 20-25 minutes on a 2-core machine.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Final, Literal

__all__ = [
    "DEFAULT_POSTGRES_DSN",
    "MODES",
    "STORES",
    "WORKLOADS",
    "Mode",
    "Settings",
    "Sizes",
]

Mode = Literal["smoke", "quick", "full"]
MODES: Final[tuple[Mode, ...]] = ("smoke", "quick", "full")
#: Every store, in report order.
STORES: Final = ("memory", "sqlite", "postgres")
#: Every workload, in report order; ``floor`` is the raw-database baseline.
WORKLOADS: Final = ("W1", "W2", "W3", "R1", "C1", "S1", "floor")
#: The server benchmarks use unless told otherwise (a maintenance database: the
#: harness creates a database of its own with a random name there and drops it after).
DEFAULT_POSTGRES_DSN: Final = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much work each workload does.

    Attributes:
        rounds: how many times each (workload, store) pair runs each library.
        w1_commands: W1's sequential deposits on one aggregate (after its opening).
        w1_slice: W1 reports the throughput of each slice of this many commands.
        w2_aggregates: W2's aggregates.
        w2_commands_per_aggregate: W2's commands per aggregate (the first opens it).
        w3_callers: W3's concurrent callers (Trio tasks; threads for the peer).
        w3_aggregates: W3's aggregates, chosen with a Zipf-like skew.
        w3_commands: W3's deposits in total, spread evenly over the callers.
        w3_zipf_s: the skew's exponent: aggregate of rank k is chosen with weight 1/k^s.
        r1_events: R1's stream length (events of the one aggregate loaded cold).
        r1_snapshot_every: R1's snapshot interval in events (both libraries).
        floor_single_rows: rows the floor inserts one per transaction.
        floor_batched_rows: rows the floor inserts in batches.
        floor_batch: rows per transaction of the batched floor.
        floor_round_trips: bare-Trio command round trips the floor times (see
            :func:`bench.floor.round_trip_floor`).
        c1_events: C1's events in the store before its projection starts catching up.
        c1_accounts: C1's accounts (each opened, then deposits dealt round-robin).
        c1_fill_batch: C1 writes its events (untimed) in transactions of this many.
        c1_batch: the most events one batch delivers to C1's projection (trio_es's
            ``batch_size``; the peer's subscription reads pages of 500, a fixed size).
        c1_rounds: C1's rounds (fewer than ``rounds`` in ``full``: each is long).
        s1_aggregates: S1's new aggregates, one command each, all live at the end (memory
            store only; see :mod:`bench.scale`).
        s1_rounds: S1's rounds (each runs three fresh processes; at 100,000 aggregates
            one round takes one to three minutes on a 2-core machine).
    """

    rounds: int
    w1_commands: int
    w1_slice: int
    w2_aggregates: int
    w2_commands_per_aggregate: int
    w3_callers: int
    w3_aggregates: int
    w3_commands: int
    w3_zipf_s: float
    r1_events: int
    r1_snapshot_every: int
    floor_single_rows: int
    floor_batched_rows: int
    floor_batch: int
    floor_round_trips: int
    c1_events: int
    c1_accounts: int
    c1_fill_batch: int
    c1_batch: int
    c1_rounds: int
    s1_aggregates: int
    s1_rounds: int

    @classmethod
    def for_mode(cls, mode: Mode) -> Sizes:
        """The sizes of ``mode``."""
        if mode == "smoke":
            return cls(
                rounds=1,
                w1_commands=100,
                w1_slice=20,
                w2_aggregates=20,
                w2_commands_per_aggregate=4,
                w3_callers=8,
                w3_aggregates=20,
                w3_commands=160,
                w3_zipf_s=0.99,
                r1_events=300,
                r1_snapshot_every=50,
                floor_single_rows=50,
                floor_batched_rows=256,
                floor_batch=64,
                floor_round_trips=500,
                c1_events=2_000,
                c1_accounts=100,
                c1_fill_batch=500,
                c1_batch=500,
                c1_rounds=1,
                s1_aggregates=2_000,
                s1_rounds=1,
            )
        quick = cls(
            rounds=3,
            w1_commands=5_000,
            w1_slice=500,
            w2_aggregates=1_000,
            w2_commands_per_aggregate=10,
            w3_callers=64,
            w3_aggregates=1_000,
            w3_commands=6_400,
            w3_zipf_s=0.99,
            r1_events=10_000,
            r1_snapshot_every=100,
            floor_single_rows=1_000,
            floor_batched_rows=10_240,
            floor_batch=64,
            floor_round_trips=20_000,
            c1_events=100_000,
            c1_accounts=1_000,
            c1_fill_batch=10_000,
            c1_batch=500,
            c1_rounds=3,
            s1_aggregates=100_000,
            s1_rounds=1,
        )
        if mode == "quick":
            return quick
        return dataclasses.replace(
            quick,
            rounds=5,
            w3_commands=16_000,
            floor_batched_rows=25_600,
            c1_events=1_000_000,
            s1_rounds=3,
        )


@dataclasses.dataclass(frozen=True)
class Settings:
    """One benchmark run.

    Attributes:
        mode: ``smoke``, ``quick`` or ``full``.
        sizes: the work each workload does (from the mode unless overridden).
        stores: the stores to measure, a subset of :data:`STORES`.
        workloads: the workloads to run, a subset of :data:`WORKLOADS`.
        postgres_dsn: the PostgreSQL server (its maintenance database).
        postgres_required: fail instead of skipping when the server does not answer
            (set when ``postgres`` was asked for explicitly).
        peer: run the peer library (it is skipped anyway when not installed).
        seed: seeds W3's Zipf-like choice of aggregates and its amounts.
    """

    mode: Mode = "quick"
    sizes: Sizes = dataclasses.field(default_factory=lambda: Sizes.for_mode("quick"))
    stores: tuple[str, ...] = STORES
    workloads: tuple[str, ...] = WORKLOADS
    postgres_dsn: str = dataclasses.field(
        default_factory=lambda: os.environ.get(
            "TRIO_ES_BENCH_POSTGRES_DSN",
            os.environ.get("TRIO_ES_TEST_POSTGRES_DSN", DEFAULT_POSTGRES_DSN),
        )
    )
    postgres_required: bool = False
    peer: bool = True
    seed: int = 20_240_601

    @classmethod
    def for_mode(cls, mode: Mode, **changes: object) -> Settings:
        """The settings of ``mode``, with ``changes`` (field names) applied."""
        settings = cls(mode=mode, sizes=Sizes.for_mode(mode))
        return dataclasses.replace(settings, **changes)  # type: ignore[arg-type]

    def with_rounds(self, rounds: int) -> Settings:
        """These settings with ``rounds`` rounds per workload (C1 and S1 included)."""
        sizes = dataclasses.replace(self.sizes, rounds=rounds, c1_rounds=rounds, s1_rounds=rounds)
        return dataclasses.replace(self, sizes=sizes)

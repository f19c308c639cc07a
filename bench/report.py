"""The report: raw trials, their summaries, the targets, as markdown and as JSON.

Every number in the tables is the median over the rounds, with the min and max in
parentheses. Ratios are ratios of medians, oriented so that a value above 1 means
trio_es did better: throughput (and C1's catch-up rates) is trio_es / peer, latencies
and load times are peer / trio_es.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Literal

from .floor import LOAD_TRIALS
from .results import Trial
from .settings import STORES, Settings
from .stats import Summary, summarize

__all__ = ["METRICS", "Metric", "Report", "Target"]

LIBRARIES: Final = ("trio_es", "peer")
#: Display names of the workloads, in report order (R1s is R1 with snapshots).
TITLES: Final = {
    "W1": "W1 one long stream",
    "W2": "W2 many streams, one caller",
    "W3": "W3 many streams, many callers",
    "R1": "R1 cold load",
    "R1s": "R1 cold load, snapshots",
    "C1": "C1 catch-up",
    "S1": "S1 many live aggregates",
}


@dataclasses.dataclass(frozen=True)
class Metric:
    """One row of the results table.

    Attributes:
        workload: the workload it belongs to.
        key: its key in :attr:`Trial.metrics`.
        label: what the table calls it.
        unit: ``cmd/s``, ``events/s``, ``ms``, ``x`` (a ratio) or ``""`` (a count).
        higher_is_better: orientation of the trio_es advantage.
        compare: whether a trio_es/peer ratio is meaningful.
    """

    workload: str
    key: str
    label: str
    unit: str
    higher_is_better: bool = True
    compare: bool = True


METRICS: Final = (
    Metric("W1", "throughput", "throughput", "cmd/s"),
    Metric("W1", "last_over_first", "last/first slice rate", "x"),
    Metric("W2", "throughput", "throughput", "cmd/s"),
    Metric("W3", "throughput", "throughput", "cmd/s"),
    Metric("W3", "p50_ms", "p50 latency", "ms", higher_is_better=False),
    Metric("W3", "p99_ms", "p99 latency", "ms", higher_is_better=False),
    Metric("W3", "p999_ms", "p99.9 latency", "ms", higher_is_better=False),
    Metric("W3", "retries", "conflicts retried by the caller", "", compare=False),
    Metric("R1", "load_ms", "first load, no snapshots", "ms", higher_is_better=False),
    Metric("R1s", "load_ms", "first load, snapshots", "ms", higher_is_better=False),
    Metric("C1", "rate", "projection catch-up", "events/s"),
    Metric("C1", "read_rate", "subscription read", "events/s"),
    # S1 compares trio_es with bare Trio in the same round (bench.scale), not with the peer.
    Metric("S1", "aggregates", "live aggregates", "", compare=False),
    Metric("S1", "rss_per_aggregate", "runtime RSS per live aggregate", "B", compare=False),
    Metric("S1", "rss_bare", "bare Trio: RSS per task", "B", compare=False),
    Metric("S1", "rss_over_bare", "runtime RSS above a bare task", "B", compare=False),
    Metric("S1", "rss_domain", "domain state and events per aggregate", "B", compare=False),
    Metric("S1", "tasks_per_aggregate", "Trio tasks per live aggregate", "", compare=False),
    Metric("S1", "visits", "first visits", "visits/s", compare=False),
    Metric("S1", "bare_visits", "bare Trio: first visits", "visits/s", compare=False),
    Metric("S1", "shutdown_ms", "shutdown", "ms", compare=False),
    Metric("S1", "bare_shutdown_ms", "bare Trio: cancelling the tasks", "ms", compare=False),
    Metric("S1", "shutdown_over_bare", "shutdown / bare cancel", "x", compare=False),
    Metric("S1", "warnings", "warnings logged", "", compare=False),
)


@dataclasses.dataclass(frozen=True)
class Target:
    """One of the issue's targets, evaluated on this run's medians.

    Attributes:
        name: what is promised.
        measured: the measured value, as shown.
        goal: the goal, as shown.
        status: ``met``, ``MISSED`` or ``n/a`` (not measured in this run).
        margin: how far above (+) or below (-) the goal, relative to it.
    """

    name: str
    measured: str
    goal: str
    status: Literal["met", "MISSED", "n/a"]
    margin: str


def _number(value: float, unit: str) -> str:
    if math.isinf(value) or math.isnan(value):
        return str(value)
    if unit == "x":
        return f"{value:.2f}"
    if unit == "ms":
        if value >= 100:
            return f"{value:,.0f}"
        if value >= 10:
            return f"{value:.1f}"
        if value >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    return f"{value:,.0f}"


def _cell(summary: Summary | None, unit: str) -> str:
    if summary is None:
        return "-"
    median = _number(summary.median, unit)
    if summary.n == 1:
        return median
    return f"{median} ({_number(summary.low, unit)}\u2013{_number(summary.high, unit)})"


def _margin(measured: float, goal: float, at_least: bool) -> tuple[bool, str]:
    met = measured >= goal if at_least else measured <= goal
    if goal == 0 or measured == 0:
        return met, ""
    relative = measured / goal - 1 if at_least else goal / measured - 1
    return met, f"{relative:+.0%}"


@dataclasses.dataclass
class Report:
    """Everything one run measured.

    Attributes:
        settings: what was run.
        machine: the machine and software (see :func:`bench.machine.describe`).
        notes: what was skipped and why, and other remarks.
        trials: workload -> store -> library -> one trial per round.
        floor: store -> method -> rows/s per round.
        floor_loads: store -> method -> load time (ms) per round (see
            :func:`bench.floor.sqlite_load_floor_from_trio`).
    """

    settings: Settings
    machine: dict[str, str] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    trials: dict[str, dict[str, dict[str, list[Trial]]]] = dataclasses.field(default_factory=dict)
    floor: dict[str, dict[str, list[float]]] = dataclasses.field(default_factory=dict)
    floor_loads: dict[str, dict[str, list[float]]] = dataclasses.field(default_factory=dict)
    started_at: str = ""
    finished_at: str = ""
    duration_s: float = 0.0

    @classmethod
    def start(cls, settings: Settings) -> Report:
        """An empty report, stamped with the current UTC time."""
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        return cls(settings, started_at=now)

    def finish(self) -> None:
        """Stamp the end time."""
        self.finished_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")

    def add(self, workload: str, store: str, library: str, trial: Trial) -> None:
        """Record one round of one library."""
        per_store = self.trials.setdefault(workload, {}).setdefault(store, {})
        per_store.setdefault(library, []).append(trial)

    def add_floor(self, store: str, method: str, rate: float) -> None:
        """Record one round of one floor method (rows per second)."""
        self.floor.setdefault(store, {}).setdefault(method, []).append(rate)

    def add_floor_load(self, store: str, method: str, load_ms: float) -> None:
        """Record one round of one load floor method (milliseconds, lower is better)."""
        self.floor_loads.setdefault(store, {}).setdefault(method, []).append(load_ms)

    # -- reading --

    def stores(self) -> list[str]:
        """The stores that have results, in report order."""
        seen = {store for per_store in self.trials.values() for store in per_store}
        seen |= set(self.floor)
        return [store for store in STORES if store in seen]

    def summary(self, workload: str, store: str, library: str, key: str) -> Summary | None:
        """Median/min/max of ``key`` over the rounds that measured it."""
        trials = self.trials.get(workload, {}).get(store, {}).get(library, [])
        return summarize(trial.metrics[key] for trial in trials if key in trial.metrics)

    def median(self, workload: str, store: str, library: str, key: str) -> float | None:
        """The median of ``key``, or ``None`` when it was not measured."""
        summary = self.summary(workload, store, library, key)
        return None if summary is None else summary.median

    def state(self, workload: str, store: str) -> str:
        """``ok`` when every run of this cell left the expected state, else what went wrong."""
        problems = []
        for library, trials in self.trials.get(workload, {}).get(store, {}).items():
            for trial in trials:
                if not trial.verdict.ok:
                    problems.append(f"{library}: {trial.verdict.detail}")
        return "ok" if not problems else "WRONG: " + "; ".join(problems[:2])

    def all_verified(self) -> bool:
        """Whether every run of every library left exactly the state its plan implies."""
        return all(
            trial.verdict.ok
            for per_store in self.trials.values()
            for per_library in per_store.values()
            for trials in per_library.values()
            for trial in trials
        )

    def rows(self) -> list[dict[str, Any]]:
        """The results table: one row per (workload, store, metric) that has data."""
        rows = []
        for workload in TITLES:
            for store in STORES:
                for metric in METRICS:
                    if metric.workload == workload:
                        row = self._row(metric, store)
                        if row is not None:
                            rows.append(row)
        return rows

    def _row(self, metric: Metric, store: str) -> dict[str, Any] | None:
        summaries = {
            library: self.summary(metric.workload, store, library, metric.key)
            for library in LIBRARIES
        }
        if all(summary is None for summary in summaries.values()):
            return None
        ours, theirs = summaries["trio_es"], summaries["peer"]
        advantage = None
        if metric.compare and ours is not None and theirs is not None:
            numerator, denominator = (
                (ours.median, theirs.median)
                if metric.higher_is_better
                else (theirs.median, ours.median)
            )
            advantage = numerator / denominator if denominator else math.inf
        return {
            "workload": metric.workload,
            "store": store,
            "metric": metric.label,
            "key": metric.key,
            "unit": metric.unit,
            "trio_es": None if ours is None else ours.as_dict(),
            "peer": None if theirs is None else theirs.as_dict(),
            "trio_es_advantage": advantage,
            "state": self.state(metric.workload, store),
            "_summaries": summaries,
        }

    def floor_method(self) -> str:
        """The batched floor method, the one the W3 target compares with."""
        return f"{self.settings.sizes.floor_batch} rows/tx"

    def targets(self) -> list[Target]:
        """The issue's targets, evaluated on this run's medians."""
        targets: list[Target] = []

        def add(
            name: str,
            measured: float | None,
            goal: float,
            *,
            at_least: bool,
            show: Callable[[float], str],
            why_missing: str = "not measured in this run",
        ) -> None:
            if measured is None:
                targets.append(Target(name, why_missing, show(goal), "n/a", ""))
                return
            met, margin = _margin(measured, goal, at_least)
            sign = ">=" if at_least else "<="
            targets.append(
                Target(
                    name, show(measured), f"{sign} {show(goal)}", "met" if met else "MISSED", margin
                )
            )

        def ratio(workload: str, store: str, key: str, higher: bool = True) -> float | None:
            ours = self.median(workload, store, "trio_es", key)
            theirs = self.median(workload, store, "peer", key)
            if ours is None or theirs is None or ours == 0:
                return None
            return ours / theirs if higher else theirs / ours

        def times(value: float) -> str:
            return f"{value:.2f}x"

        stores = self.stores()
        slice_size = self.settings.sizes.w1_slice
        for store in stores:
            add(
                f"W1 {store}: last {slice_size}-command slice at >= 80% of the first slice's rate",
                self.median("W1", store, "trio_es", "last_over_first"),
                0.8,
                at_least=True,
                show=lambda v: f"{v:.0%}",
            )
        # Issue 10's ratios against the peer, per store.
        goals = {
            "W1": {"memory": 2.0, "sqlite": 1.0, "postgres": 1.2},
            "W2": {"memory": 2.0, "sqlite": 1.0, "postgres": 1.2},
            "W3": {"memory": 8.0, "sqlite": 8.0, "postgres": 6.0},
        }
        for workload, per_store in goals.items():
            for store, goal in per_store.items():
                if store in stores:
                    add(
                        f"{workload} {store}: throughput vs the peer",
                        ratio(workload, store, "throughput"),
                        goal,
                        at_least=True,
                        show=times,
                    )
        if "sqlite" in stores:
            w2 = self.median("W2", "sqlite", "trio_es", "throughput")
            single = summarize(self.floor.get("sqlite", {}).get("1 row/tx", []))
            add(
                "W2 sqlite: commands/s vs raw sqlite3 inserts, 1 row/tx",
                None if w2 is None or single is None else w2 / single.median,
                0.9,
                at_least=True,
                show=lambda v: f"{v:.0%}",
            )
        for store in stores:
            name = f"W3 {store}: p99 latency better than the peer's"
            peer_p99 = self.median("W3", store, "peer", "p99_ms")
            if peer_p99 is None:
                targets.append(Target(name, "peer not measured", "< peer p99", "n/a", ""))
            else:
                add(
                    name,
                    self.median("W3", store, "trio_es", "p99_ms"),
                    peer_p99,
                    at_least=False,
                    show=lambda v: f"{v:.2f} ms",
                )
        for workload, kind in (("R1", "without snapshots"), ("R1s", "with snapshots")):
            for store in stores:
                add(
                    f"R1 {store}: cold load {kind} vs the peer",
                    ratio(workload, store, "load_ms", higher=False),
                    1.0,
                    at_least=True,
                    show=times,
                )
        if "S1" in self.trials:
            n = f"{self.settings.sizes.s1_aggregates:,}"
            add(
                f"S1 memory: runtime RSS per live aggregate above a bare Trio task ({n})",
                self.median("S1", "memory", "trio_es", "rss_over_bare"),
                2048.0,
                at_least=False,
                show=lambda v: f"{v:,.0f} B",
            )
            add(
                f"S1 memory: first visits per second ({n}, one caller awaiting each)",
                self.median("S1", "memory", "trio_es", "visits"),
                20_000.0,
                at_least=True,
                show=lambda v: f"{v:,.0f}/s",
            )
            add(
                f"S1 memory: shutting down {n} live aggregates vs cancelling {n} bare tasks",
                self.median("S1", "memory", "trio_es", "shutdown_over_bare"),
                2.0,
                at_least=False,
                show=times,
            )
            add(
                "S1 memory: warnings logged at shutdown",
                self.median("S1", "memory", "trio_es", "warnings"),
                0.0,
                at_least=False,
                show=lambda v: f"{v:.0f}",
            )
        if "sqlite" in stores:
            w3 = self.median("W3", "sqlite", "trio_es", "throughput")
            floor = summarize(self.floor.get("sqlite", {}).get(self.floor_method(), []))
            add(
                f"W3 sqlite: events/s vs raw sqlite3 inserts, {self.floor_method()}",
                None if w3 is None or floor is None else w3 / floor.median,
                0.3,
                at_least=True,
                show=lambda v: f"{v:.0%}",
            )
        return targets

    # -- writing --

    def markdown(self) -> str:
        """The report as markdown: results, W1 slices, floor, targets, notes, machine."""
        sizes = self.settings.sizes
        c1_rounds = (
            f" (C1: {sizes.c1_rounds})"
            if "C1" in self.settings.workloads and sizes.c1_rounds != sizes.rounds
            else ""
        )
        lines = [
            f"# trio_es benchmarks: `--{self.settings.mode}`",
            "",
            f"Run {self.started_at} ({self.duration_s:,.0f} s), {sizes.rounds} round(s) per "
            f"workload and store{c1_rounds}, trio_es and the peer (`eventsourcing` "
            f"{self.machine.get('eventsourcing', '?')}) alternating which goes first.",
            "Each cell: median (min\u2013max). *trio_es advantage* is the ratio of the medians, "
            "oriented so that > 1 means trio_es did better (throughput and catch-up rates: "
            "trio_es / peer; latency and load time: peer / trio_es). *state* is `ok` when "
            "every run of both libraries left exactly the expected balances and event counts "
            "(C1: balances, events processed, and the checkpoint at the head).",
            "",
            "| workload | store | metric | trio_es | peer | trio_es advantage | state |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row in self.rows():
            summaries, unit = row["_summaries"], row["unit"]
            metric = f"{row['metric']} ({unit})" if unit else row["metric"]
            advantage = row["trio_es_advantage"]
            shown = "-" if advantage is None else f"{advantage:.2f}x"
            lines.append(
                f"| {TITLES[row['workload']]} | {row['store']} | {metric} "
                f"| {_cell(summaries['trio_es'], unit)} | {_cell(summaries['peer'], unit)} "
                f"| {shown} | {row['state']} |"
            )
        lines += self._slices_markdown()
        lines += self._floor_markdown()
        lines += [
            "",
            "## Targets",
            "",
            "| target | measured | goal | result |",
            "| --- | --- | --- | --- |",
        ]
        for target in self.targets():
            result = target.status + (f" ({target.margin})" if target.margin else "")
            lines.append(f"| {target.name} | {target.measured} | {target.goal} | {result} |")
        lines += ["", "## Workloads", ""]
        lines += [
            f"- W1: one account, {sizes.w1_commands:,} sequential deposits after its opening; "
            f"throughput per slice of {sizes.w1_slice:,}.",
            f"- W2: {sizes.w2_aggregates:,} accounts x {sizes.w2_commands_per_aggregate} "
            "commands (open, then deposits), visited round-robin by one caller, each awaited.",
            f"- W3: {sizes.w3_callers} concurrent callers (Trio tasks; peer: threads), "
            f"{sizes.w3_commands:,} deposits over {sizes.w3_aggregates:,} accounts opened "
            f"beforehand, Zipf-like skew s={sizes.w3_zipf_s} (seed {self.settings.seed}).",
            f"- R1: first load of one account with {sizes.r1_events:,} events by a fresh "
            f"system / application; with snapshots every {sizes.r1_snapshot_every} events.",
            f"- C1: {sizes.c1_events:,} events in the store ({sizes.c1_accounts:,} accounts "
            "opened, then deposits round-robin; written untimed in transactions of "
            f"{sizes.c1_fill_batch:,}), {sizes.c1_rounds} round(s); a balance projection that "
            "never ran catches up from the first event until its checkpoint (peer: its "
            "tracking position) is at the head: trio_es `Projection` under "
            f"`open_eventsourcing` (batches of up to {sizes.c1_batch}, checkpoint stored in "
            "the store's database), peer `ProjectionRunner` with an in-memory view; then a "
            "raw read of the same events (trio_es `subscribe`, peer "
            "`ApplicationSubscription`) folded into balances. Both read models are in memory.",
            f"- S1 (memory store): one caller awaits `OpenAccount` on each of "
            f"{sizes.s1_aggregates:,} new accounts (every command a first visit), "
            f"{sizes.s1_rounds} round(s); then all are live at once (idle timeout of an hour) "
            "and the system is shut down. Baseline in the same round: bare Trio, one task per "
            "memory channel started the same way and sent one message each, then the "
            "nursery cancelled. Each side runs in a fresh process; RSS from /proc/self/statm "
            "after gc.collect(). Runtime RSS per aggregate excludes the domain: the growth of "
            "a third process that commits the same events to a MemoryStore and keeps one "
            "entity per account is subtracted. Warnings: records at WARNING or above on the "
            "`trio_es` loggers and Python warnings during the run.",
            f"- floor: raw inserts of the same rows, 1 per transaction "
            f"({sizes.floor_single_rows:,} rows) and {sizes.floor_batch} per transaction "
            f"({sizes.floor_batched_rows:,} rows); SQLite's load floor: R1's stream "
            f"({sizes.r1_events:,} events, a snapshot every {sizes.r1_snapshot_every}) read "
            "with plain sqlite3 in one hop from Trio to a fresh, idle worker thread (the "
            "latest snapshot, the events after it, decoded), the median of "
            f"{LOAD_TRIALS} fresh starts per round.",
        ]
        if self.notes:
            lines += ["", "## Notes", ""]
            lines += [f"- {note}" for note in self.notes]
        lines += ["", "## Machine", "", "| | |", "| --- | --- |"]
        lines += [f"| {key} | {value} |" for key, value in self.machine.items()]
        return "\n".join(lines) + "\n"

    def _slices_markdown(self) -> list[str]:
        rates: list[tuple[str, str, list[float]]] = []
        for store in STORES:
            for library in LIBRARIES:
                trials = self.trials.get("W1", {}).get(store, {}).get(library, [])
                keys = sorted(
                    {key for trial in trials for key in trial.metrics if key.startswith("slice_")},
                    key=lambda key: int(key.removeprefix("slice_")),
                )
                medians = [self.median("W1", store, library, key) for key in keys]
                if medians:
                    rates.append((store, library, [m for m in medians if m is not None]))
        if not rates:
            return []
        width = max(len(values) for _, _, values in rates)
        lines = [
            "",
            f"## W1: throughput per slice of {self.settings.sizes.w1_slice:,} commands "
            "(cmd/s, medians)",
            "",
            "| store | library | " + " | ".join(str(k) for k in range(1, width + 1)) + " |",
            "| --- | --- | " + " | ".join("---" for _ in range(width)) + " |",
        ]
        for store, library, values in rates:
            cells = [f"{value:,.0f}" for value in values] + [""] * (width - len(values))
            lines.append(f"| {store} | {library} | " + " | ".join(cells) + " |")
        return lines

    def _floor_markdown(self) -> list[str]:
        if not self.floor:
            return []
        lines = [
            "",
            "## Floor: the database alone, same rows (rows/s), and a bare Trio round trip (/s)",
            "",
            "| store | method | rate | trio_es W1 cmd/s as a share |"
            " trio_es W3 events/s as a share | peer W1 cmd/s as a share |",
            "| --- | --- | --- | --- | --- | --- |",
        ]

        def share(value: float | None, summary: Summary | None) -> str:
            return "-" if value is None or summary is None else f"{value / summary.median:.0%}"

        for store in STORES:
            for method, rates in self.floor.get(store, {}).items():
                summary = summarize(rates)
                w1 = self.median("W1", store, "trio_es", "throughput")
                w3 = self.median("W3", store, "trio_es", "throughput")
                peer = self.median("W1", store, "peer", "throughput")
                lines.append(
                    f"| {store} | {method} | {_cell(summary, '/s')} | {share(w1, summary)} | "
                    f"{share(w3, summary)} | {share(peer, summary)} |"
                )
        if self.floor_loads:
            lines += [
                "",
                "R1's first load with snapshots without any library (ms; lower is better),"
                " and R1's loads against it:",
                "",
                "| store | method | load | trio_es R1 load as a multiple |"
                " peer R1 load as a multiple |",
                "| --- | --- | --- | --- | --- |",
            ]

            def multiple(value: float | None, summary: Summary | None) -> str:
                return "-" if value is None or summary is None else f"{value / summary.median:.2f}x"

            for store in STORES:
                for method, loads in self.floor_loads.get(store, {}).items():
                    summary = summarize(loads)
                    ours = self.median("R1s", store, "trio_es", "load_ms")
                    theirs = self.median("R1s", store, "peer", "load_ms")
                    lines.append(
                        f"| {store} | {method} | {_cell(summary, 'ms')} | "
                        f"{multiple(ours, summary)} | {multiple(theirs, summary)} |"
                    )
        return lines

    def to_json(self) -> dict[str, Any]:
        """Everything, raw rounds included, as JSON-ready values."""
        rows = [{k: v for k, v in row.items() if not k.startswith("_")} for row in self.rows()]
        return {
            "mode": self.settings.mode,
            "settings": dataclasses.asdict(self.settings),
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "duration_s": self.duration_s,
            "machine": self.machine,
            "notes": self.notes,
            "all_verified": self.all_verified(),
            "rows": rows,
            "floor": {
                store: {
                    method: {"rounds": rates, "summary": _as_dict(summarize(rates))}
                    for method, rates in methods.items()
                }
                for store, methods in self.floor.items()
            },
            "floor_loads_ms": {
                store: {
                    method: {"rounds": loads, "summary": _as_dict(summarize(loads))}
                    for method, loads in methods.items()
                }
                for store, methods in self.floor_loads.items()
            },
            "targets": [dataclasses.asdict(target) for target in self.targets()],
            "trials": {
                workload: {
                    store: {
                        library: [
                            {
                                "metrics": trial.metrics,
                                "ok": trial.verdict.ok,
                                "detail": trial.verdict.detail,
                            }
                            for trial in trials
                        ]
                        for library, trials in per_store.items()
                    }
                    for store, per_store in stores.items()
                }
                for workload, stores in self.trials.items()
            },
        }

    def write(self, out_dir: Path, stamp: str) -> list[Path]:
        """Write ``<stamp>-<mode>`` and ``latest-<mode>`` markdown and JSON to ``out_dir``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        markdown = self.markdown()
        data = json.dumps(self.to_json(), indent=2, allow_nan=True) + "\n"
        written = []
        for name in (f"{stamp}-{self.settings.mode}", f"latest-{self.settings.mode}"):
            for suffix, text in ((".md", markdown), (".json", data)):
                path = out_dir / f"{name}{suffix}"
                path.write_text(text, encoding="utf-8")
                written.append(path)
        return written


def _as_dict(summary: Summary | None) -> dict[str, float] | None:
    return None if summary is None else summary.as_dict()

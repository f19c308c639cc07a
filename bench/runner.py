"""Run the benchmark: every (store, workload), several rounds, the libraries alternating.

For each store and workload, each round runs trio_es and the peer back to back; the
library that goes first alternates from round to round, so a machine that slows down
over time does not favour one library. Each run starts from an empty store (R1 and C1:
from the store their setup wrote) and is checked against the state its plan implies; a run
that fails or leaves the wrong state is reported, never silently dropped.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Final

import trio

from . import floor, machine, scale, trio_side
from .report import Report
from .results import Trial, Verdict, plan_metrics
from .settings import Settings
from .stores import (
    Location,
    PostgresSpace,
    SqliteSpace,
    postgres_reachable,
    sqlite_default_synchronous,
)
from .workloads import CatchUp, Plan, c1_catch_up, r1_account, w1_plan, w2_plan, w3_plan

#: Floor methods beyond the raw inserts (see :mod:`bench.floor`).
FROM_TRIO: Final = "1 row/tx from Trio via a worker thread"
FROM_TRIO_WIRE: Final = "1 row/tx from Trio, non-blocking libpq (no thread)"
ROUND_TRIP: Final = "Trio command round trip (no store)"
LOAD_FROM_TRIO: Final = "first load, snapshots, from Trio via a worker thread"

__all__ = ["run"]

TRIO = "trio_es"
PEER = "peer"

Progress = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load_peer() -> tuple[ModuleType | None, str | None]:
    try:
        import eventsourcing  # noqa: F401 - only whether it imports matters here
    except ImportError:
        return None, "the peer library `eventsourcing` is not installed: peer rows are skipped"
    from . import peer

    return peer, None


class _Run:
    """The state of one run: where stores live, what is measured, what was found."""

    def __init__(self, settings: Settings, progress: Progress) -> None:
        self.settings = settings
        self._progress = progress
        self._started = time.perf_counter()
        self.report = Report.start(settings)
        self.peer, why = _load_peer()
        if not settings.peer:
            self.peer, why = None, "the peer was not asked for (--no-peer): peer rows are skipped"
        if why is not None:
            self.report.notes.append(why)
        self.sqlite: SqliteSpace | None = None
        self.postgres: PostgresSpace | None = None

    def progress(self, message: str) -> None:
        """Report progress, stamped with the seconds since the run started."""
        self._progress(f"[{time.perf_counter() - self._started:6.1f}s] {message}")

    # -- one measurement of one library --

    def _trial(self, name: str, measure: Callable[[], Trial]) -> Trial:
        gc.collect()
        try:
            trial = measure()
        except Exception as error:
            self.progress(f"    {name}: FAILED\n{traceback.format_exc()}")
            return Trial({}, Verdict(False, f"failed: {type(error).__name__}: {error}"))
        status = "" if trial.verdict.ok else f"  WRONG STATE: {trial.verdict.detail}"
        shown = ", ".join(
            f"{key}={value:,.1f}"
            for key, value in trial.metrics.items()
            if key
            in (
                "throughput",
                "p99_ms",
                "load_ms",
                "last_over_first",
                "rate",
                "read_rate",
                "rss_per_aggregate",
                "rss_bare",
                "visits",
                "bare_visits",
                "shutdown_ms",
                "bare_shutdown_ms",
                "warnings",
            )
        )
        self.progress(f"    {name}: {shown}{status}")
        return trial

    def _fresh(self, store: str, label: str) -> Location:
        if store == "memory":
            return Location("memory")
        if store == "sqlite":
            assert self.sqlite is not None
            return self.sqlite.fresh(label)
        assert self.postgres is not None
        return self.postgres.fresh(label)

    def _discard(self, location: Location) -> None:
        if location.kind == "sqlite" and self.sqlite is not None:
            self.sqlite.discard(location)

    def _peer_env(self, location: Location, concurrent: int) -> dict[str, str]:
        assert self.peer is not None
        postgres = (
            self.postgres.peer_env() if location.kind == "postgres" and self.postgres else None
        )
        env: dict[str, str] = self.peer.env_for(location, concurrent=concurrent, postgres=postgres)
        return env

    def _plan_trial(self, lib: str, store: str, plan: Plan) -> Trial:
        location = self._fresh(store, f"{plan.name}-{lib}")
        try:
            if lib == TRIO:
                timed, verdict = trio.run(trio_side.run_plan, location, plan)
            else:
                assert self.peer is not None
                env = self._peer_env(location, len(plan.callers))
                timed, verdict = self.peer.run_plan(env, plan)
        finally:
            self._discard(location)
        slice_size = self.settings.sizes.w1_slice if plan.name == "W1" else None
        return Trial(plan_metrics(timed, slice_size=slice_size), verdict)

    # -- workloads --

    def libraries(self, store: str) -> list[str]:
        """The libraries that can run on ``store`` (a note says why one cannot)."""
        libs = []
        why = trio_side.store_available(store)
        if why is None:
            libs.append(TRIO)
        elif why not in self.report.notes:
            self.report.notes.append(why)
        if self.peer is not None:
            why = self.peer.store_available(store)
            if why is None:
                libs.append(PEER)
            elif why not in self.report.notes:
                self.report.notes.append(why)
        return libs

    def plan_workload(self, store: str, plan: Plan) -> None:
        """W1-W3 on ``store``: every round runs each library once, on a fresh store."""
        libs = self.libraries(store)
        for round_ in range(self.settings.sizes.rounds):
            order = libs if round_ % 2 == 0 else libs[::-1]
            self.progress(f"  {plan.name} {store} round {round_ + 1}/{self.settings.sizes.rounds}")
            for lib in order:
                trial = self._trial(lib, functools.partial(self._plan_trial, lib, store, plan))
                self.report.add(plan.name, store, lib, trial)

    def r1_workload(self, store: str, snapshot_every: int | None) -> None:
        """R1 on ``store``: write each library's stream once, then cold-load it per round."""
        sizes = self.settings.sizes
        workload = "R1" if snapshot_every is None else "R1s"
        account, events = r1_account(), sizes.r1_events
        libs = self.libraries(store)
        shared = self._fresh(store, workload) if store == "postgres" else None
        locations = {lib: shared or self._fresh(store, f"{workload}-{lib}") for lib in libs}
        ready: dict[str, bool] = {}
        self.progress(f"  {workload} {store} setup ({events:,} events)")
        for lib in libs:
            location = locations[lib]
            try:
                if lib == TRIO:
                    trio.run(trio_side.r1_setup, location, account, events, snapshot_every)
                else:
                    assert self.peer is not None
                    env = self._peer_env(location, 1)
                    self.peer.r1_setup(env, location, account, events, snapshot_every)
                ready[lib] = True
            except Exception as error:
                self.progress(f"    {lib} setup FAILED\n{traceback.format_exc()}")
                self.report.add(
                    workload,
                    store,
                    lib,
                    Trial({}, Verdict(False, f"setup failed: {type(error).__name__}: {error}")),
                )
        try:
            for round_ in range(sizes.rounds):
                order = libs if round_ % 2 == 0 else libs[::-1]
                self.progress(f"  {workload} {store} round {round_ + 1}/{sizes.rounds}")
                for lib in order:
                    if not ready.get(lib):
                        continue
                    measure = functools.partial(
                        self._r1_trial, lib, locations[lib], account, events, snapshot_every
                    )
                    self.report.add(workload, store, lib, self._trial(lib, measure))
        finally:
            for location in {id(loc): loc for loc in locations.values()}.values():
                self._discard(location)

    def _r1_trial(
        self, lib: str, location: Location, account: str, events: int, snapshot_every: int | None
    ) -> Trial:
        if lib == TRIO:
            elapsed, verdict = trio.run(
                trio_side.r1_load, location, account, events, snapshot_every
            )
        else:
            assert self.peer is not None
            env = self._peer_env(location, 1)
            elapsed, verdict = self.peer.r1_load(env, location, account, events, snapshot_every)
        return Trial({"load_ms": elapsed * 1000}, verdict)

    def c1_workload(self, store: str, catch_up: CatchUp) -> None:
        """C1 on ``store``: fill each library's store once, then catch up once per round.

        Each round runs, per library, a projection that never ran before (trio_es: a new
        projection name, so no checkpoint; the peer: a new runner with a new in-memory
        view) from the first event to the head, then a raw subscription over the same
        events.
        """
        rounds = self.settings.sizes.c1_rounds
        libs = self.libraries(store)
        shared = self._fresh(store, "C1") if store == "postgres" else None
        locations = {lib: shared or self._fresh(store, f"C1-{lib}") for lib in libs}
        heads: dict[str, int] = {}
        self.progress(f"  C1 {store} setup ({catch_up.events:,} events)")
        try:
            for lib in libs:
                location = locations[lib]
                started = time.perf_counter()
                try:
                    if lib == TRIO:
                        heads[lib] = trio.run(trio_side.c1_setup, location, catch_up)
                    else:
                        assert self.peer is not None
                        env = self._peer_env(location, 1)
                        heads[lib] = self.peer.c1_setup(env, location, catch_up)
                except Exception as error:
                    self.progress(f"    {lib} setup FAILED\n{traceback.format_exc()}")
                    why = f"setup failed: {type(error).__name__}: {error}"
                    self.report.add("C1", store, lib, Trial({}, Verdict(False, why)))
                    continue
                rate = catch_up.events / (time.perf_counter() - started)
                self.progress(f"    {lib}: {catch_up.events:,} events written, {rate:,.0f}/s")
            if store == "postgres" and heads:
                assert self.postgres is not None
                self.postgres.settle()
            for round_ in range(rounds):
                order = libs if round_ % 2 == 0 else libs[::-1]
                self.progress(f"  C1 {store} round {round_ + 1}/{rounds}")
                for lib in order:
                    if lib not in heads:
                        continue
                    measure = functools.partial(
                        self._c1_trial, lib, locations[lib], catch_up, heads[lib], round_
                    )
                    self.report.add("C1", store, lib, self._trial(lib, measure))
        finally:
            for location in {id(loc): loc for loc in locations.values()}.values():
                self._discard(location)

    def _c1_trial(
        self, lib: str, location: Location, catch_up: CatchUp, head: int, round_: int
    ) -> Trial:
        if lib == TRIO:
            name = f"balances-{round_ + 1}"
            projected, verdict = trio.run(trio_side.c1_project, location, catch_up, name)
            gc.collect()
            read, read_verdict = trio.run(trio_side.c1_subscribe, location, catch_up)
        else:
            assert self.peer is not None
            env = self._peer_env(location, 1)
            projected, verdict = self.peer.c1_project(env, location, catch_up, head)
            gc.collect()
            read, read_verdict = self.peer.c1_subscribe(env, location, catch_up, head)
        metrics = {
            "rate": catch_up.events / projected if projected > 0 else float("inf"),
            "read_rate": catch_up.events / read if read > 0 else float("inf"),
        }
        if not verdict.ok or not read_verdict.ok:
            problems = [f"projection: {verdict.detail}"] if not verdict.ok else []
            problems += [] if read_verdict.ok else [f"subscription: {read_verdict.detail}"]
            return Trial(metrics, Verdict(False, "; ".join(problems)))
        return Trial(metrics, verdict)

    def s1_workload(self) -> None:
        """S1 (memory store only): trio_es against bare Trio, each side in a fresh process."""
        sizes = self.settings.sizes
        for round_ in range(sizes.s1_rounds):
            self.progress(
                f"  S1 memory round {round_ + 1}/{sizes.s1_rounds} "
                f"({sizes.s1_aggregates:,} aggregates)"
            )
            measure = functools.partial(scale.s1_trial, sizes.s1_aggregates, round_)
            self.report.add("S1", "memory", TRIO, self._trial(TRIO, measure))

    def floor_workload(self, store: str) -> None:
        """The raw-database floor on ``store``: each method once per round, fresh tables."""
        sizes = self.settings.sizes
        methods: dict[str, tuple[int, int]] = {}
        if store != "memory":
            methods["1 row/tx"] = (sizes.floor_single_rows, 1)
            methods[f"{sizes.floor_batch} rows/tx"] = (sizes.floor_batched_rows, sizes.floor_batch)
            methods[FROM_TRIO if store == "sqlite" else FROM_TRIO_WIRE] = (
                sizes.floor_single_rows,
                1,
            )
            if store == "sqlite":
                methods[LOAD_FROM_TRIO] = (sizes.r1_events, sizes.r1_snapshot_every)
        else:
            methods[ROUND_TRIP] = (sizes.floor_round_trips, 0)
        for round_ in range(sizes.rounds):
            self.progress(f"  floor {store} round {round_ + 1}/{sizes.rounds}")
            for method, (count, batch) in methods.items():
                if method == ROUND_TRIP:
                    rate = floor.round_trip_floor(count)
                    self.progress(f"    {method}: {rate:,.0f}/s")
                    self.report.add_floor(store, method, rate)
                    continue
                location = self._fresh(store, "floor")
                try:
                    if store == "sqlite":
                        assert location.sqlite_path is not None
                        path = location.sqlite_path
                        if method == LOAD_FROM_TRIO:
                            load_s = floor.sqlite_load_floor_from_trio(
                                path, count, batch, floor.LOAD_TRIALS
                            )
                            self.progress(f"    {method}: {load_s * 1000:.3f} ms")
                            self.report.add_floor_load(store, method, load_s * 1000)
                            continue
                        rate = (
                            floor.sqlite_floor_from_trio(path, count)
                            if method == FROM_TRIO
                            else floor.sqlite_floor(path, count, batch)
                        )
                    else:
                        assert location.postgres_dsn is not None
                        dsn = location.postgres_dsn
                        rate = (
                            floor.postgres_floor_from_trio(dsn, count)
                            if method == FROM_TRIO_WIRE
                            else floor.postgres_floor(dsn, count, batch)
                        )
                finally:
                    self._discard(location)
                self.progress(f"    {method}: {rate:,.0f} rows/s")
                self.report.add_floor(store, method, rate)

    # -- the whole run --

    def stores(self) -> list[str]:
        """The stores to measure: those asked for, minus an unreachable PostgreSQL."""
        chosen = []
        for store in self.settings.stores:
            if store == "postgres":
                why = postgres_reachable(self.settings.postgres_dsn)
                if why is not None:
                    if self.settings.postgres_required:
                        raise SystemExit(f"bench: PostgreSQL was asked for but {why}")
                    self.report.notes.append(f"PostgreSQL rows are skipped: {why}")
                    continue
            chosen.append(store)
        return chosen

    def execute(self) -> Report:
        """Measure every store and workload asked for; return the finished report."""
        settings, sizes = self.settings, self.settings.sizes
        self.report.machine = machine.describe()
        self.report.machine["sqlite default synchronous (peer)"] = sqlite_default_synchronous()
        if self.peer is not None:
            self.report.notes.append(self.peer.describe())
        plans = {
            "W1": w1_plan(sizes),
            "W2": w2_plan(sizes),
            "W3": w3_plan(sizes, settings.seed),
        }
        catch_up = c1_catch_up(sizes) if "C1" in settings.workloads else None
        with contextlib.ExitStack() as stack:
            for store in self.stores():
                self.progress(f"{store}:")
                if store == "sqlite":
                    self.sqlite = stack.enter_context(SqliteSpace.create())
                    self.report.notes.append(
                        "SQLite durability: trio_es's store runs WAL with synchronous=FULL; "
                        "the peer's eventsourcing.sqlite sets journal_mode=WAL and leaves "
                        "synchronous at SQLite's default, "
                        f"{self.report.machine['sqlite default synchronous (peer)']} in this "
                        "build; the floor runs WAL with synchronous=FULL"
                    )
                if store == "postgres":
                    self.postgres = stack.enter_context(PostgresSpace.create(settings.postgres_dsn))
                    for key, value in self.postgres.server_settings().items():
                        self.report.machine[f"postgres {key}"] = value
                    self.report.notes.append(
                        "PostgreSQL durability: both libraries and the floor use the server's "
                        "settings (synchronous_commit="
                        f"{self.report.machine.get('postgres synchronous_commit', '?')})"
                    )
                for name, plan in plans.items():
                    if name in settings.workloads:
                        self.plan_workload(store, plan)
                if "R1" in settings.workloads:
                    self.r1_workload(store, None)
                    self.r1_workload(store, sizes.r1_snapshot_every)
                if catch_up is not None:
                    self.c1_workload(store, catch_up)
                if "S1" in settings.workloads and store == "memory":
                    self.s1_workload()
                if "floor" in settings.workloads:
                    self.floor_workload(store)
        self.report.machine["load average at end (1, 5, 15 min)"] = machine.load_average()
        self.report.finish()
        return self.report


def run(
    settings: Settings, *, out_dir: Path | None = None, progress: Progress | None = _stderr
) -> Report:
    """Run the benchmark ``settings`` describes and return its report.

    With ``out_dir``, the markdown and the JSON are also written there (as
    ``<UTC time>-<mode>.md/.json`` and ``latest-<mode>.md/.json``).
    """
    started = time.perf_counter()
    report = _Run(settings, progress or (lambda _: None)).execute()
    report.duration_s = time.perf_counter() - started
    if out_dir is not None:
        report.write(out_dir, datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ"))
    return report

"""Profile trio_es's side of one workload: ``python -m bench.profiling W3 sqlite``.

Runs one measurement of trio_es only (no peer, no rounds), profiling its timed phase
only (not the setup or the final state check), and prints where the time went; for C1
that is the projection catching up (the raw subscription is not profiled), for S1 the
first visits (``python -m bench.profiling S1 memory``, in this process). With
``pyinstrument`` installed (a development tool, not a dependency: ``pip install
pyinstrument``) it prints pyinstrument's call tree and the functions with the most
time of their own, as percentages of the timed phase; otherwise (or with
``--cprofile``) the standard library's ``cProfile`` prints the functions with the most
time of their own and inclusive, and the own time summed per module. Sizes come from
``--quick`` (default), ``--smoke`` or ``--full``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import trio

from . import scale, trio_side
from .results import plan_metrics
from .settings import STORES, Mode, Settings
from .stores import Location, PostgresSpace, SqliteSpace
from .trio_side import TimedPhase
from .workloads import c1_catch_up, r1_account, w1_plan, w2_plan, w3_plan

__all__ = ["main"]


@contextlib.contextmanager
def _location(store: str, dsn: str) -> Iterator[Location]:
    if store == "memory":
        yield Location("memory")
    elif store == "sqlite":
        with SqliteSpace.create() as space:
            yield space.fresh("profile")
    else:
        with PostgresSpace.create(dsn) as space:
            yield space.fresh("profile")


def _measurement(
    workload: str, settings: Settings, location: Location
) -> Callable[[TimedPhase], str]:
    """One trio_es measurement of ``workload``; R1's and C1's setup is done here, unprofiled."""
    sizes = settings.sizes
    if workload == "S1":

        def measure_visits(timed_phase: TimedPhase) -> str:
            n = sizes.s1_aggregates
            result = trio.run(scale.trio_es_side, n, timed_phase)
            return f"{n / result['visits_s']:,.0f} first visits/s ({n:,} aggregates)"

        return measure_visits
    if workload in ("W1", "W2", "W3"):
        plans = {"W1": w1_plan(sizes), "W2": w2_plan(sizes)}
        plan = plans.get(workload) or w3_plan(sizes, settings.seed)

        def measure_plan(timed_phase: TimedPhase) -> str:
            timed, verdict = trio.run(trio_side.run_plan, location, plan, timed_phase)
            metrics = plan_metrics(timed)
            return f"{metrics['throughput']:,.0f} cmd/s, p99 {metrics['p99_ms']:.2f} ms, {verdict}"

        return measure_plan
    if workload == "C1":
        catch_up = c1_catch_up(sizes)
        trio.run(trio_side.c1_setup, location, catch_up)

        def measure_catch_up(timed_phase: TimedPhase) -> str:
            elapsed, verdict = trio.run(
                trio_side.c1_project, location, catch_up, "balances", timed_phase
            )
            return f"projection catch-up {catch_up.events / elapsed:,.0f} events/s, {verdict}"

        return measure_catch_up
    snapshot_every = sizes.r1_snapshot_every if workload == "R1s" else None
    trio.run(trio_side.r1_setup, location, r1_account(), sizes.r1_events, snapshot_every)

    def measure_load(timed_phase: TimedPhase) -> str:
        elapsed, verdict = trio.run(
            trio_side.r1_load, location, r1_account(), sizes.r1_events, snapshot_every, timed_phase
        )
        return f"first load {elapsed * 1000:.2f} ms, {verdict}"

    return measure_load


def _module_of(filename: str) -> str:
    """A short name for the module a profiled function lives in."""
    path = Path(filename)
    parts = path.parts
    for anchor in ("site-packages", "main"):
        if anchor in parts:
            index = len(parts) - 1 - parts[::-1].index(anchor)
            return "/".join(parts[index + 1 :])
    return path.name if filename.startswith(("/", "<")) else filename


def _cprofile(measure: Callable[[TimedPhase], str], top: int) -> tuple[str, str]:
    profiler = cProfile.Profile()

    @contextlib.contextmanager
    def timed_phase() -> Iterator[None]:
        profiler.enable()
        try:
            yield
        finally:
            profiler.disable()

    result = measure(timed_phase)
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumtime").print_stats(top)
    own: dict[str, float] = {}
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, _, _), (_, _, tottime, _, _) in raw.items():
        module = _module_of(filename)
        own[module] = own.get(module, 0.0) + tottime
    total = sum(own.values()) or 1.0
    out.write("Own time per module:\n")
    for module, seconds in sorted(own.items(), key=lambda item: -item[1])[:top]:
        out.write(f"{seconds / total:6.1%}  {module}\n")
    return result, out.getvalue()


def _pyinstrument(measure: Callable[[TimedPhase], str], top: int) -> tuple[str, str] | None:
    try:
        from pyinstrument import Profiler
    except ImportError:
        return None
    sampler: Any = Profiler(interval=0.0005)

    @contextlib.contextmanager
    def timed_phase() -> Iterator[None]:
        sampler.start()
        try:
            yield
        finally:
            sampler.stop()

    result = measure(timed_phase)
    tree = sampler.output_text(time="percent_of_total")
    flat = str(sampler.output_text(time="percent_of_total", flat=True)).splitlines()
    return result, f"{tree}\nFunctions by own time:\n" + "\n".join(flat[: top + 8])


def main(argv: Sequence[str] | None = None) -> int:
    """Profile one workload on one store; print the result line and the profile."""
    parser = argparse.ArgumentParser(prog="python -m bench.profiling", description=__doc__)
    parser.add_argument("workload", choices=("W1", "W2", "W3", "R1", "R1s", "C1", "S1"))
    parser.add_argument("store", choices=STORES)
    modes = parser.add_mutually_exclusive_group()
    for name in ("smoke", "quick", "full"):
        modes.add_argument(f"--{name}", dest="mode", action="store_const", const=name)
    parser.add_argument("--top", type=int, default=40, help="rows of each listing")
    parser.add_argument(
        "--cprofile", action="store_true", help="use cProfile even if pyinstrument is installed"
    )
    args = parser.parse_args(argv)
    mode: Mode = args.mode or "quick"
    settings = Settings.for_mode(mode)
    why = trio_side.store_available(args.store)
    if why is not None:
        print(why, file=sys.stderr)
        return 2
    with _location(args.store, settings.postgres_dsn) as location:
        measure = _measurement(args.workload, settings, location)
        sampled = None if args.cprofile else _pyinstrument(measure, args.top)
        result, profile = sampled or _cprofile(measure, args.top)
    print(f"{args.workload} {args.store} ({mode} sizes, under the profiler): {result}")
    print(profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

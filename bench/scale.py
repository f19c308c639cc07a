"""S1, many live aggregates: memory, first-visit rate and shutdown, against bare Trio.

One caller sends one command to each of ``s1_aggregates`` new aggregates on the memory
store, awaiting each (so every command is a *first visit*: a task spawned, an empty
stream loaded, one event committed, a reply), and then all those aggregates are live at
once, each blocked waiting for its next message. Three sides run, each in a fresh
``python -m bench.scale`` subprocess so that its RSS is its own:

- ``trio_es``: ``open_eventsourcing`` on a ``MemoryStore``, the bank account example,
  ``OpenAccount`` to each new account (one event each). The idle timeout is an hour, so
  no aggregate retires during the run. Then the system is shut down (leaving the
  ``async with`` block), timed, while the ``trio_es`` logger and Python warnings are
  captured.
- ``bare``: the baseline, plain Trio. The caller makes one memory channel per task and
  starts the task (``nursery.start_soon``), which blocks reading it; the caller sends it
  one message and awaits its answer on a reply channel; the task then blocks reading
  again. Shutdown is cancelling the nursery and leaving it, timed.
- ``domain``: what the domain itself keeps, without any task: the same events committed
  to a ``MemoryStore`` through the ``EventStore`` protocol, and one entity per account
  kept in a list. trio_es's runtime memory is its RSS growth minus this side's, so the
  domain's state and events are excluded as the target asks.

RSS comes from ``/proc/self/statm`` (resident pages times the page size), read after a
``gc.collect()`` once the process is ready (imports done, system open) and again once all
aggregates are live; the growth divided by the count is the cost of one. On a system
without ``/proc`` it falls back to ``resource.getrusage``'s peak RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import trio

import trio_es
from trio_es.memory_store import MemoryStore

from .results import Trial, Verdict
from .trio_side import CALL_TIMEOUT_MS, TimedPhase, bank

__all__ = [
    "SIDES",
    "count_tasks",
    "main",
    "rss_bytes",
    "s1_metrics",
    "s1_trial",
    "side",
    "trio_es_side",
]

#: The sides S1 runs, each in a process of its own.
SIDES: Final = ("bare", "domain", "trio_es")
#: Longer than any run: no aggregate may retire while S1 counts them.
IDLE_TIMEOUT_S: Final = 3_600.0
#: The longest one side's subprocess may take before the run is declared broken.
SIDE_TIMEOUT_S: Final = 900.0
_ROOT: Final = Path(__file__).resolve().parent.parent


def rss_bytes() -> int:
    """The resident set size of this process now (``/proc/self/statm``), in bytes."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            resident = int(statm.read().split()[1])
        return resident * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - no /proc: the peak is the best available
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def count_tasks() -> int:
    """The Trio tasks alive in the current run."""
    root = trio.lowlevel.current_root_task()
    assert root is not None, "count_tasks() runs inside trio.run"
    count = 0
    stack = [root]
    while stack:
        task = stack.pop()
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


def _settled_rss() -> int:
    gc.collect()
    return rss_bytes()


@contextlib.contextmanager
def _captured() -> Iterator[list[str]]:
    """Collect what the ``trio_es`` loggers say at WARNING or above, and Python warnings."""
    said: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(f"{record.levelname} {record.name}: {record.getMessage()}")

    handler = Collect(logging.WARNING)
    target = logging.getLogger("trio_es")
    target.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield said
        said.extend(f"warning {w.category.__name__}: {w.message}" for w in caught)
    finally:
        target.removeHandler(handler)


async def _bare(n: int) -> dict[str, Any]:
    async def task(
        receive: trio.MemoryReceiveChannel[int], answer: trio.MemorySendChannel[int]
    ) -> None:
        async for message in receive:
            answer.send_nowait(message)

    answer_in, answer_out = trio.open_memory_channel[int](1)
    keep: list[trio.MemorySendChannel[int]] = []
    async with trio.open_nursery() as nursery:
        before, tasks_before = _settled_rss(), count_tasks()
        started = time.perf_counter()
        for i in range(n):
            send, receive = trio.open_memory_channel[int](1)
            nursery.start_soon(task, receive, answer_in)
            await send.send(i)
            if await answer_out.receive() != i:
                raise AssertionError(f"bare task {i} answered the wrong message")
            keep.append(send)
        visits = time.perf_counter() - started
        live, tasks_live = _settled_rss(), count_tasks()
        started = time.perf_counter()
        nursery.cancel_scope.cancel()
    shutdown = time.perf_counter() - started
    return {
        "rss_growth": live - before,
        "tasks": tasks_live - tasks_before,
        "visits_s": visits,
        "shutdown_s": shutdown,
        "live": n,
    }


async def _domain(n: int) -> dict[str, Any]:
    example = bank()
    store: MemoryStore[Any, Any] = MemoryStore()
    entities: list[Any] = []
    before = _settled_rss()
    for i in range(n):
        account = f"s1-{i:07d}"
        event = example.AccountOpened(account)
        async with store.transaction() as tx:
            await store.commit_events(tx, trio_es.Aggregate(account, example.EMPTY, 0), [event], ())
        entities.append(example.apply(example.EMPTY, event))
    live = _settled_rss()
    return {"rss_growth": live - before, "live": len(entities)}


async def trio_es_side(n: int, timed_phase: TimedPhase = contextlib.nullcontext) -> dict[str, Any]:
    """S1's trio_es side; ``timed_phase()`` is entered around the first visits only."""
    example = bank()
    store: MemoryStore[Any, Any] = MemoryStore()
    with _captured() as said:
        system = trio_es.open_eventsourcing(
            eventstore=store,
            handle=example.handle,
            apply=example.apply,
            empty_state=example.EMPTY,
            call_timeout=CALL_TIMEOUT_MS,
            options=trio_es.RuntimeOptions(idle_timeout=IDLE_TIMEOUT_S),
        )
        async with system as es:
            # One aggregate first, so that what every system allocates once is not counted.
            await es.execute("s1-warm-up", example.OpenAccount("s1-warm-up"))
            before, tasks_before = _settled_rss(), count_tasks()
            with timed_phase():
                started = time.perf_counter()
                for i in range(n):
                    account = f"s1-{i:07d}"
                    await es.execute(account, example.OpenAccount(account))
                visits = time.perf_counter() - started
            live, tasks_live = _settled_rss(), count_tasks()
            stats = await es.system_stats()
            started = time.perf_counter()
        shutdown = time.perf_counter() - started
    problems = []
    if stats.live_aggregates != n + 1:
        problems.append(f"{stats.live_aggregates - 1} live aggregates != {n}")
    if stats.total_commands_processed != n + 1:
        problems.append(f"{stats.total_commands_processed - 1} commands processed != {n}")
    return {
        "rss_growth": live - before,
        "tasks": tasks_live - tasks_before,
        "visits_s": visits,
        "shutdown_s": shutdown,
        "live": stats.live_aggregates - 1,
        "said": said,
        "problems": problems,
    }


_SIDES: Final[dict[str, Callable[[int], Any]]] = {
    "bare": _bare,
    "domain": _domain,
    "trio_es": trio_es_side,
}


def side(name: str, n: int) -> dict[str, Any]:
    """Run one side of S1 in this process and return what it measured."""
    result: dict[str, Any] = trio.run(_SIDES[name], n)
    result.update(side=name, n=n)
    return result


def _in_subprocess(name: str, n: int) -> dict[str, Any]:
    completed = subprocess.run(
        [sys.executable, "-m", "bench.scale", name, str(n)],
        cwd=_ROOT,
        capture_output=True,
        text=True,
        timeout=SIDE_TIMEOUT_S,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"S1 side {name!r} exited with {completed.returncode}: {completed.stderr[-2000:]}"
        )
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def s1_metrics(n: int, bare: dict[str, Any], domain: dict[str, Any], ours: dict[str, Any]) -> Trial:
    """S1's metrics from its three sides (see the module docstring), and its verdict."""
    per_bare = bare["rss_growth"] / n
    per_domain = domain["rss_growth"] / n
    per_aggregate = (ours["rss_growth"] - domain["rss_growth"]) / n
    said: list[str] = ours["said"]
    metrics = {
        "aggregates": float(n),
        "rss_per_aggregate": per_aggregate,
        "rss_bare": per_bare,
        "rss_over_bare": per_aggregate - per_bare,
        "rss_domain": per_domain,
        "tasks_per_aggregate": ours["tasks"] / n,
        "visits": n / ours["visits_s"],
        "bare_visits": n / bare["visits_s"],
        "shutdown_ms": ours["shutdown_s"] * 1000,
        "bare_shutdown_ms": bare["shutdown_s"] * 1000,
        "shutdown_over_bare": ours["shutdown_s"] / bare["shutdown_s"],
        "warnings": float(len(said)),
    }
    problems = list(ours["problems"])
    if domain["live"] != n or bare["live"] != n:
        problems.append(f"sides kept {domain['live']} (domain), {bare['live']} (bare) != {n}")
    checked = f"{n:,} live aggregates and commands counted"
    if said:
        checked += f"; logged at shutdown: {said[0][:200]}" + (
            f" (and {len(said) - 1} more)" if len(said) > 1 else ""
        )
    return Trial(metrics, Verdict.of(problems, checked))


def s1_trial(n: int, round_: int) -> Trial:
    """One round of S1: each side in a fresh subprocess, in an order that alternates."""
    order = SIDES if round_ % 2 == 0 else SIDES[::-1]
    results = {name: _in_subprocess(name, n) for name in order}
    return s1_metrics(n, results["bare"], results["domain"], results["trio_es"])


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.scale SIDE N``: run one side of S1, print its result as JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__)
    parser.add_argument("side", choices=SIDES)
    parser.add_argument("n", type=int, help="aggregates (or bare tasks)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"n must be at least 1 (got {args.n})")
    print(json.dumps(side(args.side, args.n)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""trio_es's side of each workload: the bank account example on ``open_eventsourcing``.

Every function here is one measurement; the runner calls it through ``trio.run`` with
a fresh :class:`~bench.stores.Location`. Commands are built before the clock starts;
what is timed is awaiting ``EventSourcing.execute`` (W1-W3), the first
``load_aggregate`` of a freshly started system (R1), or (C1) a ``trio_es.Projection``
catching up from the first event to the head under ``open_eventsourcing``, and a raw
``trio_es.subscribe`` reading the same events.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib
import importlib.util
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager, asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import trio

import trio_es
from trio_es.memory_store import MemoryStore

from .results import Timed, Verdict
from .stores import Location
from .workloads import OPEN, CatchUp, Plan

__all__ = [
    "bank",
    "c1_project",
    "c1_setup",
    "c1_subscribe",
    "r1_load",
    "r1_setup",
    "run_plan",
    "store_available",
]

#: Makes the context entered around a measurement's timed phase.
TimedPhase = Callable[[], AbstractContextManager[object]]

#: How long any one call may wait for its reply before the run is declared broken.
CALL_TIMEOUT_MS: Final = 120_000
#: R1 writes its stream in transactions of this many events.
R1_BATCH: Final = 1_000

_bank: ModuleType | None = None
_transcoder: Any = None


def bank() -> ModuleType:
    """The bank account example: from the installed wheel, else from this checkout."""
    global _bank
    if _bank is None:
        try:
            _bank = importlib.import_module("trio_es._examples.bank_account")
        except ImportError:
            path = Path(__file__).resolve().parent.parent / "examples" / "bank_account.py"
            spec = importlib.util.spec_from_file_location("bench_bank_account", path)
            if spec is None or spec.loader is None:
                raise ImportError(f"the bank account example is missing ({path})") from None
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
            _bank = module
    return _bank


def _transcoder_for_bank() -> Any:
    """A Transcoder with the bank account's events and entity registered (built once)."""
    global _transcoder
    if _transcoder is None:
        from trio_es.serialization import Transcoder

        example = bank()
        transcoder = Transcoder()
        for cls in (
            example.AccountOpened,
            example.CustomerDepositedCash,
            example.CustomerWithdrewCash,
        ):
            transcoder.register_event(cls)
        transcoder.register_entity(example.BankAccount)
        _transcoder = transcoder
    return _transcoder


def store_available(kind: str) -> str | None:
    """``None`` when trio_es has a store of ``kind`` that imports, else why not."""
    module = {
        "memory": "trio_es.memory_store",
        "sqlite": "trio_es.sqlite_store",
        "postgres": "trio_es.postgres_store",
    }[kind]
    try:
        importlib.import_module(module)
    except ImportError as error:
        return f"trio_es {kind} store not available ({error})"
    return None


@asynccontextmanager
async def _open_store(location: Location) -> AsyncIterator[Any]:
    """Open trio_es's store at ``location`` through its public ``open``."""
    if location.kind == "memory":
        store = location.shared.get("trio_es")
        if store is None:
            store = location.shared["trio_es"] = MemoryStore()
        yield store
    elif location.kind == "sqlite":
        from trio_es.sqlite_store import SqliteStore

        assert location.sqlite_path is not None
        async with SqliteStore.open(
            location.sqlite_path, transcoder=_transcoder_for_bank(), synchronous="FULL"
        ) as store:
            yield store
    elif location.kind == "postgres":
        from trio_es.postgres_store import PostgresStore

        assert location.postgres_dsn is not None
        async with PostgresStore.open(
            location.postgres_dsn, transcoder=_transcoder_for_bank()
        ) as store:
            yield store
    else:
        raise ValueError(f"unknown store {location.kind!r}")


@asynccontextmanager
async def _system(
    location: Location, snapshot_every: int | None = None
) -> AsyncIterator[trio_es.EventSourcing[Any, Any, Any]]:
    example = bank()
    snapshots = (
        None
        if snapshot_every is None
        else trio_es.SnapshotConfig(trio_es.frequency(snapshot_every))
    )
    async with (
        _open_store(location) as store,
        trio_es.open_eventsourcing(
            eventstore=store,
            handle=example.handle,
            apply=example.apply,
            empty_state=example.EMPTY,
            snapshot_config=snapshots,
            call_timeout=CALL_TIMEOUT_MS,
        ) as es,
    ):
        yield es


async def _caller(
    es: trio_es.EventSourcing[Any, Any, Any],
    commands: list[tuple[str, object]],
    latencies: list[float],
    marks: list[float] | None,
) -> None:
    execute = es.execute
    clock = time.perf_counter
    for account, command in commands:
        started = clock()
        await execute(account, command)
        done = clock()
        latencies.append(done - started)
        if marks is not None:
            marks.append(done)


async def _verify(es: trio_es.EventSourcing[Any, Any, Any], plan: Plan) -> Verdict:
    wrong: list[str] = []
    for account, balance in plan.balances.items():
        aggregate = await es.load_aggregate(account)
        got = (aggregate.entity.balance, aggregate.sequence)
        if got != (balance, plan.events[account]):
            wrong.append(f"{account}: (balance, events) {got} != {(balance, plan.events[account])}")
    return Verdict.of(wrong, f"{len(plan.balances)} balances and event counts checked")


async def run_plan(
    location: Location, plan: Plan, timed_phase: TimedPhase = contextlib.nullcontext
) -> tuple[Timed, Verdict]:
    """Run ``plan`` on a fresh system: setup, then every caller concurrently (timed).

    ``timed_phase()`` is entered around the timed phase only (``bench.profiling`` starts
    and stops its profiler there).
    """
    example = bank()
    callers = [
        [
            (
                account,
                example.OpenAccount(account) if amount == OPEN else example.DepositMoney(amount),
            )
            for account, amount in commands
        ]
        for commands in plan.callers
    ]
    latencies: list[list[float]] = [[] for _ in callers]
    marks: list[float] = []
    async with _system(location) as es:
        for account in plan.setup:
            await es.execute(account, example.OpenAccount(account))
        gc.collect()
        with timed_phase():
            started = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for i, commands in enumerate(callers):
                    nursery.start_soon(
                        _caller, es, commands, latencies[i], marks if i == 0 else None
                    )
            elapsed = time.perf_counter() - started
        verdict = await _verify(es, plan)
    return Timed.of(started, elapsed, latencies, marks), verdict


async def r1_setup(
    location: Location, account: str, events: int, snapshot_every: int | None
) -> None:
    """Write R1's stream: ``events`` events in batches, through the EventStore protocol.

    The stream is what the runtime would have written: an ``AccountOpened`` then
    deposits of 1, and (with snapshots) a snapshot after each batch that reaches or
    crosses a multiple of ``snapshot_every``, so the latest one is at the last event
    when ``events`` is such a multiple.
    """
    example = bank()
    stream: list[Any] = [example.AccountOpened(account)]
    stream += [example.CustomerDepositedCash(1, balance) for balance in range(1, events)]
    entity = example.EMPTY
    sequence = 0
    async with _open_store(location) as store:
        for start in range(0, events, R1_BATCH):
            batch = stream[start : start + R1_BATCH]
            async with store.transaction() as tx:
                await store.commit_events(
                    tx, trio_es.Aggregate(account, entity, sequence), batch, ()
                )
                for event in batch:
                    entity = example.apply(entity, event)
                before, sequence = sequence, sequence + len(batch)
                if snapshot_every is not None and (
                    sequence // snapshot_every > before // snapshot_every
                ):
                    snapshot = trio_es.Snapshot(
                        account, entity, sequence, datetime.datetime.now(datetime.UTC)
                    )
                    await store.save_snapshot(tx, snapshot)


async def r1_load(
    location: Location,
    account: str,
    events: int,
    snapshot_every: int | None,
    timed_phase: TimedPhase = contextlib.nullcontext,
) -> tuple[float, Verdict]:
    """Start a fresh system on R1's store and time its first ``load_aggregate``."""
    async with _system(location, snapshot_every) as es:
        gc.collect()
        with timed_phase():
            started = time.perf_counter()
            aggregate = await es.load_aggregate(account)
            elapsed = time.perf_counter() - started
    got = (aggregate.entity.balance, aggregate.sequence)
    want = (events - 1, events)
    problems = [] if got == want else [f"(balance, events) {got} != {want}"]
    return elapsed, Verdict.of(problems, f"{events} events loaded")


# -- C1: catch-up ------------------------------------------------------------------


async def c1_setup(location: Location, catch_up: CatchUp) -> int:
    """Write C1's events, ``fill_batch`` per transaction, through the EventStore protocol.

    Within a transaction each account's events go in one ``commit_events`` call (so a
    transaction holds a run of events per account, in the order the accounts first
    appear in the batch), as the peer's ``save`` of several aggregates does. Returns the
    store's head position.
    """
    example = bank()
    sequences: dict[str, int] = {}
    balances: dict[str, int] = {}
    async with _open_store(location) as store:
        for batch in catch_up.batches():
            grouped: dict[str, list[Any]] = {}
            for account, amount in batch:
                if amount == OPEN:
                    balances[account] = 0
                    event: Any = example.AccountOpened(account)
                else:
                    balances[account] += amount
                    event = example.CustomerDepositedCash(amount, balances[account])
                grouped.setdefault(account, []).append(event)
            async with store.transaction() as tx:
                for account, events in grouped.items():
                    sequence = sequences.get(account, 0)
                    await store.commit_events(
                        tx, trio_es.Aggregate(account, example.EMPTY, sequence), events, ()
                    )
                    sequences[account] = sequence + len(events)
        head: int = await store.head_position()
    return head


def _c1_verdict(
    catch_up: CatchUp, balances: dict[str, int], events: int, position: int | None, head: int
) -> list[str]:
    wrong: list[str] = []
    if position != head:
        wrong.append(f"checkpoint {position} != head {head}")
    if events != catch_up.events:
        wrong.append(f"{events} events processed != {catch_up.events}")
    for account, balance in catch_up.balances.items():
        if balances.get(account) != balance:
            wrong.append(f"{account}: balance {balances.get(account)} != {balance}")
    if len(balances) != len(catch_up.balances):
        wrong.append(f"{len(balances)} accounts in the read model != {len(catch_up.balances)}")
    return wrong


def _balance_fold(balances: dict[str, int]) -> Callable[[list[Any]], None]:
    """Fold a batch of envelopes into ``balances`` (account -> balance)."""
    example = bank()
    opened, deposited = example.AccountOpened, example.CustomerDepositedCash

    def fold(batch: list[Any]) -> None:
        for envelope in batch:
            event = envelope.payload
            kind = type(event)
            if kind is deposited:
                balances[envelope.aggregate_id] += event.amount
            elif kind is opened:
                balances[envelope.aggregate_id] = 0

    return fold


async def c1_project(
    location: Location,
    catch_up: CatchUp,
    name: str,
    timed_phase: TimedPhase = contextlib.nullcontext,
) -> tuple[float, Verdict]:
    """Time projection ``name`` (never run before) catching up from the start to the head.

    The clock runs from entering ``open_eventsourcing(..., projections=[projection])`` on
    the open store until ``wait_for_projection(name, head)`` returns. Then the read
    model, the count of events handled and the projection's position are checked, and a
    second system started on the same store must find the stored checkpoint at the head
    (nothing handled again).
    """
    example = bank()
    balances: dict[str, int] = {}
    handled = [0]
    fold = _balance_fold(balances)

    async def handle(batch: list[Any]) -> None:
        fold(batch)
        handled[0] += len(batch)

    async with _open_store(location) as store:
        head: int = await store.head_position()
        projection: trio_es.Projection[Any] = trio_es.Projection(
            name, handle, batch_size=catch_up.batch
        )
        gc.collect()
        with timed_phase():
            started = time.perf_counter()
            async with trio_es.open_eventsourcing(
                eventstore=store,
                handle=example.handle,
                apply=example.apply,
                empty_state=example.EMPTY,
                projections=[projection],
                call_timeout=CALL_TIMEOUT_MS,
            ) as es:
                await es.wait_for_projection(name, head)
                elapsed = time.perf_counter() - started
                position = (await es.projection_stats())[name].position
        wrong = _c1_verdict(catch_up, balances, handled[0], position, head)
        # The checkpoint a clean close stored: a restart resumes at the head.
        again = [0]

        async def count(batch: list[Any]) -> None:
            again[0] += len(batch)

        async with trio_es.open_eventsourcing(
            eventstore=store,
            handle=example.handle,
            apply=example.apply,
            empty_state=example.EMPTY,
            projections=[trio_es.Projection(name, count)],
            call_timeout=CALL_TIMEOUT_MS,
        ) as es:
            await es.wait_for_projection(name, head)
            stored = (await es.projection_stats())[name].position
        if stored != head or again[0]:
            wrong.append(f"after a restart: checkpoint {stored}, {again[0]} events handled again")
    return elapsed, Verdict.of(
        wrong, f"{len(catch_up.balances)} balances, event count and checkpoint checked"
    )


async def c1_subscribe(
    location: Location, catch_up: CatchUp, timed_phase: TimedPhase = contextlib.nullcontext
) -> tuple[float, Verdict]:
    """Time ``trio_es.subscribe(store, after=0)`` reading to the head, folded inline."""
    balances: dict[str, int] = {}
    fold = _balance_fold(balances)
    events = 0
    position: int | None = None
    async with _open_store(location) as store:
        head: int = await store.head_position()
        gc.collect()
        with timed_phase():
            started = time.perf_counter()
            async with trio_es.subscribe(store, after=0, batch_size=catch_up.batch) as batches:
                async for batch in batches:
                    fold(batch)
                    events += len(batch)
                    position = batch[-1].global_position
                    if position is not None and position >= head:
                        break
            elapsed = time.perf_counter() - started
    wrong = _c1_verdict(catch_up, balances, events, position, head)
    return elapsed, Verdict.of(
        wrong, f"{len(catch_up.balances)} balances, event count and position checked"
    )

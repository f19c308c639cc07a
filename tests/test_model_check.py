"""The stateful model check: the reference model, the fault-injecting store, and the
machine run against the real runtime on the memory, SQLite and PostgreSQL stores."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Final

import attrs
import hypothesis
import psycopg
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

import trio_es
from trio_es import CommitOutcomeUnknown, ConcurrencyConflict, EventStoreError
from trio_es.memory_store import MemoryStore
from trio_es.postgres_store import PostgresStore
from trio_es.sqlite_store import SqliteStore
from trio_es.testing import (
    LEDGER,
    Accepted,
    Burst,
    Cancel,
    Crash,
    Crashed,
    Deposit,
    Deposited,
    Execute,
    Fault,
    FaultInjectingStore,
    InsufficientFunds,
    Ledger,
    ModelCheck,
    ModelCheckFailure,
    Pause,
    Program,
    Read,
    ReferenceModel,
    Rejected,
    Slow,
    Withdraw,
    Withdrawn,
    check_runtime,
    ledger_transcoder,
)

from . import _pg

LEDGER_MODEL: ReferenceModel[Any, Any, Ledger] = ReferenceModel(
    handle=LEDGER.handle, apply=LEDGER.apply, empty_state=Ledger()
)

# -- the reference model ---------------------------------------------------------------


def test_model_runs_commands_one_at_a_time() -> None:
    """Each step is decided on the state its predecessors left; rejections change nothing."""
    steps = LEDGER_MODEL.run([Deposit((5, 2)), Withdraw(9), Deposit(()), Withdraw(7)])
    first, refused, empty, last = (s.decision for s in steps)
    assert first == Accepted((Deposited(5), Deposited(2)), Ledger(7, (5, 2)))
    assert isinstance(refused, Rejected)
    assert isinstance(refused.error, InsufficientFunds)
    assert refused.error.error == (7, 9)
    assert empty == Accepted((), Ledger(7, (5, 2)))
    assert last == Accepted((Withdrawn(7),), Ledger(0, (5, 2, -7)))
    assert [(s.sequence_before, s.sequence_after) for s in steps] == [
        (0, 2),
        (2, 2),
        (2, 2),
        (2, 3),
    ]
    assert steps[-1].entity_after == LEDGER_MODEL.replay([Deposited(5), Deposited(2), Withdrawn(7)])


def test_model_materialises_handle_output_once() -> None:
    """A handle that returns a generator gives its events once, as the runtime must."""
    model: ReferenceModel[int, Deposited, Ledger] = ReferenceModel(
        handle=lambda entity, n: (Deposited(i) for i in range(n)),
        apply=LEDGER.apply,
        empty_state=Ledger(),
    )
    (step,) = model.run([3])
    assert step.decision == Accepted(
        (Deposited(0), Deposited(1), Deposited(2)), Ledger(3, (0, 1, 2))
    )


def test_model_reports_crashes_of_handle_and_apply() -> None:
    """handle returning None, handle raising and apply raising are crashes, not rejections."""

    def handle(entity: Ledger, command: str) -> Any:
        if command == "none":
            return None
        if command == "raise":
            raise RuntimeError("bug")
        return [Deposited(-1)]

    def apply(entity: Ledger, event: Deposited) -> Ledger:
        raise ValueError("bad event")

    model = ReferenceModel(handle=handle, apply=apply, empty_state=Ledger())
    decisions = [step.decision for step in model.run(["none", "raise", "apply"])]
    assert [type(d) for d in decisions] == [Crashed, Crashed, Crashed]
    assert [type(d.error) for d in decisions if isinstance(d, Crashed)] == [
        TypeError,
        RuntimeError,
        ValueError,
    ]


@pytest.mark.parametrize(
    ("before", "after", "due"),
    [(0, 1, False), (0, 3, True), (2, 3, True), (3, 4, False), (2, 7, True), (4, 5, False)],
)
def test_snapshot_due_when_a_commit_reaches_or_crosses_a_multiple(
    before: int, after: int, due: bool
) -> None:
    """With n = 3, a commit saves a snapshot when it reaches or crosses a multiple of 3."""
    model = ReferenceModel(
        handle=LEDGER.handle, apply=LEDGER.apply, empty_state=Ledger(), snapshot_every=3
    )
    assert model.snapshot_due(before, after) is due


def test_snapshot_frequency_must_be_positive() -> None:
    """A snapshot frequency of 0 is refused with a message naming the value."""
    with pytest.raises(
        ValueError, match=r"snapshot_every must be a positive int or None \(got 0\)"
    ):
        ReferenceModel(
            handle=LEDGER.handle, apply=LEDGER.apply, empty_state=Ledger(), snapshot_every=0
        )


@given(
    n=st.integers(1, 5),
    commits=st.lists(st.integers(1, 7), max_size=12),
)
def test_latest_snapshot_of_any_batching_lies_in_the_window(n: int, commits: list[int]) -> None:
    """However commits group events, the last snapshot saved ends a commit, in the window."""
    model = ReferenceModel(
        handle=LEDGER.handle, apply=LEDGER.apply, empty_state=Ledger(), snapshot_every=n
    )
    ends = [sum(commits[: i + 1]) for i in range(len(commits))]
    head = ends[-1] if ends else 0
    saved = model.snapshots_saved(ends)
    window = model.snapshot_window(head)
    if window is None:
        assert saved == []
    else:
        low, high = window
        assert saved
        assert low <= saved[-1] <= high
        assert saved[-1] in ends


# -- the fault-injecting store ---------------------------------------------------------


async def _write(store: Any, aggregate_id: str, sequence: int, amount: int) -> None:
    async with store.transaction() as tx:
        await store.commit_events(
            tx, trio_es.Aggregate(aggregate_id, Ledger(), sequence), [Deposited(amount)], ()
        )


async def _amounts(store: Any, aggregate_id: str) -> list[int]:
    async with store.transaction() as tx:
        return [e.payload.amount for e in await store.load_events(tx, aggregate_id, 0)]


@pytest.mark.parametrize(
    ("fault", "error", "stored"),
    [
        (Fault.error_before_commit(), EventStoreError, False),
        (Fault.error_after_commit(), CommitOutcomeUnknown, True),
        (Fault.lost_connection(committed=True), CommitOutcomeUnknown, True),
        (Fault.lost_connection(committed=False), CommitOutcomeUnknown, False),
        (Fault.conflict(), ConcurrencyConflict, False),
    ],
)
async def test_fault_store_fails_the_planned_commit(
    fault: Fault, error: type[Exception], stored: bool
) -> None:
    """The planned commit raises the fault's error and is stored or not as the fault says."""
    store: FaultInjectingStore[Any, Any, Any] = FaultInjectingStore(MemoryStore(), [None, fault])
    await _write(store, "a", 0, 1)
    with pytest.raises(error):
        await _write(store, "a", 1, 2)
    assert await _amounts(store.inner, "a") == ([1, 2] if stored else [1])
    assert [(i.write, i.fault, i.aggregate_ids) for i in store.injected] == [(1, fault, ("a",))]


async def test_fault_store_slow_commit_stalls_then_stores(autojump_clock: Any) -> None:
    """A slow commit takes its time on Trio's clock, then stores."""
    store: FaultInjectingStore[Any, Any, Any] = FaultInjectingStore(
        MemoryStore(), [Fault.slow_commit(2.5)]
    )
    start = trio.current_time()
    await _write(store, "a", 0, 1)
    assert trio.current_time() - start == pytest.approx(2.5)
    assert await _amounts(store, "a") == [1]


async def test_fault_store_counts_only_writing_transactions() -> None:
    """Reads neither take a fault nor use up the plan; past its end nothing is injected."""
    store: FaultInjectingStore[Any, Any, Any] = FaultInjectingStore(
        MemoryStore(), [Fault.error_before_commit()]
    )
    assert await _amounts(store, "a") == []
    with pytest.raises(EventStoreError, match="injected error before commit"):
        await _write(store, "a", 0, 1)
    await _write(store, "a", 0, 1)
    assert await _amounts(store, "a") == [1]
    assert store.writes == 2


def test_fault_seconds_must_not_be_negative() -> None:
    """A negative slow-commit time is refused with a message naming the value."""
    with pytest.raises(ValueError, match=r"seconds must be a number of seconds >= 0 \(got -1\)"):
        Fault.slow_commit(-1)


# -- the check against a store that breaks promises -----------------------------------


@attrs.define
class FakeLossyStore:
    """A memory store that acknowledges its second writing transaction but keeps nothing."""

    inner: MemoryStore[Any, Any] = attrs.Factory(MemoryStore)
    writes: int = 0

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Any]:
        tx: dict[str, Any] = {"inner": None, "wrote": False}
        async with self.inner.transaction() as inner:
            tx["inner"] = inner
            yield tx
            if tx["wrote"]:
                self.writes += 1
                if self.writes == 2:
                    inner.appends.clear()
                    inner.expected.clear()
                    inner.snapshots.clear()

    async def load_events(self, tx: Any, aggregate_id: str, start_from: int) -> Any:
        return await self.inner.load_events(tx["inner"], aggregate_id, start_from)

    async def commit_events(self, tx: Any, aggregate: Any, events: Any, metadata: Any) -> Any:
        tx["wrote"] = True
        return await self.inner.commit_events(tx["inner"], aggregate, events, metadata)

    async def load_snapshot(self, tx: Any, aggregate_id: str) -> Any:
        return await self.inner.load_snapshot(tx["inner"], aggregate_id)

    async def save_snapshot(self, tx: Any, snapshot: Any) -> None:
        await self.inner.save_snapshot(tx["inner"], snapshot)


def test_check_reports_an_acknowledged_command_that_was_not_stored() -> None:
    """A store that loses an acknowledged commit fails the check, naming the command."""

    @asynccontextmanager
    async def lossy() -> AsyncIterator[Any]:
        yield FakeLossyStore()

    check = ModelCheck(domain=LEDGER, store_factory=lossy)
    program = Program(
        aggregates=1,
        snapshot_every=None,
        mailbox_capacity=10_000,
        callers=(
            (Execute(0, Deposit((1,))), Execute(0, Deposit((2,))), Execute(0, Deposit((3,)))),
        ),
    )
    with pytest.raises(ModelCheckFailure) as failure:
        check.replay(program)
    assert "stored once" in failure.value.invariants
    assert "#1 Deposit(amounts=(2,)) on a0 was acknowledged but is not stored" in str(failure.value)


# -- the machine on the real runtime ---------------------------------------------------

LEDGER_CHECK: ModelCheck[Any, Any, Ledger] = ModelCheck(domain=LEDGER)


#: The fewest examples the memory-store check runs, in CI too: what the planted bugs of
#: test_planted_bugs.py need to be found every time (see there).
MODEL_CHECK_CI_EXAMPLES: Final = 200


def test_runtime_keeps_its_promises_on_the_memory_store() -> None:
    """Concurrent callers, crashes, cancellations, faults and flaky queries: no promise broken."""
    budget = hypothesis.settings()
    LEDGER_CHECK.check(
        hypothesis.settings(budget, max_examples=max(MODEL_CHECK_CI_EXAMPLES, budget.max_examples))
    )


@pytest.fixture
def sqlite_store_factory(
    tmp_path: Path,
) -> Callable[[], AbstractAsyncContextManager[Any]]:
    # One file for every example: each example writes aggregates of its own.
    path = tmp_path / "model-check.db"

    @asynccontextmanager
    async def open_store() -> AsyncIterator[Any]:
        # Every commit here is made in-process, so the store's own head wakes the
        # projection; polling on the fast mock clock would only cost real thread calls.
        async with SqliteStore.open(
            path, transcoder=ledger_transcoder(), synchronous="OFF", poll_interval=3600
        ) as store:
            yield store

    return open_store


# SQLite works in worker threads: the mock clock may only jump once no thread has
# answered for a while, or it would jump (and time calls out) while one runs.
_THREAD_STORE_AUTOJUMP = 0.02


def test_runtime_keeps_its_promises_on_the_sqlite_store(
    sqlite_store_factory: Callable[[], AbstractAsyncContextManager[Any]],
) -> None:
    """The same check with a real SQLite file behind the fault injection."""
    check = ModelCheck(
        domain=LEDGER,
        store_factory=sqlite_store_factory,
        autojump_threshold=_THREAD_STORE_AUTOJUMP,
    )
    check.check()


_KILLER = "trio_es model check killer"


def _kill_connections(dsn: str) -> Callable[[], Any]:
    """A disrupt hook: terminate the store's connections to the test database."""
    database = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]

    def kill() -> None:
        # Named, so that two kills at once spare each other's connection.
        with _pg.connect(dsn, application_name=_KILLER) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND application_name <> %s",
                (database, _KILLER),
            )

    async def disrupt() -> None:
        await trio.to_thread.run_sync(kill)

    return disrupt


@pytest.mark.postgres
@pytest.mark.skipif(
    os.environ.get("HYPOTHESIS_PROFILE") != "thorough",
    reason="slow: runs only with HYPOTHESIS_PROFILE=thorough",
)
def test_runtime_keeps_its_promises_on_postgres_with_connection_kills(postgres_dsn: str) -> None:
    """PostgreSQL with pg_terminate_backend at random points (HYPOTHESIS_PROFILE=thorough only).

    Skipped in the other profiles: each example opens a connection pool, and the kills
    make the store reconnect, so this needs the thorough profile's time.
    """

    @asynccontextmanager
    async def open_store() -> AsyncIterator[Any]:
        # As for SQLite: LISTEN/NOTIFY and the store's own head wake the projection.
        async with PostgresStore.open(
            postgres_dsn, transcoder=ledger_transcoder(), poll_interval=3600
        ) as store:
            yield store

    check = ModelCheck(
        domain=LEDGER,
        store_factory=open_store,
        disrupt=_kill_connections(postgres_dsn),
        autojump_threshold=0.2,
    )
    budget = hypothesis.settings()
    check.check(hypothesis.settings(budget, max_examples=max(20, budget.max_examples // 10)))


def test_check_runtime_takes_a_users_domain() -> None:
    """check_runtime runs the same check on a domain given as plain functions."""

    def handle(count: int, command: int) -> list[int]:
        if command < 0:
            raise trio_es.DomainError("negative")
        return [command] * (command % 3)

    check_runtime(
        handle=handle,
        apply=lambda count, event: count + event,
        empty_state=0,
        commands=st.integers(-2, 9),
        settings=hypothesis.settings(max_examples=10),
    )


# -- issue 8's defects, as programs (each failed on the runtime of 7e94a38) ------------


def _run(*callers: tuple[Any, ...], **program: Any) -> None:
    program.setdefault("aggregates", 1)
    program.setdefault("snapshot_every", None)
    program.setdefault("mailbox_capacity", 10_000)
    LEDGER_CHECK.replay(Program(callers=callers, **program))


def test_a_cancelled_caller_does_not_make_a_query_miss_its_event() -> None:
    """A caller cancelled at once after sending still gets its event to every query."""
    _run((Execute(0, Deposit(())), Execute(0, Deposit(())), Execute(0, Deposit((1,)), Cancel())))


def test_call_timeout_bounds_a_stalled_handle() -> None:
    """A handle that stalls past call_timeout: the caller gets ActorTimeout in time."""
    _run((Execute(0, Deposit(())), Execute(0, Slow(Deposit((1,)), 200.0))))


def test_callers_wait_for_room_in_a_full_mailbox() -> None:
    """With a mailbox of one, concurrent callers get backpressure, never MailboxFull."""
    _run(
        (Burst((Execute(0, Deposit((1,))), Execute(0, Deposit((2,))), Execute(0, Deposit((3,))))),),
        mailbox_capacity=1,
    )


def test_a_batch_whose_commit_outcome_is_unknown_is_not_run_again() -> None:
    """A batch that may have committed is never re-run: nothing is stored twice."""
    _run(
        (Burst((Execute(0, Deposit((1,))), Execute(0, Deposit((2,))))),),
        faults=(Fault.error_after_commit(),),
    )


def test_queries_see_the_events_of_a_commit_whose_outcome_was_unknown() -> None:
    """Events stored by a commit reported as CommitOutcomeUnknown still reach every query."""
    _run((Execute(0, Deposit((1,))),), faults=(Fault.error_after_commit(),))


def test_a_failing_query_gets_its_batch_again() -> None:
    """The delivery a query raised on is redelivered, so the query misses nothing."""
    _run((Execute(0, Deposit(())), Execute(0, Deposit((1,)))), query_failures=frozenset({0}))


def test_a_crash_between_queued_commands_keeps_their_order() -> None:
    """A crash at the head of a batch: the commands after it are stored in send order."""
    # Caller 0's slow command keeps the aggregate busy while the others queue up behind
    # it, one after another (staggered pauses fix the order), so they are decided as
    # one batch that starts with the crash.
    queued = [Crash(), Deposit((1,)), Deposit((2,)), Deposit((3,))]
    _run(
        (Execute(0, Slow(Deposit(()), 1.0)), Read(0, "load_aggregate")),
        *((Pause(0.1 + 0.01 * n), Execute(0, command)) for n, command in enumerate(queued)),
        snapshot_every=2,
    )

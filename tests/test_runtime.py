"""The eventsourcing runtime: the seed's behaviours, one task per aggregate, let it crash."""

# The message API's replies to execute are None, and these tests assert just that.
# mypy: disable-error-code="func-returns-value"

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import Any, assert_type

import attrs
import pytest
import trio
import trio.lowlevel
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

import trio_es
from trio_es import (
    AggregateCrashed,
    EntityNotFound,
    MailboxFull,
    NonPositiveArgument,
    RuntimeOptions,
    SnapshotConfig,
    TransactionFailed,
    frequency,
    named_subject,
    new_name,
    receive,
)
from trio_es.memory_store import MemoryStore
from trio_es.supervision import StaticSupervisor, Strategy

from ._counter import (
    Append,
    Appended,
    Explode,
    Refuse,
    Refused,
    SlowAppend,
    apply,
    async_handle,
    handle,
    open_counter,
    replay,
)

T = 5_000  # ms: generous reply timeout for the message API


@attrs.define
class FakeFaultyStore:
    """Fault injection around a real MemoryStore: failing commits, counted loads."""

    inner: MemoryStore[Any, Any] = attrs.Factory(MemoryStore)
    commit_failures: list[BaseException] = attrs.Factory(list)
    loads: int = 0
    #: The transactions that wrote events (kept alive, so that none is counted twice).
    writing_transactions: list[Any] = attrs.Factory(list)

    def transaction(self) -> Any:
        return self.inner.transaction()

    async def load_events(self, tx: Any, aggregate_id: str, start_from: int) -> Any:
        self.loads += 1
        return await self.inner.load_events(tx, aggregate_id, start_from)

    async def commit_events(self, tx: Any, aggregate: Any, events: Any, metadata: Any) -> Any:
        if self.commit_failures:
            raise self.commit_failures.pop(0)
        if not any(seen is tx for seen in self.writing_transactions):
            self.writing_transactions.append(tx)
        return await self.inner.commit_events(tx, aggregate, events, metadata)

    async def load_snapshot(self, tx: Any, aggregate_id: str) -> Any:
        return await self.inner.load_snapshot(tx, aggregate_id)

    async def save_snapshot(self, tx: Any, snapshot: Any) -> None:
        await self.inner.save_snapshot(tx, snapshot)


async def start_system(nursery: trio.Nursery, **kwargs: Any) -> trio_es.Subject[Any]:
    """Start the seed-style system under a supervisor and return its subject."""
    name = new_name("counter")
    kwargs.setdefault("eventstore", MemoryStore())
    kwargs.setdefault("handle", handle)
    spec = trio_es.supervised(name=name, apply=apply, empty_state=(), **kwargs)
    await nursery.start(StaticSupervisor(Strategy.ONE_FOR_ONE).add(spec).run)
    return named_subject(name)


# -- the seed's behaviours, through the message API --


async def test_supervised_system_answers_on_its_named_subject() -> None:
    """After the supervisor starts, named_subject(name) executes commands and loads aggregates."""
    async with trio.open_nursery() as nursery:
        es = await start_system(nursery)
        assert await receive(trio_es.execute_with_response(es, "a", Append(("x",))), T) is None
        aggregate = await receive(trio_es.load_aggregate(es, "a"), T)
        assert aggregate == trio_es.Aggregate("a", ("x",), 1)
        nursery.cancel_scope.cancel()


async def test_execute_without_response_is_seen_by_a_later_load() -> None:
    """A load sent after a fire-and-forget execute sees that command's effect."""
    async with trio.open_nursery() as nursery:
        es = await start_system(nursery)
        trio_es.execute(es, "a", Append(("x", "y")))
        aggregate = await receive(trio_es.load_aggregate(es, "a"), T)
        assert aggregate.entity == ("x", "y")
        assert aggregate.sequence == 2
        nursery.cancel_scope.cancel()


async def test_metadata_is_stored_on_every_event_of_the_command() -> None:
    """execute_with_metadata stores its pairs on each event the command makes."""
    async with trio.open_nursery() as nursery:
        es = await start_system(nursery)
        trio_es.execute_with_metadata(es, "a", Append(("x", "y")), [("user", "ann"), ("ip", "::1")])
        trio_es.execute(es, "a", Append(("z",)))
        events = await receive(trio_es.load_events(es, "a"), T)
        assert [e.metadata for e in events] == [
            (("user", "ann"), ("ip", "::1")),
            (("user", "ann"), ("ip", "::1")),
            (),
        ]
        nursery.cancel_scope.cancel()


async def test_load_events_and_load_events_from() -> None:
    """load_events gives every event in order; load_events_from only those after start_from."""
    async with trio.open_nursery() as nursery:
        es = await start_system(nursery)
        trio_es.execute(es, "a", Append(("1", "2", "3", "4")))
        every = await receive(trio_es.load_events(es, "a"), T)
        assert [(e.sequence, e.payload) for e in every] == [
            (i, Appended(str(i))) for i in range(1, 5)
        ]
        tail = await receive(trio_es.load_events_from(es, "a", 2), T)
        assert [e.sequence for e in tail] == [3, 4]
        assert await receive(trio_es.load_events_from(es, "a", 4), T) == []
        assert all(isinstance(e, trio_es.MemoryStoreEventEnvelope) for e in every)
        nursery.cancel_scope.cancel()


async def test_loading_an_aggregate_without_events_raises_entity_not_found() -> None:
    """load_aggregate of an aggregate with no events raises EntityNotFound naming it."""
    async with trio.open_nursery() as nursery:
        es = await start_system(nursery)
        with pytest.raises(EntityNotFound, match="nobody"):
            await receive(trio_es.load_aggregate(es, "nobody"), T)
        assert await receive(trio_es.load_events(es, "nobody"), T) == []
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda es: trio_es.execute(es, "", Append(())), ValueError),
        (lambda es: trio_es.execute(es, 7, Append(())), TypeError),  # type: ignore[arg-type]
        (lambda es: trio_es.execute_with_response(es, None, Append(())), TypeError),  # type: ignore[arg-type]
        (lambda es: trio_es.load_aggregate(es, ""), ValueError),
        (lambda es: trio_es.load_events_from(es, "a", -1), NonPositiveArgument),
        (lambda es: trio_es.load_events_from(es, "a", 1.5), TypeError),  # type: ignore[arg-type]
        (lambda es: trio_es.execute_with_metadata(es, "a", Append(()), [("k", 1)]), TypeError),  # type: ignore[list-item]
        (lambda es: trio_es.aggregate_stats(es, b"a"), TypeError),  # type: ignore[arg-type]
    ],
)
def test_bad_arguments_are_refused_before_sending(call: Any, error: type[Exception]) -> None:
    """Empty or non-str ids, negative start_from and bad metadata raise at once; nothing is sent."""
    es: trio_es.Subject[Any] = trio_es.new_subject()
    with pytest.raises(error):
        call(es)
    assert len(es) == 0


async def test_facade_validates_arguments_too() -> None:
    """The async facade refuses the same bad arguments."""
    async with open_counter() as es:
        with pytest.raises(ValueError, match="non-empty str"):
            await es.execute("", Append(()))
        with pytest.raises(NonPositiveArgument, match="start_from"):
            await es.load_events("a", start_from=-1)


async def test_snapshots_are_saved_every_n_events() -> None:
    """With frequency(2), snapshots follow sequences 2 and 4; the latest is returned."""
    async with open_counter(snapshot_config=SnapshotConfig(frequency(2))) as es:
        for item in "abcde":
            await es.execute("a", Append((item,)))
        snapshot = await es.latest_snapshot("a")
        assert snapshot is not None
        assert (snapshot.sequence, snapshot.entity) == (4, ("a", "b", "c", "d"))
        assert snapshot.timestamp.tzinfo is not None
        assert snapshot.timestamp.utcoffset() is not None
        assert not snapshot.timestamp.utcoffset()
        assert (await es.aggregate_stats("a")).has_snapshot


async def test_a_commit_that_crosses_a_multiple_takes_a_snapshot() -> None:
    """A command whose events jump over a multiple of n still snapshots (the seed misses it)."""
    async with open_counter(snapshot_config=SnapshotConfig(frequency(3))) as es:
        await es.execute("a", Append(("a", "b")))
        assert await es.latest_snapshot("a") is None
        await es.execute("a", Append(("c", "d")))
        snapshot = await es.latest_snapshot("a")
        assert snapshot is not None
        assert (snapshot.sequence, snapshot.entity) == (4, ("a", "b", "c", "d"))


async def test_no_snapshot_when_snapshots_are_off_or_not_yet_due() -> None:
    """latest_snapshot is None and has_snapshot is false when there is no snapshot."""
    async with open_counter() as es:
        await es.execute("a", Append(tuple("abcdefgh")))
        assert await es.latest_snapshot("a") is None
        assert not (await es.aggregate_stats("a")).has_snapshot
    async with open_counter(snapshot_config=SnapshotConfig(frequency(100))) as es:
        await es.execute("a", Append(("x",)))
        assert await es.latest_snapshot("a") is None
        assert not (await es.aggregate_stats("a")).has_snapshot


async def test_every_query_receives_committed_events_in_order() -> None:
    """Several queries, plain and async, each see every commit, per aggregate in order."""
    plain: list[tuple[str, int, str]] = []
    later: list[tuple[str, int, str]] = []

    def record(aggregate_id: str, events: Sequence[trio_es.EventEnvelope[Any]]) -> None:
        plain.extend((aggregate_id, e.sequence, e.payload.item) for e in events)

    async def record_async(aggregate_id: str, events: Sequence[trio_es.EventEnvelope[Any]]) -> None:
        await trio.lowlevel.checkpoint()
        later.extend((aggregate_id, e.sequence, e.payload.item) for e in events)

    queries = [(new_name("plain"), record), (new_name("async"), record_async)]
    async with open_counter(queries=queries) as es:
        async with trio.open_nursery() as nursery:
            for aggregate_id in ("a", "b"):
                nursery.start_soon(es.execute, aggregate_id, Append(("1", "2")))
        await es.execute("a", Append(("3",)))
        with pytest.raises(Refused):
            await es.execute("a", Refuse())
        await trio.testing.wait_all_tasks_blocked()
        assert (await es.system_stats()).query_actors_count == 2
    for seen in (plain, later):
        assert [s for s in seen if s[0] == "a"] == [("a", 1, "1"), ("a", 2, "2"), ("a", 3, "3")]
        assert [s for s in seen if s[0] == "b"] == [("b", 1, "1"), ("b", 2, "2")]


async def test_domain_errors_are_rejections_not_crashes() -> None:
    """A DomainError reaches the caller, commits nothing, is counted, and the aggregate lives on."""
    async with open_counter() as es:
        await es.execute("a", Append(("x",)))
        with pytest.raises(Refused) as info:
            await es.execute("a", Refuse())
        assert info.value.error == "no"
        assert (await es.load_aggregate("a")).sequence == 1
        await es.execute("a", Append(("y",)))
        stats = await es.system_stats()
        assert stats.total_commands_processed == 3


async def test_domain_error_through_the_message_api() -> None:
    """receive on an execute_with_response reply raises the domain error."""
    async with trio.open_nursery() as nursery:
        es = await start_system(nursery)
        with pytest.raises(Refused):
            await receive(trio_es.execute_with_response(es, "a", Refuse()), T)
        stats = await receive(trio_es.system_stats(es), T)
        assert stats.total_commands_processed == 1
        nursery.cancel_scope.cancel()


async def test_many_aggregates_concurrently() -> None:
    """300 aggregates with 3 commands each all end at sequence 3 with their own items."""
    async with open_counter() as es:

        async def drive(i: int) -> None:
            for j in range(3):
                await es.execute(f"acc-{i}", Append((f"{i}.{j}",)))

        async with trio.open_nursery() as nursery:
            for i in range(300):
                nursery.start_soon(drive, i)
        for i in range(300):
            aggregate = await es.load_aggregate(f"acc-{i}")
            assert aggregate.entity == (f"{i}.0", f"{i}.1", f"{i}.2")
        stats = await es.system_stats()
        assert stats.total_commands_processed == 900
        assert stats.live_aggregates == 300


async def test_stats_report_commands_queries_and_aggregates() -> None:
    """system_stats counts accepted and rejected commands; aggregate_stats reports the stream."""
    async with trio.open_nursery() as nursery:
        es = await start_system(
            nursery,
            queries=[(new_name("q"), lambda aggregate_id, events: None)],
            snapshot_config=SnapshotConfig(frequency(2)),
        )
        await receive(trio_es.execute_with_response(es, "a", Append(("1", "2", "3"))), T)
        with pytest.raises(Refused):
            await receive(trio_es.execute_with_response(es, "a", Refuse()), T)
        with pytest.raises(RuntimeError):
            await receive(trio_es.execute_with_response(es, "a", Explode()), T)
        stats = await receive(trio_es.system_stats(es), T)
        assert (stats.query_actors_count, stats.total_commands_processed) == (1, 2)
        assert await receive(trio_es.aggregate_stats(es, "a"), T) == trio_es.AggregateStats(
            "a", 3, 3, True
        )
        assert await receive(trio_es.aggregate_stats(es, "new"), T) == trio_es.AggregateStats(
            "new", 0, 0, False
        )
        nursery.cancel_scope.cancel()


async def test_messages_for_one_aggregate_run_in_the_order_sent() -> None:
    """500 fire-and-forget commands to one aggregate are applied exactly in send order."""
    async with trio.open_nursery() as nursery:
        es = await start_system(nursery)
        for i in range(500):
            trio_es.execute(es, "fifo", Append((str(i),)))
        aggregate = await receive(trio_es.load_aggregate(es, "fifo"), T)
        assert aggregate.entity == tuple(str(i) for i in range(500))
        events = await receive(trio_es.load_events(es, "fifo"), T)
        assert [e.sequence for e in events] == list(range(1, 501))
        nursery.cancel_scope.cancel()


async def test_rapid_concurrent_commands_on_one_aggregate_are_all_applied() -> None:
    """Concurrent callers on one aggregate leave a gap-free stream containing every item."""
    async with open_counter() as es:
        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(es.execute, "hot", Append((str(i),)))
        events = await es.load_events("hot")
        assert [e.sequence for e in events] == list(range(1, 201))
        assert sorted(int(e.payload.item) for e in events) == list(range(200))


async def test_facade_calls_never_overtake_messages_sent_to_the_subject() -> None:
    """Messages sent on es.subject, then a facade call: the call sees all of them, in order."""
    async with open_counter() as es:
        for round_number in range(3):
            for i in range(100):
                trio_es.execute(es.subject, "mixed", Append((f"{round_number}.{i}",)))
            aggregate = await es.load_aggregate("mixed")
            assert aggregate.sequence == 102 * round_number + 100
            await es.execute("mixed", Append((f"{round_number}.facade",)))
            trio_es.execute(es.subject, "mixed", Append((f"{round_number}.after",)))
        events = await es.load_events("mixed")
        expected = [
            item
            for r in range(3)
            for item in [
                *(f"{r}.{i}" for i in range(100)),
                f"{r}.facade",
                f"{r}.after",
            ]
        ]
        assert [e.payload.item for e in events] == expected


async def test_zero_event_commands_succeed_and_commit_nothing() -> None:
    """A command that makes no events succeeds, is counted, and leaves the stream unchanged."""
    async with open_counter() as es:
        await es.execute("a", Append(("x",)))
        await es.execute("a", Append(()))
        assert (await es.load_aggregate("a")).sequence == 1
        assert (await es.system_stats()).total_commands_processed == 2
        await es.execute("empty", Append(()))
        with pytest.raises(EntityNotFound):
            await es.load_aggregate("empty")


async def test_every_facade_call_is_a_checkpoint() -> None:
    """execute and the loads are Trio checkpoints: a cancel point and a schedule point each."""
    async with open_counter() as es:
        for _ in range(2):  # a first visit, then a live aggregate
            with trio.testing.assert_checkpoints():
                await es.execute("a", Append(("x",)))
            with trio.testing.assert_checkpoints():
                await es.load_aggregate("a")
        with trio.CancelScope() as scope:
            scope.cancel()
            await es.execute("a", Append(("never",)))
        assert scope.cancelled_caught
        assert (await es.load_aggregate("a")).sequence == 2


# -- let it crash --


async def test_a_bug_in_handle_fails_the_command_and_the_aggregate_restarts() -> None:
    """The caller gets handle's exception; state is reloaded; other aggregates are unaffected."""
    store = FakeFaultyStore()
    async with open_counter(store) as es:
        await es.execute("a", Append(("x",)))
        await es.execute("b", Append(("y",)))
        loads = store.loads
        with pytest.raises(RuntimeError, match="bug in handle"):
            await es.execute("a", Explode())
        await es.execute("a", Append(("z",)))
        assert store.loads == loads + 1  # the restarted task reloaded from the store
        assert (await es.load_aggregate("a")).entity == ("x", "z")
        assert (await es.load_aggregate("b")).entity == ("y",)
        assert (await es.system_stats()).total_commands_processed == 3


async def test_a_crash_on_an_idle_loaded_aggregate_restarts_it_and_counts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A crash on a live, idle aggregate restarts its task and counts towards its intensity."""
    store = FakeFaultyStore()
    options = RuntimeOptions(aggregate_intensity=1, aggregate_period=60)
    async with open_counter(store, options=options) as es:
        await es.execute("a", Append(("x",)))  # "a" is live, loaded and idle
        loads = store.loads
        with pytest.raises(RuntimeError, match="bug in handle"):
            await es.execute("a", Explode())
        await es.execute("a", Append(("y",)))
        assert store.loads == loads + 1  # reloaded by the restarted task, not served stale
        assert (await es.load_aggregate("a")).entity == ("x", "y")
        with pytest.raises(RuntimeError, match="bug in handle"):
            await es.execute("a", Explode())
        await trio.testing.wait_all_tasks_blocked()
        # Two crashes within the period exceed intensity 1: the task was stopped for good,
        # and the next call starts "a" afresh from the store.
        assert (await es.system_stats()).live_aggregates == 0
        await es.execute("a", Append(("z",)))
        assert (await es.load_aggregate("a")).entity == ("x", "y", "z")


async def test_a_bug_in_apply_persists_nothing() -> None:
    """When apply raises, the command fails and none of its events are stored."""
    async with open_counter() as es:
        await es.execute("a", Append(("x",)))
        with pytest.raises(RuntimeError, match="bug in apply"):
            await es.execute("a", Append(("ok", "poison")))
        assert [e.payload.item for e in await es.load_events("a")] == ["x"]
        assert (await es.load_aggregate("a")).entity == ("x",)


async def test_a_store_crash_fails_the_command_and_persists_nothing() -> None:
    """An unexpected store exception reaches the caller; the next command works."""
    store = FakeFaultyStore(commit_failures=[OSError("disk on fire")])
    async with open_counter(store) as es:
        with pytest.raises(OSError, match="disk on fire"):
            await es.execute("a", Append(("x",)))
        with pytest.raises(EntityNotFound):
            await es.load_aggregate("a")
        await es.execute("a", Append(("y",)))
        assert (await es.load_aggregate("a")).entity == ("y",)


async def test_transaction_failed_is_retried_on_reloaded_state() -> None:
    """Commits failing with TransactionFailed are retried; the command succeeds once."""
    store = FakeFaultyStore(commit_failures=[TransactionFailed("busy"), TransactionFailed("busy")])
    async with open_counter(store) as es:
        await es.execute("a", Append(("x",)))
        assert [e.payload.item for e in await es.load_events("a")] == ["x"]


async def test_transaction_failed_reaches_the_caller_after_the_retries() -> None:
    """After transaction_retries failed retries the caller gets TransactionFailed."""
    store = FakeFaultyStore(commit_failures=[TransactionFailed("busy")] * 3)
    options = RuntimeOptions(transaction_retries=2)
    async with open_counter(store, options=options) as es:
        with pytest.raises(TransactionFailed, match="busy"):
            await es.execute("a", Append(("x",)))
        await es.execute("a", Append(("y",)))
        assert (await es.load_aggregate("a")).entity == ("y",)


async def test_two_systems_sharing_a_store_resolve_conflicts_by_retrying() -> None:
    """A stale cached aggregate hits a ConcurrencyConflict, reloads, retries; loads catch up."""
    store: MemoryStore[Any, Any] = MemoryStore()
    async with open_counter(store) as first, open_counter(store) as second:
        await first.execute("a", Append(("1",)))
        await second.execute("a", Append(("2",)))  # second loads fresh: sequence 1
        await first.execute("a", Append(("3",)))  # first is stale: conflict, reload, retry
        await second.execute("a", Append(("4",)))
        events = await first.load_events("a")
        assert [(e.sequence, e.payload.item) for e in events] == [
            (1, "1"),
            (2, "2"),
            (3, "3"),
            (4, "4"),
        ]
        # Loads catch up with the store: the other system's writes are seen.
        assert (await first.load_aggregate("a")).entity == ("1", "2", "3", "4")
        assert (await second.load_aggregate("a")).entity == ("1", "2", "3", "4")


async def test_an_aggregate_that_keeps_crashing_is_stopped_until_asked_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Past its restart intensity an aggregate stops; waiting callers get AggregateCrashed."""
    options = RuntimeOptions(aggregate_intensity=1, aggregate_period=60)
    async with trio.open_nursery() as nursery:
        es = await start_system(nursery, handle=async_handle, options=options)
        # While "a" is busy, every later message reaches its mailbox before the crashes.
        trio_es.execute(es, "a", SlowAppend("x", 1))
        replies = [trio_es.execute_with_response(es, "a", Explode()) for _ in range(2)]
        waiting = [trio_es.execute_with_response(es, "a", Append(("y",))) for _ in range(3)]
        for reply in replies:
            with pytest.raises(RuntimeError, match="bug in handle"):
                await receive(reply, T)
        for reply in waiting:
            with pytest.raises(AggregateCrashed) as info:
                await receive(reply, T)
            assert info.value.aggregate_id == "a"
            assert isinstance(info.value.__cause__, RuntimeError)
        # Asked again, it starts afresh from the store.
        assert (await receive(trio_es.load_aggregate(es, "a"), T)).entity == ("x",)
        nursery.cancel_scope.cancel()


async def test_crashes_spread_over_many_aggregates_never_stop_the_system(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Restart intensity counts per aggregate: 100 aggregates crashing once each are all fine."""
    async with open_counter(options=RuntimeOptions(aggregate_intensity=1)) as es:
        for i in range(100):
            with pytest.raises(RuntimeError):
                await es.execute(f"acc-{i}", Explode())
        for i in range(100):
            await es.execute(f"acc-{i}", Append(("ok",)))
        assert (await es.system_stats()).total_commands_processed == 100


async def test_a_crashing_query_is_restarted_and_commands_keep_flowing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A query that raises gets its batch again after a back-off; commands keep succeeding."""
    seen: list[str] = []
    failures = [RuntimeError("query bug")]

    def flaky(aggregate_id: str, events: Sequence[trio_es.EventEnvelope[Any]]) -> None:
        if failures:
            raise failures.pop()
        seen.extend(e.payload.item for e in events)

    async with open_counter(queries=[(new_name("flaky"), flaky)]) as es:
        await es.execute("a", Append(("redelivered",)))
        await es.execute("a", Append(("seen",)))
        await es.execute("b", Append(("also seen",)))
        await trio.sleep(1)
    assert seen == ["redelivered", "seen", "also seen"]


async def test_a_full_aggregate_mailbox_refuses_with_mailbox_full(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """When an aggregate's mailbox is full, further callers get MailboxFull, not a hang."""
    options = RuntimeOptions(mailbox_capacity=2)
    async with trio.open_nursery() as nursery:
        es = await start_system(nursery, handle=async_handle, options=options)
        busy = trio_es.execute_with_response(es, "a", SlowAppend("slow", 10))
        await trio.testing.wait_all_tasks_blocked()
        replies = [trio_es.execute_with_response(es, "a", Append((str(i),))) for i in range(4)]
        assert await receive(busy, 20_000) is None
        outcomes: list[int | None] = []
        for reply in replies:
            try:
                answer: None = await receive(reply, T)
                outcomes.append(answer)
            except MailboxFull as full:
                outcomes.append(full.capacity)
        assert outcomes == [None, None, 2, 2]
        nursery.cancel_scope.cancel()


# -- pipelining: commands queued behind a commit share the next one --


async def queue_behind_a_slow_command(es: Any, commands: list[Any]) -> list[Any]:
    """Send a slow command, then ``commands`` while it runs; return their replies."""
    busy = trio_es.execute_with_response(es, "p", SlowAppend("slow", 1))
    await trio.testing.wait_all_tasks_blocked()
    replies = [
        trio_es.execute_with_response(es, "p", command, [("n", str(n))])
        for n, command in enumerate(commands)
    ]
    assert await receive(busy, T) is None
    return replies


async def test_commands_queued_behind_a_commit_share_the_next_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Twenty commands queued for one aggregate are committed in one transaction, in order."""
    store = FakeFaultyStore()
    async with trio.open_nursery() as nursery:
        es = await start_system(nursery, eventstore=store, handle=async_handle)
        replies = await queue_behind_a_slow_command(es, [Append((str(n),)) for n in range(20)])
        for reply in replies:
            assert await receive(reply, T) is None
        events = await receive(trio_es.load_events(es, "p"), T)
        assert [e.payload.item for e in events] == ["slow", *(str(n) for n in range(20))]
        assert [e.metadata for e in events[1:]] == [(("n", str(n)),) for n in range(20)]
        assert len(store.writing_transactions) == 2
        stats = await receive(trio_es.system_stats(es), T)
        assert stats.total_commands_processed == 21
        nursery.cancel_scope.cancel()


async def test_a_rejection_in_a_pipelined_batch_fails_only_that_command(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A domain error among queued commands rejects that one; the others commit together."""
    store = FakeFaultyStore()
    async with trio.open_nursery() as nursery:
        es = await start_system(nursery, eventstore=store, handle=async_handle)
        commands = [Append(("a",)), Refuse(), Append(("b", "c")), Append(())]
        replies = await queue_behind_a_slow_command(es, commands)
        assert await receive(replies[0], T) is None
        with pytest.raises(Refused):
            await receive(replies[1], T)
        assert await receive(replies[2], T) is None
        assert await receive(replies[3], T) is None
        aggregate = await receive(trio_es.load_aggregate(es, "p"), T)
        assert aggregate == trio_es.Aggregate("p", ("slow", "a", "b", "c"), 4)
        assert len(store.writing_transactions) == 2
        nursery.cancel_scope.cancel()


async def test_a_crash_in_a_pipelined_batch_runs_its_commands_one_by_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A bug among queued commands: earlier ones commit, it fails and crashes, later ones run."""
    store = FakeFaultyStore()
    async with trio.open_nursery() as nursery:
        es = await start_system(nursery, eventstore=store, handle=async_handle)
        commands = [Append(("a",)), Explode(), Append(("b",)), Append(("poison",)), Append(("c",))]
        replies = await queue_behind_a_slow_command(es, commands)
        assert await receive(replies[0], T) is None
        with pytest.raises(RuntimeError, match="bug in handle"):
            await receive(replies[1], T)
        assert await receive(replies[2], T) is None
        with pytest.raises(RuntimeError, match="bug in apply"):
            await receive(replies[3], T)
        assert await receive(replies[4], T) is None
        events = await receive(trio_es.load_events(es, "p"), T)
        assert [e.payload.item for e in events] == ["slow", "a", "b", "c"]
        assert [e.sequence for e in events] == [1, 2, 3, 4]
        nursery.cancel_scope.cancel()


async def test_a_conflict_in_a_pipelined_batch_is_decided_again_as_a_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """When another writer got there first, the whole batch is decided again on fresh state."""
    shared = FakeFaultyStore()
    async with trio.open_nursery() as nursery:
        es = await start_system(nursery, eventstore=shared, handle=async_handle)
        async with open_counter(shared.inner) as other:

            async def write_meanwhile() -> None:
                await trio.sleep(1.5)  # while the batch below is being decided
                await other.execute("p", Append(("theirs",)))

            nursery.start_soon(write_meanwhile)
            # The batch: a slow command (t = 1..2) and four quick ones behind it.
            commands = [SlowAppend("0", 1), *(Append((str(n),)) for n in range(1, 5))]
            replies = await queue_behind_a_slow_command(es, commands)
            for reply in replies:
                assert await receive(reply, T) is None
        events = await receive(trio_es.load_events(es, "p"), T)
        assert [e.sequence for e in events] == list(range(1, 8))
        assert [e.payload.item for e in events] == ["slow", "theirs", "0", "1", "2", "3", "4"]
        # The slow command, the batch that conflicted, and the same batch decided again
        # on reloaded state and committed once.
        assert len(shared.writing_transactions) == 3
        nursery.cancel_scope.cancel()


# -- one task per aggregate: concurrency, caching, idling --


async def test_a_slow_aggregate_does_not_stall_the_others(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """While one aggregate's async handle sleeps 10 s, another aggregate's command completes."""
    async with open_counter(handle=async_handle) as es, trio.open_nursery() as nursery:
        nursery.start_soon(es.execute, "slow", SlowAppend("s", 10))
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        await es.execute("fast", Append(("f",)))
        assert trio.current_time() - start < 1
        assert (await es.load_aggregate("fast")).entity == ("f",)


async def test_state_is_cached_not_replayed_per_command() -> None:
    """A live aggregate loads its events once, however many commands it handles."""
    store = FakeFaultyStore()
    async with open_counter(store) as es:
        for i in range(50):
            await es.execute("a", Append((str(i),)))
        assert store.loads == 1


async def test_idle_aggregates_stop_and_reload_on_demand(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After idle_timeout an aggregate task stops; the next message reloads it from the store."""
    store = FakeFaultyStore()
    options = RuntimeOptions(idle_timeout=30)
    async with open_counter(store, options=options) as es:
        for i in range(20):
            await es.execute(f"acc-{i}", Append(("x",)))
        assert (await es.system_stats()).live_aggregates == 20
        await trio.sleep(31)
        assert (await es.system_stats()).live_aggregates == 0
        assert (await es.load_aggregate("acc-3")).entity == ("x",)
        assert store.loads == 21
        assert (await es.system_stats()).live_aggregates == 1


async def test_memory_stays_bounded_when_many_aggregates_are_touched_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """5,000 aggregates touched once all leave memory after idle_timeout."""
    async with open_counter(options=RuntimeOptions(idle_timeout=1)) as es:
        async with trio.open_nursery() as nursery:
            for i in range(5_000):
                nursery.start_soon(es.execute, f"once-{i}", Append(("x",)))
        await trio.sleep(2)
        stats = await es.system_stats()
        assert stats.live_aggregates == 0
        assert stats.total_commands_processed == 5_000


async def test_many_live_aggregates_stop_without_waiting_out_a_grace_period(
    mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Leaving the block with 2,000 live aggregates stops them all, with no warning logged."""
    async with open_counter(options=RuntimeOptions(idle_timeout=1e12)) as es:
        for i in range(2_000):
            await es.execute(f"live-{i}", Append(("x",)))
        assert (await es.system_stats()).live_aggregates == 2_000
        # Real time spent by the scheduler now counts heavily in clock time (1 ms is
        # 10 s), as it does with 100,000 aggregates: no grace may be spent on the group.
        mock_clock.rate = 10_000
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_busy_aggregate_is_not_stopped_while_in_use(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Messages arriving more often than idle_timeout keep the aggregate task alive."""
    store = FakeFaultyStore()
    async with open_counter(store, options=RuntimeOptions(idle_timeout=5)) as es:
        for i in range(10):
            await es.execute("a", Append((str(i),)))
            await trio.sleep(4)
        assert store.loads == 1


async def test_restart_reloads_from_snapshot_plus_tail(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A reloaded aggregate starts from its latest snapshot and replays only later events."""
    store = FakeFaultyStore()
    config = SnapshotConfig(frequency(4))
    async with open_counter(
        store, snapshot_config=config, options=RuntimeOptions(idle_timeout=1)
    ) as es:
        await es.execute("a", Append(tuple("abcdef")))
        await trio.sleep(2)
        await es.execute("a", Append(("g",)))
        assert (await es.load_aggregate("a")).entity == tuple("abcdefg")
        snapshot = await es.latest_snapshot("a")
        assert snapshot is not None
        assert snapshot.sequence == 6


async def test_the_supervised_memory_store_works_end_to_end() -> None:
    """memory_store.supervised gives a store served by two actors under a supervisor."""
    store, store_spec = trio_es.memory_store.supervised(new_name("events"), new_name("snapshots"))
    name = new_name("counter")
    spec = trio_es.supervised(
        name=name,
        eventstore=store,
        handle=handle,
        apply=apply,
        empty_state=(),
        snapshot_config=SnapshotConfig(frequency(2)),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(StaticSupervisor(Strategy.REST_FOR_ONE).add(store_spec).add(spec).run)
        es = named_subject(name)
        await receive(trio_es.execute_with_response(es, "a", Append(("x", "y", "z"))), T)
        events = await receive(trio_es.load_events(es, "a"), T)
        assert [e.payload.item for e in events] == ["x", "y", "z"]
        snapshot = await receive(trio_es.latest_snapshot(es, "a"), T)
        assert snapshot is not None
        assert snapshot.sequence == 3
        nursery.cancel_scope.cancel()


# -- the property: cached state = replay of stored events = snapshot + tail --

commands = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),
        st.one_of(
            st.builds(Append, st.lists(st.sampled_from("xyz"), max_size=4).map(tuple)),
            st.just(Refuse()),
            st.just("pause"),
        ),
    ),
    max_size=40,
)


@given(commands=commands, every=st.integers(min_value=1, max_value=5))
def test_cached_state_equals_replay_equals_snapshot_plus_tail(
    commands: list[tuple[str, Any]], every: int
) -> None:
    """For random command sequences, cached state, full replay and snapshot+tail all agree."""

    async def main() -> None:
        options = RuntimeOptions(idle_timeout=10)
        async with open_counter(
            snapshot_config=SnapshotConfig(frequency(every)), options=options
        ) as es:
            for aggregate_id, command in commands:
                if command == "pause":
                    await trio.sleep(11)  # idle: the next command reloads snapshot + tail
                    continue
                with contextlib.suppress(Refused):
                    await es.execute(aggregate_id, command)
            for aggregate_id in ("a", "b", "c"):
                events = await es.load_events(aggregate_id)
                assert [e.sequence for e in events] == list(range(1, len(events) + 1))
                if not events:
                    with pytest.raises(EntityNotFound):
                        await es.load_aggregate(aggregate_id)
                    continue
                cached = await es.load_aggregate(aggregate_id)
                assert cached.entity == replay(events)
                assert cached.sequence == len(events)
                snapshot = await es.latest_snapshot(aggregate_id)
                if snapshot is not None:
                    tail = [e for e in events if e.sequence > snapshot.sequence]
                    assert replay(tail, snapshot.entity) == cached.entity

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_open_eventsourcing_infers_the_state_type_from_handle_and_apply() -> None:
    """empty_state=() with a tuple[str, ...] apply types the system without a cast (mypy)."""
    async with trio_es.open_eventsourcing(
        eventstore=MemoryStore[Appended, tuple[str, ...]](),
        handle=handle,
        apply=apply,
        empty_state=(),
    ) as es:
        await es.execute("a", Append(("x",)))
        aggregate = await es.load_aggregate("a")
        assert_type(aggregate.entity, tuple[str, ...])
        assert aggregate.entity == ("x",)


async def test_an_idle_aggregate_stops_exactly_idle_timeout_after_its_last_message(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An aggregate is still live just before idle_timeout after its last message, gone after."""
    async with open_counter(options=RuntimeOptions(idle_timeout=30)) as es:
        await es.execute("early", Append(("x",)))
        await trio.sleep(10)
        await es.execute("late", Append(("x",)))
        await trio.sleep(19.9)
        assert (await es.system_stats()).live_aggregates == 2
        await trio.sleep(0.2)
        assert (await es.system_stats()).live_aggregates == 1
        await trio.sleep(9.8)
        assert (await es.system_stats()).live_aggregates == 1
        await trio.sleep(0.2)
        assert (await es.system_stats()).live_aggregates == 0

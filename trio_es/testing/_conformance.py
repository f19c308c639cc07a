"""A conformance suite for event stores: run trio_es's store tests against your store.

Subclass :class:`EventStoreConformance` in a test module and give it a ``store`` fixture
that yields a fresh, empty store whose transcoder (if it serializes) comes from
:func:`conformance_transcoder`::

    from trio_es.testing import EventStoreConformance, conformance_transcoder

    class TestMyStore(EventStoreConformance):
        @pytest.fixture
        async def store(self, tmp_path):
            async with MyStore.open(tmp_path / "db", transcoder=conformance_transcoder()) as s:
                yield s

pytest collects every ``test_*`` method of the subclass. The tests need pytest and
pytest-trio with ``trio_mode = true`` (or mark them yourself). Class attributes switch
off what a store does not have (see :class:`ProjectionSourceConformance` for the
subscription and projection side):

* ``supports_serialization = False`` for stores that keep Python objects (the memory
  store): the serialization-error tests are skipped.
* ``supports_read_all = False`` for stores without ``read_all(after_position, limit)``.

Every test talks to the store only through the ``EventStore`` protocol (plus
``read_all``), inside ``async with store.transaction() as tx`` blocks, and holds no
transaction open while it waits for another, so stores that lock rows or tables inside
a transaction pass too.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, ClassVar, Final, TypeAlias

import attrs
import pytest
import trio
import trio.lowlevel
import trio.testing

from .._errors import CheckpointMoved, ConcurrencyConflict, EventStoreError
from .._serialization import Transcoder
from .._store import committed_envelopes
from .._types import Aggregate, Metadata, Snapshot, utc_now

__all__ = [
    "ODD_IDS",
    "ODD_METADATA",
    "Added",
    "Counter",
    "EventStoreConformance",
    "ProjectionSourceConformance",
    "Renamed",
    "Tagged",
    "Unregistered",
    "conformance_transcoder",
]


@attrs.frozen
class Added:
    """Conformance event: add ``amount`` to the counter."""

    amount: int


@attrs.frozen
class Renamed:
    """Conformance event: rename the counter."""

    name: str


@attrs.frozen
class Tagged:
    """Conformance event with a nested collection and a timestamp."""

    tags: tuple[str, ...]
    at: datetime.datetime


@attrs.frozen
class Unregistered:
    """An event class that :func:`conformance_transcoder` does not register."""

    note: str


@attrs.frozen
class Counter:
    """The conformance entity, kept in snapshots."""

    total: int = 0
    name: str = ""


def conformance_transcoder() -> Transcoder:
    """A transcoder with the conformance events and entity registered (not ``Unregistered``)."""
    transcoder = Transcoder()
    transcoder.register_event(Added, name="conformance.Added")
    transcoder.register_event(Renamed, name="conformance.Renamed")
    transcoder.register_event(Tagged, name="conformance.Tagged")
    transcoder.register_entity(Counter, name="conformance.Counter")
    return transcoder


#: Aggregate ids that break naive SQL or encodings. The long one is repetitive on
#: purpose: PostgreSQL's btree indexes take long keys only when they compress.
ODD_IDS: Final = (
    "it's",
    'say "hi"',
    "x'; DROP TABLE events; --",
    "Robert'); DELETE FROM snapshots WHERE ('1'='1",
    "percent %s %(name)s ? $1 :name",
    "back\\slash and new\nline\ttab",
    "ünïcødé 日本語 العربية 🎉",
    " ",
    "x" * 10_000,
)

#: Metadata with empty, quoted, SQL-like, JSON-like, repeated and long strings.
ODD_METADATA: Final[Metadata] = (
    ("", ""),
    ("quote'", 'double"'),
    ("sql", "'); DROP TABLE events; --"),
    ("json", '{"a": [1, 2], "b": null}'),
    ("unicode", "日本語 🎉 ünï"),
    ("repeated", "1"),
    ("repeated", "2"),
    ("long", "y" * 10_000),
)

_NO_ENTITY: Final = Counter()


async def _commit(
    store: Any,
    aggregate_id: str,
    sequence: int,
    events: Iterable[Any],
    metadata: Metadata = (),
) -> tuple[list[Any], int]:
    async with store.transaction() as tx:
        result: tuple[list[Any], int] = await store.commit_events(
            tx, Aggregate(aggregate_id, _NO_ENTITY, sequence), events, metadata
        )
    return result


async def _load(store: Any, aggregate_id: str, start_from: int = 0) -> list[Any]:
    async with store.transaction() as tx:
        events: list[Any] = await store.load_events(tx, aggregate_id, start_from)
    return events


async def _snapshot(store: Any, aggregate_id: str) -> Snapshot[Any] | None:
    async with store.transaction() as tx:
        snapshot: Snapshot[Any] | None = await store.load_snapshot(tx, aggregate_id)
    return snapshot


def _shape(envelopes: Sequence[Any]) -> list[tuple[str, int, Any, Metadata]]:
    return [(e.aggregate_id, e.sequence, e.payload, e.metadata) for e in envelopes]


class EventStoreConformance:
    """The store tests; subclass it (as ``Test...``) and define a ``store`` fixture."""

    #: False for stores that keep objects and cannot fail to serialize.
    supports_serialization: ClassVar[bool] = True
    #: False for stores without ``read_all(after_position, limit)``.
    supports_read_all: ClassVar[bool] = True

    @pytest.fixture
    def store(self) -> Any:
        """Override: yield a fresh, empty store (an async fixture is fine)."""
        raise NotImplementedError(
            "define a `store` fixture in your EventStoreConformance subclass that yields a "
            "fresh, empty store"
        )

    # -- appending and loading --

    async def test_unknown_aggregate_has_no_events(self, store: Any) -> None:
        """Loading an aggregate that was never written returns an empty list."""
        assert await _load(store, "nobody") == []

    async def test_append_then_load_in_order(self, store: Any) -> None:
        """Committed events load back in sequence order, numbered from 1, with metadata."""
        events = [Added(1), Renamed("savings"), Added(-3)]
        await _commit(store, "acc", 0, events, (("user", "ann"),))
        loaded = await _load(store, "acc")
        assert _shape(loaded) == [
            ("acc", i, event, (("user", "ann"),)) for i, event in enumerate(events, start=1)
        ]

    async def test_commit_returns_the_stored_envelopes_and_new_sequence(self, store: Any) -> None:
        """commit_events returns the envelopes a later load returns, and the new sequence."""
        envelopes, sequence = await _commit(store, "acc", 0, [Added(1), Added(2)], (("k", "v"),))
        assert sequence == 2
        assert _shape(envelopes) == _shape(await _load(store, "acc"))

    async def test_every_event_has_a_unique_id_that_loads_return(self, store: Any) -> None:
        """Envelopes carry a distinct event_id from commit on; loads and read_all return it."""
        envelopes, _ = await _commit(store, "acc", 0, [Added(1), Added(2)])
        more, _ = await _commit(store, "other", 0, [Added(3)])
        ids = [e.event_id for e in [*envelopes, *more]]
        assert all(isinstance(event_id, uuid.UUID) for event_id in ids)
        assert len(set(ids)) == 3
        assert [e.event_id for e in await _load(store, "acc")] == ids[:2]
        if self.supports_read_all:
            stored = await store.read_all(0, 10)
            assert [s.envelope.event_id for s in stored] == ids

    async def test_commits_continue_the_sequence(self, store: Any) -> None:
        """Successive commits append after the previous one without gaps."""
        _, sequence = await _commit(store, "acc", 0, [Added(1)])
        _, sequence = await _commit(store, "acc", sequence, [Added(2), Added(3)])
        _, sequence = await _commit(store, "acc", sequence, [Added(4)])
        assert sequence == 4
        loaded = await _load(store, "acc")
        assert [(e.sequence, e.payload) for e in loaded] == [(i, Added(i)) for i in range(1, 5)]

    async def test_load_from_start_from(self, store: Any) -> None:
        """load_events returns only events with a sequence greater than start_from."""
        await _commit(store, "acc", 0, [Added(i) for i in range(1, 6)])
        assert [e.sequence for e in await _load(store, "acc", 2)] == [3, 4, 5]
        assert [e.sequence for e in await _load(store, "acc", 5)] == []
        assert [e.sequence for e in await _load(store, "acc", 99)] == []

    async def test_zero_events_commit_writes_nothing(self, store: Any) -> None:
        """Committing no events returns no envelopes and the unchanged sequence."""
        assert await _commit(store, "acc", 0, []) == ([], 0)
        assert await _load(store, "acc") == []

    async def test_many_events_in_one_commit(self, store: Any) -> None:
        """A commit of 1000 events stores all of them in order."""
        await _commit(store, "big", 0, [Added(i) for i in range(1000)])
        loaded = await _load(store, "big")
        assert [e.payload.amount for e in loaded] == list(range(1000))
        assert [e.sequence for e in loaded] == list(range(1, 1001))

    async def test_event_values_round_trip(self, store: Any) -> None:
        """Nested tuples and aware datetimes in events load back equal."""
        event = Tagged(("a", "b c", "ü"), datetime.datetime(2024, 2, 29, 12, 0, 1, 5, datetime.UTC))
        await _commit(store, "acc", 0, [event])
        assert [e.payload for e in await _load(store, "acc")] == [event]

    async def test_metadata_round_trips(self, store: Any) -> None:
        """Odd metadata (quoted, SQL-like, repeated, 10 kB) is kept with each event of a commit."""
        await _commit(store, "acc", 0, [Added(1), Added(2)], ODD_METADATA)
        assert [e.metadata for e in await _load(store, "acc")] == [ODD_METADATA, ODD_METADATA]

    async def test_aggregates_are_isolated(self, store: Any) -> None:
        """Events of one aggregate never appear in another's stream."""
        await _commit(store, "a", 0, [Added(1)])
        await _commit(store, "b", 0, [Added(2), Added(3)])
        assert [e.payload for e in await _load(store, "a")] == [Added(1)]
        assert [e.payload for e in await _load(store, "b")] == [Added(2), Added(3)]

    async def test_transaction_sees_its_own_writes(self, store: Any) -> None:
        """Inside a transaction, loads include the events and snapshot it has written."""
        await _commit(store, "acc", 0, [Added(1)])
        snapshot = Snapshot("acc", Counter(3), 2, utc_now())
        async with store.transaction() as tx:
            await store.commit_events(tx, Aggregate("acc", _NO_ENTITY, 1), [Added(2)], ())
            await store.save_snapshot(tx, snapshot)
            inside = await store.load_events(tx, "acc", 0)
            assert [(e.sequence, e.payload) for e in inside] == [(1, Added(1)), (2, Added(2))]
            assert [e.sequence for e in await store.load_events(tx, "acc", 1)] == [2]
            loaded = await store.load_snapshot(tx, "acc")
            assert loaded is not None
            assert (loaded.entity, loaded.sequence) == (Counter(3), 2)

    # -- what commit_events accepts --

    async def test_any_iterable_of_events_is_stored_once(self, store: Any) -> None:
        """A generator, tuple, map or dict view of events: each event stored once, enveloped."""
        consumed: list[int] = []

        def generate() -> Iterator[Added]:
            for amount in (1, 2, 3):
                consumed.append(amount)
                yield Added(amount)

        envelopes, sequence = await _commit(store, "gen", 0, generate())
        assert consumed == [1, 2, 3]
        assert (len(envelopes), sequence) == (3, 3)
        _, sequence = await _commit(store, "gen", sequence, (Added(4), Added(5)))
        _, sequence = await _commit(store, "gen", sequence, map(Added, [6]))
        _, sequence = await _commit(store, "gen", sequence, {"k": Added(7)}.values())
        _, sequence = await _commit(store, "gen", sequence, iter([]))
        assert sequence == 7
        loaded = await _load(store, "gen")
        assert [(e.sequence, e.payload) for e in loaded] == [(n, Added(n)) for n in range(1, 8)]
        assert _shape(envelopes) == _shape(loaded[:3])
        if self.supports_read_all:
            assert len(await store.read_all(0, 100)) == 7

    @pytest.mark.parametrize(
        "events",
        [None, 5, Added(1), "Added", b"xy", {"a": Added(1)}],
        ids=["None", "int", "event", "str", "bytes", "mapping"],
    )
    async def test_events_that_are_not_an_iterable_of_events_are_refused(
        self, store: Any, events: object
    ) -> None:
        """None, a non-iterable, a str, bytes or a mapping: TypeError naming it, nothing staged."""
        async with store.transaction() as tx:
            await store.commit_events(tx, Aggregate("ok", _NO_ENTITY, 0), [Added(1)], ())
            with pytest.raises(TypeError, match=r"events must be an iterable") as info:
                await store.commit_events(tx, Aggregate("bad", _NO_ENTITY, 0), events, ())
            assert type(events).__name__ in str(info.value)
            # The transaction is unchanged and still usable, for "bad" too.
            await store.commit_events(tx, Aggregate("bad", _NO_ENTITY, 0), [Added(2)], ())
        assert [e.payload for e in await _load(store, "ok")] == [Added(1)]
        assert [e.payload for e in await _load(store, "bad")] == [Added(2)]

    async def test_refused_commit_events_leaves_the_transaction_usable(self, store: Any) -> None:
        """A commit_events call that raises changes nothing; the block's other writes commit."""
        await _commit(store, "acc", 0, [Added(1)])

        def failing() -> Iterator[Added]:
            yield Added(100)
            raise ValueError("the domain broke while producing events")

        async with store.transaction() as tx:
            await store.commit_events(tx, Aggregate("other", _NO_ENTITY, 0), [Added(5)], ())
            await store.commit_events(tx, Aggregate("acc", _NO_ENTITY, 1), [Added(2)], ())
            with pytest.raises(ValueError, match="domain broke"):
                await store.commit_events(tx, Aggregate("acc", _NO_ENTITY, 2), failing(), ())
            # Staged events must be continued, not skipped or repeated.
            with pytest.raises(ConcurrencyConflict):
                await store.commit_events(tx, Aggregate("acc", _NO_ENTITY, 1), [Added(9)], ())
            if self.supports_serialization:
                with pytest.raises(EventStoreError, match="register"):
                    await store.commit_events(
                        tx, Aggregate("acc", _NO_ENTITY, 2), [Added(3), Unregistered("x")], ()
                    )
                with pytest.raises(EventStoreError, match="register"):
                    await store.commit_events(
                        tx, Aggregate("new", _NO_ENTITY, 0), [Unregistered("x")], ()
                    )
            inside = await store.load_events(tx, "acc", 0)
            assert [(e.sequence, e.payload) for e in inside] == [(1, Added(1)), (2, Added(2))]
            await store.commit_events(tx, Aggregate("acc", _NO_ENTITY, 2), [Added(3)], ())
        loaded = await _load(store, "acc")
        assert [(e.sequence, e.payload) for e in loaded] == [(n, Added(n)) for n in (1, 2, 3)]
        assert [e.payload for e in await _load(store, "other")] == [Added(5)]
        assert await _load(store, "new") == []

    # -- snapshots --

    async def test_no_snapshot_is_none(self, store: Any) -> None:
        """An aggregate without a snapshot loads None."""
        assert await _snapshot(store, "acc") is None

    async def test_snapshot_save_and_load(self, store: Any) -> None:
        """A saved snapshot loads back with its entity, sequence and timestamp."""
        await _commit(store, "acc", 0, [Added(5)])
        snapshot = Snapshot("acc", Counter(5, "main"), 1, utc_now())
        async with store.transaction() as tx:
            await store.save_snapshot(tx, snapshot)
        assert await _snapshot(store, "acc") == snapshot
        assert await _snapshot(store, "other") is None

    async def test_snapshot_is_replaced(self, store: Any) -> None:
        """Saving a newer snapshot replaces the older one."""
        await _commit(store, "acc", 0, [Added(1), Added(2)])
        first = Snapshot("acc", Counter(1), 1, utc_now())
        second = Snapshot("acc", Counter(3), 2, utc_now())
        async with store.transaction() as tx:
            await store.save_snapshot(tx, first)
        async with store.transaction() as tx:
            await store.save_snapshot(tx, second)
        assert await _snapshot(store, "acc") == second

    async def test_snapshot_committed_with_events(self, store: Any) -> None:
        """Events and a snapshot written in one transaction are both stored."""
        async with store.transaction() as tx:
            await store.commit_events(tx, Aggregate("acc", _NO_ENTITY, 0), [Added(7)], ())
            await store.save_snapshot(tx, Snapshot("acc", Counter(7), 1, utc_now()))
        assert [e.payload for e in await _load(store, "acc")] == [Added(7)]
        snapshot = await _snapshot(store, "acc")
        assert snapshot is not None
        assert (snapshot.entity, snapshot.sequence) == (Counter(7), 1)

    # -- optimistic concurrency and atomicity --

    async def test_stale_sequence_conflicts_and_writes_nothing(self, store: Any) -> None:
        """A commit decided on an old sequence raises ConcurrencyConflict and writes nothing."""
        await _commit(store, "acc", 0, [Added(1), Added(2)])
        with pytest.raises(ConcurrencyConflict) as info:
            await _commit(store, "acc", 1, [Added(99)])
        assert (info.value.aggregate_id, info.value.expected_sequence) == ("acc", 1)
        assert info.value.actual_sequence == 2
        assert [e.payload for e in await _load(store, "acc")] == [Added(1), Added(2)]
        # The store is still usable: a commit on the right sequence succeeds.
        assert (await _commit(store, "acc", 2, [Added(3)]))[1] == 3

    async def test_ahead_sequence_conflicts(self, store: Any) -> None:
        """A commit that claims a sequence the aggregate has not reached is refused."""
        await _commit(store, "acc", 0, [Added(1)])
        with pytest.raises(ConcurrencyConflict):
            await _commit(store, "acc", 5, [Added(2)])
        assert [e.sequence for e in await _load(store, "acc")] == [1]

    async def test_two_transactions_on_the_same_sequence_exactly_one_wins(self, store: Any) -> None:
        """Two concurrent transactions on the same sequence: one commits, the other conflicts."""
        await _commit(store, "acc", 0, [Added(1)])
        outcomes: dict[int, str] = {}

        async def attempt(amount: int) -> None:
            try:
                async with store.transaction() as tx:
                    await store.commit_events(
                        tx, Aggregate("acc", _NO_ENTITY, 1), [Added(amount)], ()
                    )
                    # Let the other transaction stage its write before this one commits.
                    await trio.sleep(0.01)
                outcomes[amount] = "won"
            except ConcurrencyConflict:
                outcomes[amount] = "conflict"

        async with trio.open_nursery() as nursery:
            nursery.start_soon(attempt, 10)
            nursery.start_soon(attempt, 20)
        assert sorted(outcomes.values()) == ["conflict", "won"]
        winner = next(amount for amount, result in outcomes.items() if result == "won")
        loaded = await _load(store, "acc")
        assert [(e.sequence, e.payload) for e in loaded] == [(1, Added(1)), (2, Added(winner))]

    async def test_conflict_in_multi_aggregate_transaction_writes_nothing(self, store: Any) -> None:
        """A conflict on one aggregate of a transaction discards its writes to every aggregate."""
        await _commit(store, "y", 0, [Added(1)])

        async def write_both() -> None:
            async with store.transaction() as tx:
                await store.commit_events(tx, Aggregate("x", _NO_ENTITY, 0), [Added(1)], ())
                await store.save_snapshot(tx, Snapshot("x", Counter(1), 1, utc_now()))
                await store.commit_events(tx, Aggregate("y", _NO_ENTITY, 0), [Added(2)], ())

        with pytest.raises(ConcurrencyConflict) as info:
            await write_both()
        assert info.value.aggregate_id == "y"
        assert await _load(store, "x") == []
        assert await _snapshot(store, "x") is None
        assert [e.payload for e in await _load(store, "y")] == [Added(1)]

    async def test_exception_in_block_rolls_back(self, store: Any) -> None:
        """An exception inside the block propagates unchanged and the block writes nothing."""
        await _commit(store, "acc", 0, [Added(1)])
        boom = RuntimeError("boom")

        async def fail_inside() -> None:
            async with store.transaction() as tx:
                await store.commit_events(tx, Aggregate("acc", _NO_ENTITY, 1), [Added(2)], ())
                await store.save_snapshot(tx, Snapshot("acc", Counter(3), 2, utc_now()))
                raise boom

        with pytest.raises(RuntimeError) as info:
            await fail_inside()
        assert info.value is boom
        assert [e.sequence for e in await _load(store, "acc")] == [1]
        assert await _snapshot(store, "acc") is None
        assert (await _commit(store, "acc", 1, [Added(2)]))[1] == 2

    async def test_concurrent_writers_keep_sequences_contiguous(self, store: Any) -> None:
        """Writers racing with reload-and-retry on conflicts never lose or duplicate an event."""
        writers, commits = 4, 10

        async def writer(number: int) -> None:
            for index in range(commits):
                while True:
                    loaded = await _load(store, "shared")
                    await trio.lowlevel.checkpoint()  # let the others read the same sequence
                    try:
                        await _commit(store, "shared", len(loaded), [Added(number * 100 + index)])
                        break
                    except ConcurrencyConflict:
                        continue

        async with trio.open_nursery() as nursery:
            for number in range(writers):
                nursery.start_soon(writer, number)
        loaded = await _load(store, "shared")
        assert [e.sequence for e in loaded] == list(range(1, writers * commits + 1))
        assert sorted(e.payload.amount for e in loaded) == sorted(
            n * 100 + i for n in range(writers) for i in range(commits)
        )

    async def test_concurrent_commits_fail_only_the_stale_one(self, store: Any) -> None:
        """Transactions committing at once (batched, if the store batches): only the stale fails."""
        for number in range(20):
            await _commit(store, f"acc-{number}", 0, [Added(number)])
        outcomes: dict[str, str] = {}

        async def commit(name: str, aggregate_id: str, sequence: int, amount: int) -> None:
            try:
                await _commit(store, aggregate_id, sequence, [Added(amount), Added(-amount)])
            except ConcurrencyConflict:
                outcomes[name] = "conflict"
            else:
                outcomes[name] = "ok"

        async with trio.open_nursery() as nursery:
            for number in range(20):
                nursery.start_soon(commit, f"fresh-{number}", f"acc-{number}", 1, number)
            nursery.start_soon(commit, "stale", "acc-7", 0, 1000)
        assert outcomes.pop("stale") == "conflict"
        assert set(outcomes.values()) == {"ok"}
        for number in range(20):
            loaded = await _load(store, f"acc-{number}")
            assert [e.payload for e in loaded] == [Added(number), Added(number), Added(-number)]

    # -- odd input --

    async def test_odd_aggregate_ids_round_trip(self, store: Any) -> None:
        """Ids with quotes, SQL fragments, unicode, whitespace and 10 kB round-trip, isolated."""
        for number, aggregate_id in enumerate(ODD_IDS):
            await _commit(store, aggregate_id, 0, [Added(number), Added(-number)], ODD_METADATA)
            async with store.transaction() as tx:
                await store.save_snapshot(tx, Snapshot(aggregate_id, Counter(number), 2, utc_now()))
        for number, aggregate_id in enumerate(ODD_IDS):
            loaded = await _load(store, aggregate_id)
            assert _shape(loaded) == [
                (aggregate_id, 1, Added(number), ODD_METADATA),
                (aggregate_id, 2, Added(-number), ODD_METADATA),
            ]
            snapshot = await _snapshot(store, aggregate_id)
            assert snapshot is not None
            assert (snapshot.aggregate_id, snapshot.entity) == (aggregate_id, Counter(number))

    async def test_unregistered_event_raises_and_writes_nothing(self, store: Any) -> None:
        """An event the store cannot serialize raises EventStoreError naming the fix; no writes."""
        if not self.supports_serialization:
            pytest.skip("this store keeps objects and serializes nothing")
        await _commit(store, "acc", 0, [Added(1)])

        async def write_unregistered() -> None:
            async with store.transaction() as tx:
                await store.commit_events(tx, Aggregate("other", _NO_ENTITY, 0), [Added(5)], ())
                await store.commit_events(
                    tx, Aggregate("acc", _NO_ENTITY, 1), [Added(2), Unregistered("x")], ()
                )

        with pytest.raises(EventStoreError, match="register"):
            await write_unregistered()
        assert [e.sequence for e in await _load(store, "acc")] == [1]
        assert await _load(store, "other") == []

    async def test_unregistered_entity_raises_and_writes_nothing(self, store: Any) -> None:
        """An entity the store cannot serialize raises EventStoreError; the block writes nothing."""
        if not self.supports_serialization:
            pytest.skip("this store keeps objects and serializes nothing")

        async def snapshot_unregistered() -> None:
            async with store.transaction() as tx:
                await store.commit_events(tx, Aggregate("acc", _NO_ENTITY, 0), [Added(1)], ())
                await store.save_snapshot(tx, Snapshot("acc", Unregistered("x"), 1, utc_now()))

        with pytest.raises(EventStoreError, match="register"):
            await snapshot_unregistered()
        assert await _load(store, "acc") == []
        assert await _snapshot(store, "acc") is None

    # -- read_all --

    async def test_read_all_in_commit_order(self, store: Any) -> None:
        """read_all returns committed events of all aggregates in commit order, positions rising."""
        if not self.supports_read_all:
            pytest.skip("this store has no read_all")
        await _commit(store, "a", 0, [Added(1), Added(2)])
        await _commit(store, "b", 0, [Added(3)])
        await _commit(store, "a", 2, [Added(4)])

        async def rolled_back() -> None:
            async with store.transaction() as tx:
                await store.commit_events(tx, Aggregate("c", _NO_ENTITY, 0), [Added(0)], ())
                raise RuntimeError("rolled back")

        with pytest.raises(RuntimeError, match="rolled back"):
            await rolled_back()
        stored = await store.read_all(0, 100)
        assert [(s.envelope.aggregate_id, s.envelope.sequence) for s in stored] == [
            ("a", 1),
            ("a", 2),
            ("b", 1),
            ("a", 3),
        ]
        assert [s.envelope.payload for s in stored] == [Added(1), Added(2), Added(3), Added(4)]
        positions = [s.global_position for s in stored]
        assert positions == sorted(set(positions))
        assert positions[0] > 0
        assert await store.read_all(positions[-1], 100) == []

    async def test_read_all_pages(self, store: Any) -> None:
        """Paging read_all by the last position seen yields every event exactly once."""
        if not self.supports_read_all:
            pytest.skip("this store has no read_all")
        for number in range(7):
            await _commit(store, f"agg-{number % 3}", number // 3, [Added(number)])
        pages: list[list[Any]] = []
        after = 0
        while page := await store.read_all(after, 3):
            pages.append(page)
            after = page[-1].global_position
        assert [len(page) for page in pages] == [3, 3, 1]
        assert [s.envelope.payload for page in pages for s in page] == [Added(n) for n in range(7)]
        with pytest.raises(ValueError, match="limit"):
            await store.read_all(0, 0)
        with pytest.raises(ValueError, match="after_position"):
            await store.read_all(-1, 10)


# -- subscriptions and projections ---------------------------------------------------

#: What the ``open_another_store`` fixture returns: opens a second store object on the
#: database of the ``store`` fixture (same tables, same aggregate type).
OpenStore: TypeAlias = Callable[[], AbstractAsyncContextManager[Any]]

#: Extra seconds the timing checks allow on top of the store's intervals (worker threads
#: and a busy CI machine are slow; the intervals are what is being checked).
_SLACK: Final = 2.0
#: The table the transactional tests write through ``advance_with``.
_MODEL_TABLE: Final = "trio_es_conformance_model"


async def _commit_tx(
    store: Any, aggregate_id: str, sequence: int, events: list[Any]
) -> tuple[Any, list[Any]]:
    """Commit ``events`` in a transaction of their own; return its handle and the envelopes."""
    async with store.transaction() as tx:
        envelopes, _ = await store.commit_events(
            tx, Aggregate(aggregate_id, _NO_ENTITY, sequence), events, ()
        )
    return tx, list(envelopes)


def _place(envelope: Any) -> tuple[Any, Any, Any]:
    return (envelope.event_id, envelope.global_position, envelope.recorded_at)


def _is_utc(moment: object) -> bool:
    return isinstance(moment, datetime.datetime) and moment.utcoffset() == datetime.timedelta(0)


def _create_model(connection: Any, batch: list[Any]) -> None:
    connection.execute(f"CREATE TABLE {_MODEL_TABLE} (amount INTEGER NOT NULL)")
    _insert_model(connection, batch)


def _insert_model(connection: Any, batch: list[Any]) -> None:
    # Plain SQL without parameters: sqlite3 and psycopg spell placeholders differently.
    for envelope in batch:
        connection.execute(
            f"INSERT INTO {_MODEL_TABLE} (amount) VALUES ({int(envelope.payload.amount)})"
        )


async def _model(lease: Any) -> list[int]:
    """The model table's rows, read in a transaction that leaves the checkpoint where it is."""
    rows: list[int] = []

    def read(connection: Any, _: list[Any]) -> None:
        cursor = connection.execute(f"SELECT amount FROM {_MODEL_TABLE} ORDER BY amount")
        rows.extend(int(row[0]) for row in cursor.fetchall())

    position = await lease.checkpoint()
    await lease.advance_with(position, position, read, [])
    return rows


class ProjectionSourceConformance:
    """What subscriptions and projections need from a store; subclass it (as ``Test...``).

    Give the subclass a ``store`` fixture that yields a fresh, empty store opened with
    the intervals of the class attributes below (and whose transcoder, if it serializes,
    comes from :func:`conformance_transcoder`)::

        class TestMyStoreAsSource(ProjectionSourceConformance):
            poll_interval = 0.5

            @pytest.fixture
            async def store(self, tmp_path):
                async with MyStore.open(tmp_path / "db", transcoder=conformance_transcoder(),
                                        poll_interval=self.poll_interval,
                                        takeover_interval=self.takeover_interval) as s:
                    yield s

            @pytest.fixture
            def open_another_store(self, tmp_path):
                return lambda: MyStore.open(tmp_path / "db", ...)  # the same database

    ``open_another_store`` is optional: a function that opens a second store object on
    the ``store`` fixture's database (an async context manager, as ``open`` is). Without
    it (the default fixture returns ``None``) the tests across store objects are
    skipped; a store whose data lives in the store object (the memory store) has none.

    The checks covered: envelopes carry ``event_id``, ``global_position`` and
    ``recorded_at``; positions rise in commit order; ``committed_envelopes`` of a
    committed transaction (also one batched with others by a group commit) equals what
    ``read_all`` returns; ``head_position``; ``checkpoint_position``; a watch wakes at
    once for this store object's commits and returns within the poll interval otherwise
    (seeing another store object's commits); one lease per projection name at a time,
    taken over when its holder ends; checkpoints (compare-and-set, ``CheckpointMoved``,
    reset); and ``advance_with`` keeping its function's writes with the checkpoint or
    neither. The transactional tests create and fill a table ``trio_es_conformance_model``
    through the connection ``advance_with`` gives (``connection.execute(sql)`` without
    parameters, then ``fetchall()``: sqlite3 and psycopg both have them).

    Timing checks use real time with the intervals below, plus slack for busy machines.
    """

    #: The ``poll_interval`` the ``store`` fixture opened the store with, in seconds.
    poll_interval: ClassVar[float] = 0.5
    #: The ``takeover_interval`` the ``store`` fixture opened the store with, in seconds
    #: (ignored by stores whose leases need no polling).
    takeover_interval: ClassVar[float] = 0.1
    #: False for stores without a database connection for ``advance_with`` and
    #: ``reset(fn)`` (the memory store): those must then raise ``TypeError``.
    supports_transactional: ClassVar[bool] = True

    @pytest.fixture
    def store(self) -> Any:
        """Override: yield a fresh, empty store (an async fixture is fine)."""
        raise NotImplementedError(
            "define a `store` fixture in your ProjectionSourceConformance subclass that "
            "yields a fresh, empty store"
        )

    @pytest.fixture
    def open_another_store(self) -> OpenStore | None:
        """Override: return a function opening a second store object on the same database."""
        return None

    # -- envelopes and positions --

    async def test_envelopes_carry_id_position_and_commit_time(self, store: Any) -> None:
        """Loaded and read_all envelopes carry event_id, global_position and UTC recorded_at."""
        await _commit_tx(store, "a", 0, [Added(1), Added(2)])
        await _commit_tx(store, "b", 0, [Added(3)])
        stored = await store.read_all(0, 100)
        assert len(stored) == 3
        for item in stored:
            envelope = item.envelope
            assert isinstance(envelope.event_id, uuid.UUID)
            assert isinstance(envelope.global_position, int)
            assert item.global_position == envelope.global_position
            assert _is_utc(envelope.recorded_at)
            assert item.recorded_at == envelope.recorded_at
        loaded = [*await _load(store, "a"), *await _load(store, "b")]
        assert [_place(e) for e in loaded] == [_place(s.envelope) for s in stored]

    async def test_positions_rise_in_commit_order(self, store: Any) -> None:
        """Positions rise in commit order across aggregates and transactions, as in read_all."""
        await _commit_tx(store, "a", 0, [Added(1)])
        await _commit_tx(store, "b", 0, [Added(2), Added(3)])
        await _commit_tx(store, "a", 1, [Added(4)])
        async with store.transaction() as tx:
            await store.commit_events(tx, Aggregate("c", _NO_ENTITY, 0), [Added(5)], ())
            await store.commit_events(tx, Aggregate("b", _NO_ENTITY, 2), [Added(6)], ())
        stored = await store.read_all(0, 100)
        positions = [s.global_position for s in stored]
        assert positions == sorted(set(positions))
        assert [s.envelope.payload.amount for s in stored[:4]] == [1, 2, 3, 4]
        assert {s.envelope.payload.amount for s in stored[4:]} == {5, 6}
        by_id = {s.envelope.event_id: s.global_position for s in stored}
        for aggregate_id in ("a", "b", "c"):
            for envelope in await _load(store, aggregate_id):
                assert envelope.global_position == by_id[envelope.event_id]
        assert await store.read_all(positions[3], 100) == stored[4:]

    async def test_committed_envelopes_match_read_all(self, store: Any) -> None:
        """After its block, committed_envelopes(tx, staged) has the places read_all returns."""
        await _commit_tx(store, "a", 0, [Added(1)])
        async with store.transaction() as tx:
            first, _ = await store.commit_events(
                tx, Aggregate("a", _NO_ENTITY, 1), [Added(2), Added(3)], ()
            )
            second, _ = await store.commit_events(tx, Aggregate("b", _NO_ENTITY, 0), [Added(4)], ())
        staged = [*first, *second]
        committed = committed_envelopes(tx, staged)
        stored = await store.read_all(0, 100)
        expected = {s.envelope.event_id: _place(s.envelope) for s in stored}
        assert [_place(e) for e in committed] == [expected[e.event_id] for e in staged]
        assert all(isinstance(e.global_position, int) for e in committed)
        # The content stays as staged.
        assert [(e.aggregate_id, e.sequence, e.payload) for e in committed] == [
            (e.aggregate_id, e.sequence, e.payload) for e in staged
        ]

    async def test_committed_envelopes_of_concurrent_transactions(self, store: Any) -> None:
        """Transactions committing at once (group-committed, if batched) each get their places."""
        committed: list[Any] = []

        async def commit(number: int) -> None:
            tx, staged = await _commit_tx(
                store, f"acc-{number}", 0, [Added(number), Added(-number)]
            )
            committed.extend(committed_envelopes(tx, staged))

        async with trio.open_nursery() as nursery:
            for number in range(1, 25):
                nursery.start_soon(commit, number)
        stored = await store.read_all(0, 1000)
        assert len(stored) == len(committed) == 48
        assert sorted(_place(e) for e in committed) == sorted(_place(s.envelope) for s in stored)

    async def test_head_position(self, store: Any) -> None:
        """head_position is 0 when empty, then the last committed position; a rollback leaves it."""
        assert await store.head_position() == 0
        await _commit_tx(store, "a", 0, [Added(1), Added(2)])
        await _commit_tx(store, "b", 0, [Added(3)])
        head = await store.head_position()
        assert head == (await store.read_all(0, 100))[-1].global_position

        async def rolled_back() -> None:
            async with store.transaction() as tx:
                await store.commit_events(tx, Aggregate("c", _NO_ENTITY, 0), [Added(9)], ())
                raise RuntimeError("rolled back")

        with pytest.raises(RuntimeError, match="rolled back"):
            await rolled_back()
        assert await store.head_position() == head

    # -- watches --

    async def test_watch_returns_at_once_for_committed_events(self, store: Any) -> None:
        """wait(after) returns at once when this store object committed beyond after."""
        await _commit_tx(store, "a", 0, [Added(1), Added(2)])
        head = await store.head_position()
        async with store.watch() as watch:
            with trio.fail_after(self.poll_interval / 2):
                await watch.wait(0)
                await watch.wait(head - 1)

    async def test_watch_wakes_at_once_on_a_commit(self, store: Any) -> None:
        """A waiting subscriber wakes right after a commit through the store, not at a poll."""
        head = await store.head_position()
        committed = trio.Event()
        woke = trio.Event()
        async with store.watch() as watch:

            async def subscriber() -> None:
                while not committed.is_set():
                    await watch.wait(head)
                woke.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(subscriber)
                await trio.testing.wait_all_tasks_blocked()
                await _commit_tx(store, "a", 0, [Added(1)])
                committed.set()
                with trio.fail_after(self.poll_interval / 2):
                    await woke.wait()

    async def test_watch_returns_within_the_poll_interval(self, store: Any) -> None:
        """Without commits, wait returns after the poll interval at the latest."""
        await _commit_tx(store, "a", 0, [Added(1)])
        head = await store.head_position()
        async with store.watch() as watch:
            with trio.fail_after(self.poll_interval + _SLACK):
                await watch.wait(head)

    async def test_watch_sees_another_store_objects_commits(
        self, store: Any, open_another_store: OpenStore | None
    ) -> None:
        """A subscriber of one store object reads another's commit within the poll interval."""
        if open_another_store is None:
            pytest.skip("the store fixture has no second store object (open_another_store)")
        head = await store.head_position()
        seen: list[Any] = []
        waiting, done = trio.Event(), trio.Event()

        async def subscriber() -> None:
            async with store.watch() as watch:
                while not (new := await store.read_all(head, 10)):
                    waiting.set()
                    await watch.wait(head)
            seen.extend(new)
            done.set()

        async with open_another_store() as other, trio.open_nursery() as nursery:
            nursery.start_soon(subscriber)
            await waiting.wait()
            await _commit_tx(other, "a", 0, [Added(7)])
            with trio.fail_after(self.poll_interval + _SLACK):
                await done.wait()
        assert [s.envelope.payload for s in seen] == [Added(7)]

    # -- leases --

    async def test_one_lease_per_name_at_a_time(self, store: Any) -> None:
        """A second lease of a name waits while the first is held, and takes over when it ends."""
        await self._check_takeover(store, store)

    async def test_one_lease_across_store_objects(
        self, store: Any, open_another_store: OpenStore | None
    ) -> None:
        """Leases of one name on two store objects of one database exclude each other too."""
        if open_another_store is None:
            pytest.skip("the store fixture has no second store object (open_another_store)")
        async with open_another_store() as other:
            await self._check_takeover(store, other)

    async def _check_takeover(self, first_store: Any, second_store: Any) -> None:
        holders: list[str] = []
        took_over = trio.Event()

        async def standby(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            task_status.started()
            async with second_store.projection_lease("balances") as lease:
                holders.append("second")
                assert await lease.checkpoint() == 5
                took_over.set()

        async with trio.open_nursery() as nursery:
            async with first_store.projection_lease("balances") as lease:
                holders.append("first")
                await lease.checkpoint()
                await nursery.start(standby)
                await trio.sleep(self.takeover_interval * 3)
                assert holders == ["first"]
                await lease.advance(0, 5)
            with trio.fail_after(self.takeover_interval + _SLACK):
                await took_over.wait()
        assert holders == ["first", "second"]

    async def test_leases_of_other_names_do_not_wait(self, store: Any) -> None:
        """Leases of different projection names are held at the same time."""
        with trio.fail_after(_SLACK):
            async with store.projection_lease("a") as a, store.projection_lease("b") as b:
                await a.advance(await a.checkpoint(), 3)
                assert await b.checkpoint() == 0

    async def test_waiting_for_a_lease_is_cancellable(self, store: Any) -> None:
        """A standby cancelled while it waits leaves; the lease is free again afterwards."""
        async with store.projection_lease("p"):
            with trio.move_on_after(self.takeover_interval * 2) as scope:
                async with store.projection_lease("p"):
                    pytest.fail("took a lease that was held")  # pragma: no cover
            assert scope.cancelled_caught
        with trio.fail_after(self.takeover_interval + _SLACK):
            async with store.projection_lease("p") as lease:
                assert await lease.checkpoint() == 0

    async def test_lease_ends_with_its_block(self, store: Any) -> None:
        """A block that raises releases the lease; a lease used after its block is refused."""
        with pytest.raises(RuntimeError, match="handler broke"):
            async with store.projection_lease("p") as kept:
                raise RuntimeError("handler broke")
        with pytest.raises(EventStoreError, match="ended"):
            await kept.checkpoint()
        with trio.fail_after(self.takeover_interval + _SLACK):
            async with store.projection_lease("p") as lease:
                assert await lease.checkpoint() == 0

    @pytest.mark.parametrize("name", ["", 7], ids=["empty", "int"])
    async def test_projection_names_are_checked(self, store: Any, name: object) -> None:
        """A projection name must be a non-empty str."""
        with pytest.raises((TypeError, ValueError), match="projection name"):
            async with store.projection_lease(name):
                pass  # pragma: no cover

    # -- checkpoints --

    async def test_checkpoint_compare_and_set(self, store: Any) -> None:
        """Checkpoints start at 0, move only from the expected position, reset to 0, and persist."""
        async with store.projection_lease("p") as lease:
            assert await lease.checkpoint() == 0
            await lease.advance(0, 3)
            assert await lease.checkpoint() == 3
            with pytest.raises(CheckpointMoved) as info:
                await lease.advance(0, 9)
            assert (info.value.name, info.value.expected, info.value.found) == ("p", 0, 3)
            assert await lease.checkpoint() == 3
            await lease.reset()
            assert await lease.checkpoint() == 0
            await lease.advance(0, 2)
        async with store.projection_lease("p") as lease:
            assert await lease.checkpoint() == 2
        async with store.projection_lease("q") as lease:
            assert await lease.checkpoint() == 0

    async def test_checkpoint_position_reads_without_the_lease(
        self, store: Any, open_another_store: OpenStore | None
    ) -> None:
        """checkpoint_position is 0 for a new projection, then what its lease stored, anywhere."""
        assert await store.checkpoint_position("p") == 0
        async with store.projection_lease("p") as lease:
            await lease.advance(await lease.checkpoint(), 4)
            # Read while another holds the lease: what a standby follows.
            assert await store.checkpoint_position("p") == 4
        assert await store.checkpoint_position("p") == 4
        assert await store.checkpoint_position("q") == 0
        if open_another_store is not None:
            async with open_another_store() as other:
                assert await other.checkpoint_position("p") == 4

    async def test_advance_with_keeps_writes_with_the_checkpoint(self, store: Any) -> None:
        """advance_with keeps fn's writes with the checkpoint; raising fn or stale CAS: neither."""
        await _commit_tx(store, "a", 0, [Added(1), Added(2), Added(3)])
        batch = [s.envelope for s in await store.read_all(0, 100)]
        async with store.projection_lease("p") as lease:
            assert await lease.checkpoint() == 0
            if not self.supports_transactional:
                with pytest.raises(TypeError, match="SQL store"):
                    await lease.advance_with(0, 3, _create_model, batch)
                with pytest.raises(TypeError, match="SQL store"):
                    await lease.reset(lambda connection: None)
                assert await lease.checkpoint() == 0
                return
            first = batch[0].global_position
            await lease.advance_with(0, first, _create_model, batch[:1])
            assert (await lease.checkpoint(), await _model(lease)) == (first, [1])

            boom = ValueError("the handler broke")

            def insert_then_fail(connection: Any, events: list[Any]) -> None:
                _insert_model(connection, events)
                raise boom

            with pytest.raises(ValueError, match="handler broke") as info:
                await lease.advance_with(first, 99, insert_then_fail, batch[1:])
            assert info.value is boom
            with pytest.raises(CheckpointMoved) as moved:
                await lease.advance_with(0, 99, _insert_model, batch[1:])
            assert (moved.value.expected, moved.value.found) == (0, first)
            assert (await lease.checkpoint(), await _model(lease)) == (first, [1])

            last = batch[-1].global_position
            await lease.advance_with(first, last, _insert_model, batch[1:])
            assert (await lease.checkpoint(), await _model(lease)) == (last, [1, 2, 3])

    async def test_reset_with_fn_runs_in_the_same_transaction(self, store: Any) -> None:
        """reset(fn) sets the checkpoint to 0 with fn's writes; a raising fn keeps neither."""
        if not self.supports_transactional:
            pytest.skip("this store keeps no database for fn (advance_with test covers it)")
        await _commit_tx(store, "a", 0, [Added(1), Added(2)])
        batch = [s.envelope for s in await store.read_all(0, 100)]
        last = batch[-1].global_position

        def clear(connection: Any) -> None:
            connection.execute(f"DELETE FROM {_MODEL_TABLE}")

        def clear_then_fail(connection: Any) -> None:
            clear(connection)
            raise KeyError("reset broke")

        async with store.projection_lease("p") as lease:
            await lease.advance_with(await lease.checkpoint(), last, _create_model, batch)
            with pytest.raises(KeyError, match="reset broke"):
                await lease.reset(clear_then_fail)
            assert (await lease.checkpoint(), await _model(lease)) == (last, [1, 2])
            await lease.reset(clear)
            assert (await lease.checkpoint(), await _model(lease)) == (0, [])

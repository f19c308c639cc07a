"""Loading an aggregate's latest snapshot and the events after it in one store call."""

from __future__ import annotations

from typing import Any

import pytest

from trio_es import Aggregate, EventStoreError
from trio_es._types import Snapshot, utc_now
from trio_es.testing import Added, Counter


async def _commit(store: Any, aggregate_id: str, sequence: int, events: list[Any]) -> None:
    async with store.transaction() as tx:
        await store.commit_events(tx, Aggregate(aggregate_id, Counter(), sequence), events, ())


async def assert_snapshot_and_events_load_together(store: Any) -> None:
    """``load_snapshot_and_events`` equals ``load_snapshot`` then ``load_events`` after it."""
    async with store.transaction() as tx:
        assert await store.load_snapshot_and_events(tx, "acc") == (None, [])
    await _commit(store, "acc", 0, [Added(1), Added(2)])
    async with store.transaction() as tx:
        snapshot, events = await store.load_snapshot_and_events(tx, "acc")
    assert snapshot is None
    assert [e.sequence for e in events] == [1, 2]
    async with store.transaction() as tx:
        await store.save_snapshot(tx, Snapshot("acc", Counter(3), 2, utc_now()))
    await _commit(store, "acc", 2, [Added(4)])
    async with store.transaction() as tx:
        snapshot, events = await store.load_snapshot_and_events(tx, "acc")
        assert snapshot is not None
        assert (snapshot.sequence, snapshot.entity) == (2, Counter(3))
        assert [(e.sequence, e.payload) for e in events] == [(3, Added(4))]
        assert events[0].global_position is not None
        # A snapshot and events staged in the transaction are part of what it sees.
        await store.commit_events(tx, Aggregate("acc", Counter(7), 3), [Added(5)], ())
        await store.save_snapshot(tx, Snapshot("acc", Counter(7), 3, utc_now()))
        snapshot, events = await store.load_snapshot_and_events(tx, "acc")
        assert snapshot is not None
        assert snapshot.sequence == 3
        assert [(e.sequence, e.payload) for e in events] == [(4, Added(5))]
        # Both reads of the combined call agree with the separate calls.
        assert (
            await store.load_snapshot(tx, "acc"),
            await store.load_events(tx, "acc", 3),
        ) == (
            snapshot,
            events,
        )
    with pytest.raises(EventStoreError):
        async with store.transaction() as tx:
            await store.load_snapshot_and_events(tx, "bad \ud800 id")

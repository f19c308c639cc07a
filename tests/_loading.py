"""Loading aggregates: a snapshot and the events after it in one store call, and a first
load that pays no cattrs code generation."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from trio_es import Aggregate, EventStoreError
from trio_es._types import Snapshot, utc_now
from trio_es.serialization import Transcoder
from trio_es.testing import Added, Counter, conformance_transcoder


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


def count_hook_lookups(transcoder: Transcoder) -> list[object]:
    """Record every cattrs hook lookup ``transcoder`` makes from now on (in order)."""
    looked_up: list[object] = []
    converter = transcoder.converter
    structure, unstructure = converter.get_structure_hook, converter.get_unstructure_hook

    def get_structure_hook(cls: Any, *args: Any, **kwargs: Any) -> Any:
        looked_up.append(cls)
        return structure(cls, *args, **kwargs)

    def get_unstructure_hook(cls: Any, *args: Any, **kwargs: Any) -> Any:
        looked_up.append(cls)
        return unstructure(cls, *args, **kwargs)

    converter.get_structure_hook = get_structure_hook  # type: ignore[method-assign, assignment]
    converter.get_unstructure_hook = get_unstructure_hook  # type: ignore[method-assign, assignment]
    return looked_up


async def assert_opening_prepares_the_transcoder(
    open_store: Callable[[Transcoder], AbstractAsyncContextManager[Any]],
) -> None:
    """Opening the store builds the transcoder's hooks: commits and loads then build none."""
    transcoder = conformance_transcoder()
    looked_up = count_hook_lookups(transcoder)
    async with open_store(transcoder) as store:
        prepared = len(looked_up)
        assert prepared > 0
        await _commit(store, "acc", 0, [Added(1), Added(2)])
        async with store.transaction() as tx:
            await store.save_snapshot(tx, Snapshot("acc", Counter(3), 2, utc_now()))
        async with store.transaction() as tx:
            snapshot, events = await store.load_snapshot_and_events(tx, "acc")
            assert snapshot is not None
            assert (snapshot.sequence, events) == (2, [])
            assert [e.payload for e in await store.load_events(tx, "acc", 0)] == [
                Added(1),
                Added(2),
            ]
        assert len(looked_up) == prepared

"""Group-commit checks shared by the SQLite and PostgreSQL store tests."""

from __future__ import annotations

from typing import Any

import trio

from trio_es import Aggregate
from trio_es.testing import Added, Counter


async def _commit(store: Any, aggregate_id: str, sequence: int) -> None:
    async with store.transaction() as tx:
        await store.commit_events(tx, Aggregate(aggregate_id, Counter(), sequence), [Added(1)], ())


async def assert_concurrent_commits_share_transactions(store: Any) -> None:
    """64 concurrent single-event commits take far fewer database transactions, all stored."""
    commits = store._group_commit
    async with trio.open_nursery() as nursery:
        for number in range(64):
            nursery.start_soon(_commit, store, f"acc-{number}", 0)
    assert commits.plans == 64
    assert commits.batches <= 8, (commits.batches, commits.plans)
    stored = await store.read_all(0, 1000)
    assert sorted(s.envelope.aggregate_id for s in stored) == sorted(f"acc-{n}" for n in range(64))


async def assert_lone_commits_are_not_batched(store: Any) -> None:
    """Commits made one after another are each a transaction of their own, with no wait."""
    commits = store._group_commit
    for sequence in range(10):
        await _commit(store, "alone", sequence)
    assert (commits.batches, commits.plans) == (10, 10)

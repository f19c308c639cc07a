"""GroupCommit: batching concurrent commits without delaying a lone one, failing only the guilty."""

from __future__ import annotations

from typing import Any

import attrs
import outcome
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from trio_es import TransactionFailed
from trio_es._group_commit import GroupCommit

COMMIT_SECONDS = 0.01


@attrs.define
class FakeDatabase:
    """Fault injection: a 'database' whose batch commit takes COMMIT_SECONDS of Trio time."""

    committed: list[str] = attrs.Factory(list)
    batches: list[list[str]] = attrs.Factory(list)
    refuse: set[str] = attrs.Factory(set)
    fail_next_batch: bool = False
    in_flight: int = 0

    async def commit_batch(self, plans: list[str]) -> list[outcome.Outcome[None]]:
        self.in_flight += 1
        assert self.in_flight == 1, "commit_batch must never run twice at once"
        try:
            self.batches.append(list(plans))
            fail, self.fail_next_batch = self.fail_next_batch, False
            await trio.sleep(COMMIT_SECONDS)
            if fail:
                raise TransactionFailed("disk busy")
            results: list[outcome.Outcome[None]] = []
            for plan in plans:
                if plan in self.refuse:
                    results.append(outcome.Error(ValueError(f"refused {plan}")))
                else:
                    self.committed.append(plan)
                    results.append(outcome.Value(None))
            return results
        finally:
            self.in_flight -= 1


def group(db: FakeDatabase, **kwargs: Any) -> GroupCommit[str]:
    return GroupCommit(db.commit_batch, **kwargs)


async def test_a_lone_commit_is_not_delayed(autojump_clock: trio.testing.MockClock) -> None:
    """At low load each commit is a batch of one and waits for nothing but its own commit."""
    db = FakeDatabase()
    commits = group(db)
    start = trio.current_time()
    for number in range(5):
        await commits.commit(f"p{number}")
    assert trio.current_time() - start == pytest.approx(5 * COMMIT_SECONDS)
    assert db.batches == [[f"p{n}"] for n in range(5)]
    assert (commits.batches, commits.plans) == (5, 5)


async def test_commits_arriving_during_a_batch_share_the_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """While one batch commits, every commit that arrives joins the next batch."""
    db = FakeDatabase()
    commits = group(db)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(commits.commit, "first")
        await trio.testing.wait_all_tasks_blocked()
        for number in range(10):
            nursery.start_soon(commits.commit, f"p{number}")
    assert db.batches[0] == ["first"]
    assert sorted(db.batches[1]) == sorted(f"p{n}" for n in range(10))
    assert len(db.batches) == 2
    assert sorted(db.committed) == sorted(["first", *(f"p{n}" for n in range(10))])


async def test_max_batch_splits_a_long_queue(autojump_clock: trio.testing.MockClock) -> None:
    """No batch takes more than max_batch plans; the rest follow in the next batch."""
    db = FakeDatabase()
    commits = group(db, max_batch=4)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(commits.commit, "first")
        await trio.testing.wait_all_tasks_blocked()
        for number in range(10):
            nursery.start_soon(commits.commit, f"p{number}")
    assert [len(batch) for batch in db.batches] == [1, 4, 4, 2]


async def test_a_refused_plan_fails_only_its_caller(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A plan the database refuses fails its own caller; the rest of its batch commits."""
    db = FakeDatabase(refuse={"bad"})
    commits = group(db)
    results: dict[str, str] = {}

    async def commit(plan: str) -> None:
        try:
            await commits.commit(plan)
        except ValueError as error:
            results[plan] = str(error)
        else:
            results[plan] = "ok"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(commit, "first")
        await trio.testing.wait_all_tasks_blocked()
        for plan in ["a", "bad", "b"]:
            nursery.start_soon(commit, plan)
    assert results == {"first": "ok", "a": "ok", "bad": "refused bad", "b": "ok"}
    assert sorted(db.batches[1]) == ["a", "b", "bad"]


async def test_a_failed_batch_fails_its_callers_and_the_next_batch_proceeds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A batch that fails as a whole fails all its callers; later batches are unaffected."""
    db = FakeDatabase()
    commits = group(db)
    failed: list[str] = []

    async def commit(plan: str) -> None:
        try:
            await commits.commit(plan)
        except TransactionFailed:
            failed.append(plan)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(commit, "first")
        await trio.testing.wait_all_tasks_blocked()
        db.fail_next_batch = True  # the batch of "first" has started: this hits the next
        for plan in ["a", "b"]:
            nursery.start_soon(commit, plan)
    assert sorted(failed) == ["a", "b"]
    await commits.commit("after")
    assert db.committed == ["first", "after"]


async def test_a_caller_cancelled_before_its_batch_is_withdrawn(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A commit cancelled while queued never reaches the database."""
    db = FakeDatabase()
    commits = group(db)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(commits.commit, "first")
        await trio.testing.wait_all_tasks_blocked()
        with trio.CancelScope() as scope:
            nursery.start_soon(commits.commit, "kept")
            scope.cancel()
            await commits.commit("withdrawn")
    assert "withdrawn" not in [plan for batch in db.batches for plan in batch]
    assert db.committed == ["first", "kept"]


async def test_a_cancelled_leader_does_not_fail_the_others_in_its_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Cancelling the task that leads a batch of several still commits and answers the rest."""
    db = FakeDatabase()
    commits = group(db)
    answered: list[str] = []

    async def commit(plan: str) -> None:
        await commits.commit(plan)
        answered.append(plan)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(commit, "first")
        await trio.testing.wait_all_tasks_blocked()
        leader_scope = trio.CancelScope()

        async def leader() -> None:
            with leader_scope:
                await commit("leader")

        nursery.start_soon(leader)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(commit, "follower")
        await trio.testing.wait_all_tasks_blocked()
        # "leader" is promoted once "first" is done and commits itself with "follower".
        await trio.sleep(COMMIT_SECONDS * 1.5)
        leader_scope.cancel()
    assert db.batches[1] == ["leader", "follower"]
    assert "follower" in answered
    assert db.committed == ["first", "leader", "follower"]


async def test_a_promoted_leader_cancelled_before_leading_passes_the_lead(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """If the next leader is cancelled before it starts, the one after it leads instead."""
    db = FakeDatabase()
    commits = group(db)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(commits.commit, "first")
        await trio.testing.wait_all_tasks_blocked()
        scope = trio.CancelScope()

        async def doomed() -> None:
            with scope:
                await commits.commit("doomed")

        nursery.start_soon(doomed)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(commits.commit, "next")
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()  # "doomed" is first in the queue and withdraws
    assert db.committed == ["first", "next"]


schedules = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=0.05),  # arrival time
        st.booleans(),  # refused by the database
        st.one_of(st.none(), st.floats(min_value=0, max_value=0.05)),  # cancelled after
    ),
    min_size=1,
    max_size=30,
)


@given(schedules)
def test_every_plan_is_committed_at_most_once_and_every_caller_answered(
    schedule: list[tuple[float, bool, float | None]],
) -> None:
    """For random arrivals, refusals and cancellations: answers match the database, once each."""
    db = FakeDatabase(refuse={f"p{n}" for n, (_, bad, _) in enumerate(schedule) if bad})
    commits = group(db, max_batch=5)
    answers: dict[str, str] = {}

    async def caller(plan: str, arrival: float, cancel_after: float | None) -> None:
        await trio.sleep(arrival)
        with trio.CancelScope() as scope:
            if cancel_after is not None:
                scope.deadline = trio.current_time() + cancel_after
            try:
                await commits.commit(plan)
            except ValueError:
                answers[plan] = "refused"
                return
            answers[plan] = "ok"
        if scope.cancelled_caught:
            answers[plan] = "cancelled"

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for n, (arrival, _, cancel_after) in enumerate(schedule):
                nursery.start_soon(caller, f"p{n}", arrival, cancel_after)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert len(answers) == len(schedule)
    submitted = [plan for batch in db.batches for plan in batch]
    assert len(submitted) == len(set(submitted)), "a plan was committed twice"
    assert len(db.committed) == len(set(db.committed))
    for plan, answer in answers.items():
        if answer == "ok":
            assert plan in db.committed
        elif answer == "refused":
            assert plan in db.refuse
            assert plan not in db.committed
    assert all(len(batch) <= 5 for batch in db.batches)
    assert not commits._busy
    assert not commits._queue

"""GroupCommit: batching concurrent commits without delaying a lone one, failing only the guilty."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
import outcome
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from trio_es import (
    CommitOutcomeUnknown,
    ConcurrencyConflict,
    DomainError,
    EventStoreError,
    TransactionFailed,
)
from trio_es._group_commit import _GATHER_ROUNDS, GroupCommit

COMMIT_SECONDS = 0.01

T = TypeVar("T")


@attrs.define
class FakeDatabase:
    """Fault injection: a 'database' whose batch commit takes COMMIT_SECONDS of Trio time."""

    committed: list[str] = attrs.Factory(list)
    batches: list[list[str]] = attrs.Factory(list)
    refuse: set[str] = attrs.Factory(set)
    #: Raised instead of committing the next batch: nothing of it is written.
    fail_next_batch: Exception | None = None
    #: Raised after committing the next batch, as a Ctrl-C arriving then would be.
    interrupt_next_batch: BaseException | None = None
    in_flight: int = 0
    commit_seconds: float = COMMIT_SECONDS

    async def commit_batch(self, plans: list[str]) -> list[outcome.Outcome[None]]:
        self.in_flight += 1
        assert self.in_flight == 1, "commit_batch must never run twice at once"
        try:
            self.batches.append(list(plans))
            fail, self.fail_next_batch = self.fail_next_batch, None
            interrupt, self.interrupt_next_batch = self.interrupt_next_batch, None
            await trio.sleep(self.commit_seconds)
            if fail is not None:
                raise fail
            results: list[outcome.Outcome[None]] = []
            for plan in plans:
                if plan in self.refuse:
                    results.append(outcome.Error(ValueError(f"refused {plan}")))
                else:
                    self.committed.append(plan)
                    results.append(outcome.Value(None))
            if interrupt is not None:
                raise interrupt
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
        # The batch of "first" has started: this failure hits the next one.
        db.fail_next_batch = TransactionFailed("disk busy")
        for plan in ["a", "b"]:
            nursery.start_soon(commit, plan)
    assert sorted(failed) == ["a", "b"]
    await commits.commit("after")
    assert db.committed == ["first", "after"]


async def fail_a_batch_of_four(
    db: FakeDatabase, commits: GroupCommit[str], error: BaseException, caught: type[BaseException]
) -> tuple[dict[str, BaseException], str]:
    """Commit "first", fail the batch a, b, c, d with ``error``: what each got, and the leader."""
    errors: dict[str, BaseException] = {}

    async def commit(plan: str) -> None:
        try:
            await commits.commit(plan)
        except caught as failure:
            errors[plan] = failure

    async with trio.open_nursery() as nursery:
        nursery.start_soon(commit, "first")
        await trio.testing.wait_all_tasks_blocked()
        if isinstance(error, Exception):
            db.fail_next_batch = error
        else:
            db.interrupt_next_batch = error
        for plan in ["a", "b", "c", "d"]:
            nursery.start_soon(commit, plan)
    assert sorted(db.batches[1]) == ["a", "b", "c", "d"]
    return errors, db.batches[1][0]


def noted(error: Exception, note: str) -> Exception:
    error.add_note(note)
    return error


@pytest.mark.parametrize(
    "error",
    [
        TransactionFailed("disk busy", aggregate_id="acc-1"),
        ConcurrencyConflict(aggregate_id="acc-1", expected_sequence=1, actual_sequence=2),
        CommitOutcomeUnknown("the connection was lost after COMMIT", aggregate_id="acc-1"),
        EventStoreError("disk full"),
        RuntimeError("a bug in the store"),
        noted(KeyError("row 7"), "while committing"),
    ],
    ids=lambda error: type(error).__name__,
)
async def test_every_caller_of_a_failed_batch_gets_the_error_as_itself(
    error: Exception, autojump_clock: trio.testing.MockClock
) -> None:
    """Each caller of a failed batch gets its own instance of the error: same type, text, fields."""
    db = FakeDatabase()
    errors, leader = await fail_a_batch_of_four(db, group(db), error, Exception)
    assert sorted(errors) == ["a", "b", "c", "d"]
    assert [type(got) for got in errors.values()] == [type(error)] * 4
    assert len({id(got) for got in errors.values()}) == 4, "callers share one exception instance"
    assert errors.pop(leader) is error  # the leader raises the batch's own error
    for got in errors.values():
        assert str(got) == str(error)
        assert vars(got) == vars(error)
        assert got.__cause__ is error
    assert db.committed == ["first"]


class Refused(DomainError):
    """A domain error without a value: its ``.error`` is itself."""


async def test_a_copied_error_that_refers_to_itself_refers_to_the_copy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A copy's attribute that held the original (a bare DomainError's .error) holds the copy."""
    error = Refused()
    db = FakeDatabase()
    errors, leader = await fail_a_batch_of_four(db, group(db), error, Refused)
    assert errors.pop(leader) is error
    for got in errors.values():
        assert isinstance(got, Refused)
        assert got.error is got
        assert str(got) == str(error)


async def test_an_error_that_cannot_be_copied_faithfully_reaches_every_caller(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An error whose state is not all in args and attributes is given as itself to every caller."""
    error = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
    db = FakeDatabase()
    errors, _ = await fail_a_batch_of_four(db, group(db), error, Exception)
    assert sorted(errors) == ["a", "b", "c", "d"]
    assert all(got is error for got in errors.values())


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
async def test_an_interrupted_batch_answers_the_others_with_commit_outcome_unknown(
    interrupt: type[BaseException], autojump_clock: trio.testing.MockClock
) -> None:
    """An interrupt in the leader may come after the commit: the others get CommitOutcomeUnknown."""
    db = FakeDatabase()
    commits = group(db)
    errors, leader = await fail_a_batch_of_four(db, commits, interrupt(), BaseException)
    assert isinstance(errors.pop(leader), interrupt)
    assert len(errors) == 3
    assert len({id(got) for got in errors.values()}) == 3
    for got in errors.values():
        assert type(got) is CommitOutcomeUnknown
        assert not isinstance(got, TransactionFailed)  # never retried
        assert interrupt.__name__ in str(got)
    assert sorted(db.committed) == ["a", "b", "c", "d", "first"]  # it had landed
    await commits.commit("after")
    assert db.committed[-1] == "after"


def test_a_caller_interrupted_while_queued_withdraws_and_passes_the_lead() -> None:
    """Ctrl-C in a caller waiting at the head of the queue withdraws it; the next one leads."""
    db = FakeDatabase()
    commits = group(db)
    interrupted: list[str] = []

    async def main() -> None:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(commits.commit, "first")
                await trio.testing.wait_all_tasks_blocked()

                async def interrupt_the_main_task() -> None:
                    await trio.testing.wait_all_tasks_blocked()  # "doomed" heads the queue
                    nursery.start_soon(commits.commit, "next")
                    await trio.testing.wait_all_tasks_blocked()
                    signal.raise_signal(signal.SIGINT)  # delivered to the main task's wait

                nursery.start_soon(interrupt_the_main_task)
                try:
                    await commits.commit("doomed")
                except KeyboardInterrupt:
                    interrupted.append("doomed")

    trio.run(main, restrict_keyboard_interrupt_to_checkpoints=True)
    assert interrupted == ["doomed"]
    assert db.committed == ["first", "next"]
    assert not commits._busy
    assert not commits._queue


async def test_group_commit_runs_protected_from_keyboard_interrupt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Ctrl-C cannot land between two lines of the bookkeeping, only at a checkpoint."""
    protected: list[bool] = []

    async def commit_batch(plans: list[str]) -> list[outcome.Outcome[None]]:
        protected.append(trio.lowlevel.currently_ki_protected())
        await trio.sleep(COMMIT_SECONDS)
        return [outcome.Value(None) for _ in plans]

    commits: GroupCommit[str] = GroupCommit(commit_batch)
    async with trio.open_nursery() as nursery:
        for plan in ["a", "b", "c"]:
            nursery.start_soon(commits.commit, plan)
    assert protected
    assert all(protected)
    assert not trio.lowlevel.currently_ki_protected()


async def test_a_lone_leader_cancelled_mid_commit_fails_only_itself(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A batch of one is not shielded: its caller's cancellation stops it; later callers go on."""
    db = FakeDatabase()
    commits = group(db)
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as scope:
            scope.deadline = trio.current_time() + COMMIT_SECONDS / 2
            nursery.start_soon(commits.commit, "queued")  # arrives while "lone" commits
            await commits.commit("lone")
        assert scope.cancelled_caught
    assert db.batches == [["lone"], ["queued"]]
    assert db.committed == ["queued"]


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


@given(schedules, st.booleans())
def test_every_plan_is_committed_at_most_once_and_every_caller_answered(
    schedule: list[tuple[float, bool, float | None]], gather: bool
) -> None:
    """For random arrivals, refusals and cancellations: answers match the database, once each."""
    db = FakeDatabase(refuse={f"p{n}" for n, (_, bad, _) in enumerate(schedule) if bad})
    commits = group(db, max_batch=5, gather=gather)
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


async def test_each_caller_gets_its_plans_value(autojump_clock: trio.testing.MockClock) -> None:
    """commit returns the value commit_batch gave the caller's own plan, leader or follower."""
    batches: list[list[str]] = []

    async def commit_batch(plans: list[str]) -> list[outcome.Outcome[Any]]:
        batches.append(list(plans))
        await trio.sleep(COMMIT_SECONDS)
        return [outcome.Value(plan.upper()) for plan in plans]

    commits: GroupCommit[str] = GroupCommit(commit_batch)
    got: dict[str, Any] = {}

    async def commit(plan: str) -> None:
        got[plan] = await commits.commit(plan)

    async with trio.open_nursery() as nursery:
        for plan in ["a", "b", "c"]:
            nursery.start_soon(commit, plan)
    assert got == {"a": "A", "b": "B", "c": "C"}
    assert max(len(batch) for batch in batches) > 1


async def _after_a_batch_of(size: int, db: FakeDatabase, commits: GroupCommit[str]) -> None:
    """Commit a lone batch, then one of ``size`` plans that arrived during it."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(commits.commit, "opening")
        await trio.testing.wait_all_tasks_blocked()
        for number in range(size):
            nursery.start_soon(commits.commit, f"w{number}")
    assert sorted(db.batches[-1]) == [f"w{n}" for n in range(size)]


def _noted_at_each_batch(
    commits: GroupCommit[str], db: FakeDatabase, note: Callable[[], T]
) -> list[T]:
    """What ``note()`` returns each time ``commits`` hands a batch to ``db``, in order."""
    noted: list[T] = []

    async def commit_batch(plans: list[str]) -> list[outcome.Outcome[None]]:
        noted.append(note())
        return await db.commit_batch(plans)

    commits.commit_batch = commit_batch
    return noted


async def _commit_after(commits: GroupCommit[str], plan: str, rounds: int) -> None:
    for _ in range(rounds):
        await trio.lowlevel.cancel_shielded_checkpoint()
    await commits.commit(plan)


async def test_a_leader_after_a_wave_gathers_the_commits_that_wave_brings(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """With gather, commits arriving within the rounds after a batch of several share one batch."""
    for gather in (True, False):
        db = FakeDatabase()
        commits = group(db, gather=gather)
        await _after_a_batch_of(2, db, commits)
        # A wave: the leader commits at once, the others one and two rounds later (a
        # caller's reply, then its next command's aggregate).
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_commit_after, commits, "lead", 0)
            nursery.start_soon(_commit_after, commits, "one round later", 1)
            nursery.start_soon(_commit_after, commits, "two rounds later", 2)
        wave = db.batches[2:]
        if gather:
            assert [sorted(batch) for batch in wave] == [
                ["lead", "one round later", "two rounds later"]
            ]
        else:
            assert len(wave) == 2, wave
        assert sorted(db.committed[3:]) == ["lead", "one round later", "two rounds later"]


async def test_a_leader_after_a_batch_of_one_takes_its_batch_at_once() -> None:
    """With gather, a lone writer (the last batch held one plan) lets no other task run first."""
    db = FakeDatabase(commit_seconds=0)
    commits = group(db, gather=True)
    await commits.commit("lone")
    other_ran = False

    async def other() -> None:
        nonlocal other_ran
        other_ran = True

    seen = _noted_at_each_batch(commits, db, lambda: other_ran)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        await commits.commit("next")
    assert seen == [False]
    assert db.batches == [["lone"], ["next"]]


async def test_gathering_ends_within_a_bounded_number_of_rounds() -> None:
    """A gathering leader waits a fixed number of rounds, however busy the other tasks are."""
    db = FakeDatabase(commit_seconds=0.001)
    commits = group(db, gather=True)
    await _after_a_batch_of(2, db, commits)
    rounds = 0
    rounds_at_commit = _noted_at_each_batch(commits, db, lambda: rounds)

    async def busy() -> None:
        nonlocal rounds
        while True:
            rounds += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(busy)
        await commits.commit("lead")
        nursery.cancel_scope.cancel()
    assert db.batches[-1] == ["lead"]
    assert rounds_at_commit[0] <= _GATHER_ROUNDS + 1


async def test_a_follower_cancelled_while_its_leader_gathers_is_withdrawn(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A commit cancelled before the gathering leader takes its batch never reaches the database."""
    db = FakeDatabase()
    commits = group(db, gather=True)
    await _after_a_batch_of(2, db, commits)
    scope = trio.CancelScope()

    async def withdrawn() -> None:
        with scope:
            await commits.commit("withdrawn")

    async def cancel() -> None:
        scope.cancel()

    async with trio.open_nursery() as nursery:
        # Started now, they run in the next round, while this task (the leader) gathers.
        nursery.start_soon(commits.commit, "kept")
        nursery.start_soon(withdrawn)
        nursery.start_soon(cancel)
        await commits.commit("lead")
    assert [sorted(batch) for batch in db.batches[2:]] == [["kept", "lead"]]
    assert "withdrawn" not in db.committed

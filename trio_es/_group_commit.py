"""Group commit: many concurrent transactions share one database transaction and one fsync.

A durable commit costs an fsync and a worker-thread hop, whatever it writes. When many
aggregate tasks commit at once, :class:`GroupCommit` hands all the transactions waiting at
that moment to the store in one batch, which commits them in one database transaction.

Leader and followers, no background task: a transaction that arrives when nothing is being
committed is the leader and commits at once (so a lone writer waits for nobody: latency at
low load is that of a plain commit). Transactions that arrive while a batch is in flight
queue up; when the batch is done the first of them leads the next batch with all of them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar, final

import attrs
import outcome
import trio

from ._errors import TransactionFailed

__all__ = ["GroupCommit"]

PlanT = TypeVar("PlanT")

#: Commits a batch in one database transaction and returns one outcome per plan, in order.
#: A failure of one plan (a concurrency conflict, a row the database refuses) is that
#: plan's outcome; raising fails the whole batch (nothing of it was written).
CommitBatch = Callable[[list[PlanT]], Awaitable[list[outcome.Outcome[None]]]]


@attrs.define(eq=False)
class _Waiter(Generic[PlanT]):
    plan: PlanT
    result: outcome.Outcome[None] | None = None
    promoted: bool = False
    wake: trio.Event = attrs.Factory(trio.Event)


@final
@attrs.define(eq=False)
class GroupCommit(Generic[PlanT]):
    """Batches concurrent commits of one store.

    Guarantees, for each plan: it is committed atomically or not at all; a conflict or a
    refused row in one plan fails only that plan; its caller is answered only after its
    batch's database transaction committed; a caller cancelled before its batch started
    is withdrawn (nothing written), one cancelled after is answered with ``Cancelled``
    but its plan may have been committed, as with any cancelled I/O.

    Attributes:
        commit_batch: the store's batch commit (one worker-thread call).
        max_batch: the most plans one batch takes; the rest wait for the next one.
        batches: how many batches were committed (for tests and statistics).
        plans: how many plans those batches held.
    """

    commit_batch: CommitBatch[PlanT]
    max_batch: int = 512
    batches: int = 0
    plans: int = 0
    _queue: list[_Waiter[PlanT]] = attrs.field(factory=list, init=False)
    _busy: bool = attrs.field(default=False, init=False)

    async def commit(self, plan: PlanT) -> None:
        """Commit ``plan``, alone or with the plans of other tasks committing now.

        Raises whatever made this plan (or its whole batch) fail.
        """
        waiter: _Waiter[PlanT] = _Waiter(plan)
        self._queue.append(waiter)
        if self._busy:
            try:
                await waiter.wake.wait()
            except trio.Cancelled:
                if waiter in self._queue:
                    # Not taken into a batch yet: withdraw, passing on the lead if it was ours.
                    self._queue.remove(waiter)
                    if waiter.promoted:
                        self._promote_next()
                raise
            if waiter.result is None:
                assert waiter.promoted
                await self._lead()
        else:
            self._busy = True
            await self._lead()
        assert waiter.result is not None
        waiter.result.unwrap()

    async def _lead(self) -> None:
        batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
        results: list[outcome.Outcome[None]] | None = None
        try:
            plans = [waiter.plan for waiter in batch]
            # Alone, the leader's own cancellation may interrupt its commit; when others
            # wait on the batch, it must not fail them.
            with trio.CancelScope(shield=len(batch) > 1):
                answers = await self.commit_batch(plans)
            if len(answers) != len(batch):
                raise RuntimeError(
                    f"commit_batch returned {len(answers)} outcomes for {len(batch)} plans"
                )
            results = answers
            self.batches += 1
            self.plans += len(batch)
        except BaseException as failure:
            error = failure if isinstance(failure, Exception) else _batch_stopped(failure)
            results = [outcome.Error(error)] * len(batch)
            raise
        finally:
            assert results is not None
            for waiter, result in zip(batch, results, strict=True):
                waiter.result = result
                waiter.wake.set()
            self._promote_next()

    def _promote_next(self) -> None:
        if self._queue:
            head = self._queue[0]
            head.promoted = True
            head.wake.set()
        else:
            self._busy = False


def _batch_stopped(reason: BaseException) -> Exception:
    # Only a lone leader's batch can be cancelled, so this reaches no other caller; it
    # is here so that an interrupt (KeyboardInterrupt) never leaves a waiter unanswered.
    return TransactionFailed(f"the commit was stopped by {type(reason).__name__}")

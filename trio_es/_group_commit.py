"""Group commit: many concurrent transactions share one database transaction and one fsync.

A durable commit costs an fsync and a worker-thread hop, whatever it writes. When many
aggregate tasks commit at once, :class:`GroupCommit` hands all the transactions waiting at
that moment to the store in one batch, which commits them in one database transaction.

Leader and followers, no background task: a transaction that arrives when nothing is being
committed is the leader and commits at once (so a lone writer waits for nobody: latency at
low load is that of a plain commit). Transactions that arrive while a batch is in flight
queue up; when the batch is done the first of them leads the next batch with all of them.
A store whose commit runs in a worker thread may ask a leader that follows a batch of
several to let a few scheduling rounds pass first (``gather``), so that a wave of commits
becomes one batch.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final, Generic, TypeVar, final

import attrs
import outcome
import trio

from ._errors import CommitOutcomeUnknown

__all__ = ["GroupCommit"]

PlanT = TypeVar("PlanT")

# How many scheduling rounds a gathering leader lets pass (see GroupCommit._gather): a
# wave's chain is the answered task, the caller it replies to, and the task that caller
# sends its next command to, which commits.
_GATHER_ROUNDS: Final = 3

#: Commits a batch in one database transaction and returns one outcome per plan, in order.
#: A failure of one plan (a concurrency conflict, a row the database refuses) is that
#: plan's outcome; raising fails the whole batch (nothing of it was written). A plan's
#: value (e.g. where its events were stored) is what :meth:`GroupCommit.commit` returns.
CommitBatch = Callable[[list[PlanT]], Awaitable[list[outcome.Outcome[Any]]]]


@attrs.define(eq=False)
class _Waiter(Generic[PlanT]):
    plan: PlanT
    result: outcome.Outcome[Any] | None = None
    promoted: bool = False
    #: Set when the waiter must wait (a batch is in flight): a lone leader never does.
    wake: trio.Event | None = None


@final
@attrs.define(eq=False)
class GroupCommit(Generic[PlanT]):
    """Batches concurrent commits of one store.

    Guarantees, for each plan: it is committed atomically or not at all; a conflict or a
    refused row in one plan fails only that plan; its caller is answered only after its
    batch's database transaction committed; a caller cancelled (or interrupted) before
    its batch started is withdrawn (nothing written), one cancelled after is answered with
    ``Cancelled`` but its plan may have been committed, as with any cancelled I/O.

    How the callers of a failed batch are answered (never with a retryable error for a
    batch that may have committed, and never not at all):

    * ``commit_batch`` raised an ``Exception``: by its contract nothing of the batch was
      written (a store that cannot tell raises ``CommitOutcomeUnknown`` itself). Every
      caller gets that error as itself, so a ``TransactionFailed`` stays retryable for
      each: the leader the instance that was raised, every other caller its own copy
      (same type, arguments and attributes, ``__cause__`` the original), so that no two
      tasks raise one instance and pile their tracebacks onto it. An error whose state
      cannot be copied faithfully (state kept in C fields or slots) is given as itself.
    * The leader was interrupted (``KeyboardInterrupt``, ``SystemExit``, or ``Cancelled``
      of a lone leader): the batch may have committed. The leader's task gets the
      interrupt; every other caller gets its own :class:`~trio_es.CommitOutcomeUnknown`.
      ``commit`` runs protected from ``KeyboardInterrupt``, so a Ctrl-C reaches it only
      at a checkpoint (waiting in the queue, or inside ``commit_batch``), never halfway
      through handing out the answers.
    * Cancellation: a batch of one runs under its leader's cancel scope, since its only
      caller is the leader itself (cancelled after sending, it gets ``Cancelled``); a
      batch of several is shielded from its leader's cancellation, so the others get the
      real outcome.

    Attributes:
        commit_batch: the store's batch commit (one worker-thread call).
        max_batch: the most plans one batch takes; the rest wait for the next one.
        gather: after a batch of several plans, the next leader lets three scheduling
            rounds pass before it takes its batch, so that the rest of its wave joins it
            (see :meth:`_gather`). For a store whose commit runs in a worker thread. A
            leader after a batch of one leads at once: a lone writer waits for nobody.
        batches: how many batches were committed (for tests and statistics).
        plans: how many plans those batches held.
    """

    commit_batch: CommitBatch[PlanT]
    max_batch: int = 512
    gather: bool = False
    batches: int = 0
    plans: int = 0
    _queue: list[_Waiter[PlanT]] = attrs.field(factory=list, init=False)
    _busy: bool = attrs.field(default=False, init=False)
    #: How many plans the last batch took: more than one means commits come in waves.
    _last_batch: int = attrs.field(default=0, init=False)

    # Protected from KeyboardInterrupt (and so is the commit_batch it calls): a Ctrl-C
    # raised between two lines of the queue bookkeeping could leave a waiter unanswered
    # or the lead with nobody. It arrives at a checkpoint instead, where it is handled.
    @trio.lowlevel.enable_ki_protection
    async def commit(self, plan: PlanT) -> Any:
        """Commit ``plan``, alone or with the plans of other tasks committing now.

        Returns the value ``commit_batch`` gave for this plan. Raises whatever made this
        plan (or its whole batch) fail; see the class docstring for what the callers of a
        failed or interrupted batch get.
        """
        waiter: _Waiter[PlanT] = _Waiter(plan)
        self._queue.append(waiter)
        if self._busy:
            wake = waiter.wake = trio.Event()
            try:
                await wake.wait()
            except BaseException:
                # Cancelled, or KeyboardInterrupt delivered at this checkpoint: either way
                # this caller leaves, and a waiter left in the queue would be promoted to
                # lead with nobody there to lead, stranding everyone behind it.
                self._withdraw(waiter)
                raise
            if waiter.result is None:
                assert waiter.promoted
                await self._lead()
        else:
            self._busy = True
            await self._lead()
        assert waiter.result is not None
        return waiter.result.unwrap()

    async def _gather(self) -> None:
        """Let a wave of commits queue up before this leader takes its batch.

        Commits come in waves under load: a batch of several answers its callers, whose
        tasks reply to theirs, who send their next commands, whose aggregates commit
        again, over a few scheduling rounds. The first of them to commit leads; taking
        the batch at once makes it a batch of that one plan, and the rest of the wave
        waits for the next commit and its fsync. For a store whose commit runs in a
        worker thread, starting at once gains little: the thread needs the GIL to run,
        and the Trio thread keeps it until it runs out of runnable tasks (or CPython's
        switch interval ends, 5 ms by default). So the leader first lets three
        scheduling rounds pass, the length of the chain above: a fixed number, so the
        delay is bounded however busy the other tasks are.

        The yields are no cancellation points: the leader is already committed to lead,
        and its own cancellation is handled by ``commit_batch`` as for any leader.
        """
        for _ in range(_GATHER_ROUNDS):
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def _lead(self) -> None:
        if self.gather and self._last_batch > 1:
            await self._gather()
        batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
        self._last_batch = len(batch)
        answers: list[outcome.Outcome[Any]] | None = None
        failure: BaseException | None = None
        try:
            plans = [waiter.plan for waiter in batch]
            # Alone, the leader's own cancellation may interrupt its commit; when others
            # wait on the batch, it must not fail them.
            if len(batch) > 1:
                with trio.CancelScope(shield=True):
                    returned = await self.commit_batch(plans)
            else:
                returned = await self.commit_batch(plans)
            if len(returned) != len(batch):
                raise RuntimeError(
                    f"commit_batch returned {len(returned)} outcomes for {len(batch)} plans"
                )
            answers = returned
            self.batches += 1
            self.plans += len(batch)
        except BaseException as error:
            failure = error
            raise
        finally:
            self._answer(batch, answers, failure)

    def _answer(
        self,
        batch: list[_Waiter[PlanT]],
        answers: list[outcome.Outcome[Any]] | None,
        failure: BaseException | None,
    ) -> None:
        if answers is None:
            assert failure is not None  # no answers only when _lead is raising
            answers = _failed(batch_size=len(batch), failure=failure)
        for waiter, result in zip(batch, answers, strict=True):
            waiter.result = result
            if waiter.wake is not None:
                waiter.wake.set()
        self._promote_next()

    def _withdraw(self, waiter: _Waiter[PlanT]) -> None:
        if waiter in self._queue:
            # Not taken into a batch yet: withdraw, passing on the lead if it was ours.
            self._queue.remove(waiter)
            if waiter.promoted:
                self._promote_next()

    def _promote_next(self) -> None:
        if self._queue:
            head = self._queue[0]
            head.promoted = True
            # Queued while a batch was in flight, so it waits on its event.
            assert head.wake is not None
            head.wake.set()
        else:
            self._busy = False


def _failed(*, batch_size: int, failure: BaseException) -> list[outcome.Outcome[Any]]:
    """One outcome per waiter of a batch that raised ``failure``, each with its own error.

    The first waiter is the leader, which raises ``failure`` itself; its outcome is
    never unwrapped but keeps the list aligned with the batch.
    """
    errors: list[Exception]
    if isinstance(failure, Exception):
        errors = [failure, *(_copy_for_another_caller(failure) for _ in range(batch_size - 1))]
    else:
        # Interrupted, maybe after the commit was sent: it may have landed.
        reason = type(failure).__name__
        errors = [
            CommitOutcomeUnknown(
                f"the group commit this transaction was part of was interrupted by {reason}"
            )
            for _ in range(batch_size)
        ]
    return [outcome.Error(error) for error in errors]


#: Built-in exception types whose whole state is ``args`` (no C fields such as
#: ``OSError.errno`` or ``ImportError.name``), so an instance rebuilt from ``args`` and
#: the instance dict is the same error.
_PLAIN_BUILTINS: frozenset[type[BaseException]] = frozenset(
    {
        BaseException,
        Exception,
        ArithmeticError,
        AssertionError,
        BufferError,
        EOFError,
        FloatingPointError,
        IndexError,
        KeyError,
        LookupError,
        MemoryError,
        NotImplementedError,
        OverflowError,
        RecursionError,
        ReferenceError,
        RuntimeError,
        TypeError,
        ValueError,
        ZeroDivisionError,
    }
)


def _copy_for_another_caller(error: Exception) -> Exception:
    """A new instance of ``error`` for one more caller, or ``error`` itself if none is faithful.

    Rebuilt from the state pickling sees (``args`` and the instance attributes), but
    without calling ``__init__``, since many errors take keyword-only arguments that
    ``args`` does not hold: ``__new__`` with the same ``args``, then the same attributes.
    Only done when that is the whole state: no ``__slots__``, and a built-in base that
    keeps nothing outside ``args``.
    """
    kind = type(error)
    builtin_base = next(base for base in kind.__mro__ if base.__module__ == "builtins")
    if builtin_base not in _PLAIN_BUILTINS or any(
        "__slots__" in vars(base) for base in kind.__mro__
    ):
        return error
    try:
        copy = kind.__new__(kind, *error.args)
        for name, value in vars(error).items():
            # An attribute that refers to the error itself (DomainError.error) must refer
            # to the copy; __notes__ is a list the two must not share.
            if value is error:
                value = copy
            elif name == "__notes__" and isinstance(value, list):
                value = list(value)
            setattr(copy, name, value)
        faithful = type(copy) is kind and copy.args == error.args and str(copy) == str(error)
    except Exception:
        return error
    if not faithful:
        return error
    copy.__cause__ = error
    return copy

"""A store wrapper that injects commit faults, for testing what the runtime does with them.

:class:`FaultInjectingStore` wraps a real store and follows a *plan*: the ``n``-th
transaction that writes events gets ``plan[n]`` (``None``, or past the end of the plan:
no fault). Read-only transactions are never faulted. The plan is data, so a test (or
Hypothesis) can say exactly which commit fails and how, and a failing run replays.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Generic, TypeVar, final

import attrs
import trio

from .._errors import CommitOutcomeUnknown, ConcurrencyConflict, EventStoreError
from .._store import EventStore, load_snapshot_and_events
from .._types import Aggregate, EventEnvelope, Metadata, Snapshot

__all__ = ["Fault", "FaultInjectingStore", "FaultKind", "InjectedFault"]

TxT = TypeVar("TxT")
EventT = TypeVar("EventT")
EntityT = TypeVar("EntityT")


class FaultKind(enum.Enum):
    """What goes wrong with one commit."""

    #: The store fails before committing: nothing is stored, ``EventStoreError`` is raised.
    ERROR_BEFORE_COMMIT = "error before commit"
    #: The commit lands, then the store fails to confirm it: ``CommitOutcomeUnknown``.
    ERROR_AFTER_COMMIT = "error after commit"
    #: The connection drops around ``COMMIT``; it may or may not have landed
    #: (:attr:`Fault.committed` says which), and the store raises ``CommitOutcomeUnknown``.
    LOST_CONNECTION = "lost connection"
    #: Another writer got there first: ``ConcurrencyConflict``, nothing stored.
    CONFLICT = "conflict"
    #: The commit succeeds after stalling for :attr:`Fault.seconds` (Trio's clock).
    SLOW_COMMIT = "slow commit"


def _non_negative(_: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{attribute.name} must be a number of seconds >= 0 (got {value!r})")


@final
@attrs.frozen
class Fault:
    """One injected fault; build it with the class methods, which read as what happens."""

    kind: FaultKind
    #: SLOW_COMMIT: how long the commit stalls, in seconds.
    seconds: float = attrs.field(default=0.0, validator=_non_negative)
    #: LOST_CONNECTION: whether the commit landed before the connection dropped.
    committed: bool = False

    @classmethod
    def error_before_commit(cls) -> Fault:
        """Nothing is stored; the store raises ``EventStoreError``."""
        return cls(FaultKind.ERROR_BEFORE_COMMIT)

    @classmethod
    def error_after_commit(cls) -> Fault:
        """The commit is stored; the store raises ``CommitOutcomeUnknown``."""
        return cls(FaultKind.ERROR_AFTER_COMMIT)

    @classmethod
    def lost_connection(cls, *, committed: bool) -> Fault:
        """Stored or not as ``committed`` says; the store raises ``CommitOutcomeUnknown``."""
        return cls(FaultKind.LOST_CONNECTION, committed=committed)

    @classmethod
    def conflict(cls) -> Fault:
        """Nothing is stored; the store raises ``ConcurrencyConflict``."""
        return cls(FaultKind.CONFLICT)

    @classmethod
    def slow_commit(cls, seconds: float) -> Fault:
        """The commit is stored after ``seconds``."""
        return cls(FaultKind.SLOW_COMMIT, seconds=seconds)

    def __repr__(self) -> str:
        match self.kind:
            case FaultKind.LOST_CONNECTION:
                return f"Fault.lost_connection(committed={self.committed!r})"
            case FaultKind.SLOW_COMMIT:
                return f"Fault.slow_commit({self.seconds!r})"
        return f"Fault.{self.kind.name.lower()}()"

    @property
    def stores(self) -> bool:
        """Whether the faulted commit is stored."""
        return self.kind in (FaultKind.ERROR_AFTER_COMMIT, FaultKind.SLOW_COMMIT) or (
            self.kind is FaultKind.LOST_CONNECTION and self.committed
        )


def _plan(faults: Iterable[Fault | None]) -> list[Fault | None]:
    return list(faults)


@final
@attrs.frozen
class InjectedFault:
    """A fault that was injected: which writing transaction, which fault, which aggregates."""

    write: int
    fault: Fault
    aggregate_ids: tuple[str, ...]


@final
@attrs.define(eq=False)
class FaultTransaction(Generic[TxT]):
    """The wrapper's transaction handle: the inner store's, plus what this one wrote."""

    inner: TxT
    #: Index among writing transactions, set by the first ``commit_events``.
    write: int | None = None
    #: (aggregate id, sequence before) of each ``commit_events`` call.
    appends: list[tuple[str, int]] = attrs.Factory(list)

    @property
    def recorded(self) -> Any:
        """The inner handle's committed positions (see ``trio_es._store.committed_envelopes``)."""
        return getattr(self.inner, "recorded", None)


@final
@attrs.define(eq=False)
class FaultInjectingStore(Generic[TxT, EventT, EntityT]):
    """A real store, with the faults of a plan injected into its writing transactions.

    Everything else passes through to ``inner`` (``read_all`` too, when it has one).
    Faults take effect when the transaction's block exits: "before commit" ones raise
    inside the inner store's transaction, so it rolls back; "after commit" ones raise
    once the inner store has committed. Injected errors name the first aggregate the
    transaction wrote.

    Attributes:
        inner: the real store.
        plan: the fault of each writing transaction, in the order they first write.
        injected: every fault injected so far, in order.
        writes: how many transactions have written so far.
    """

    inner: EventStore[TxT, EventT, EntityT]
    plan: list[Fault | None] = attrs.field(factory=list, converter=_plan)
    injected: list[InjectedFault] = attrs.field(factory=list, init=False)
    writes: int = attrs.field(default=0, init=False)

    def add(self, faults: Iterable[Fault | None]) -> None:
        """Append ``faults`` to the plan."""
        self.plan.extend(faults)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[FaultTransaction[TxT]]:
        """The inner store's transaction, with this transaction's planned fault on exit."""
        async with self.inner.transaction() as inner:
            tx = FaultTransaction(inner)
            yield tx
            fault = self._fault(tx)
            if fault is not None:
                await self._before_commit(tx, fault)
        fault = self._fault(tx)
        if fault is not None and fault.stores and fault.kind is not FaultKind.SLOW_COMMIT:
            raise CommitOutcomeUnknown(
                f"injected {fault.kind.value} after the commit landed",
                aggregate_id=tx.appends[0][0],
            )

    def _fault(self, tx: FaultTransaction[TxT]) -> Fault | None:
        if tx.write is None or tx.write >= len(self.plan):
            return None
        return self.plan[tx.write]

    async def _before_commit(self, tx: FaultTransaction[TxT], fault: Fault) -> None:
        aggregate_id, sequence = tx.appends[0]
        assert tx.write is not None
        self.injected.append(
            InjectedFault(tx.write, fault, tuple(dict.fromkeys(a for a, _ in tx.appends)))
        )
        match fault.kind:
            case FaultKind.SLOW_COMMIT:
                await trio.sleep(fault.seconds)
            case FaultKind.ERROR_BEFORE_COMMIT:
                raise EventStoreError(
                    "injected error before commit: nothing was stored", aggregate_id=aggregate_id
                )
            case FaultKind.CONFLICT:
                raise ConcurrencyConflict(
                    aggregate_id=aggregate_id,
                    expected_sequence=sequence,
                    actual_sequence=sequence + 1,
                )
            case FaultKind.LOST_CONNECTION if not fault.committed:
                raise CommitOutcomeUnknown(
                    "injected lost connection before the commit landed", aggregate_id=aggregate_id
                )

    async def load_events(
        self, tx: FaultTransaction[TxT], aggregate_id: str, start_from: int
    ) -> Sequence[EventEnvelope[EventT]]:
        return await self.inner.load_events(tx.inner, aggregate_id, start_from)

    async def commit_events(
        self,
        tx: FaultTransaction[TxT],
        aggregate: Aggregate[EntityT],
        events: Iterable[EventT],
        metadata: Metadata,
    ) -> tuple[Sequence[EventEnvelope[EventT]], int]:
        result = await self.inner.commit_events(tx.inner, aggregate, events, metadata)
        if tx.write is None:
            tx.write = self.writes
            self.writes += 1
        tx.appends.append((aggregate.aggregate_id, aggregate.sequence))
        return result

    async def load_snapshot(
        self, tx: FaultTransaction[TxT], aggregate_id: str
    ) -> Snapshot[EntityT] | None:
        return await self.inner.load_snapshot(tx.inner, aggregate_id)

    async def load_snapshot_and_events(
        self, tx: FaultTransaction[TxT], aggregate_id: str
    ) -> tuple[Snapshot[EntityT] | None, Sequence[EventEnvelope[EventT]]]:
        """The inner store's, in one call where it has one (see ``load_snapshot_and_events``)."""
        return await load_snapshot_and_events(self.inner, tx.inner, aggregate_id)

    async def save_snapshot(self, tx: FaultTransaction[TxT], snapshot: Snapshot[EntityT]) -> None:
        await self.inner.save_snapshot(tx.inner, snapshot)

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> Any:
        """The inner store's ``read_all`` (``AttributeError`` if it has none)."""
        return await self.inner.read_all(after_position, limit)  # type: ignore[attr-defined]

    # Subscriptions and projections pass through untouched (faults are for commits);
    # each raises ``AttributeError`` when the inner store has no such method.

    async def head_position(self) -> int:
        """The inner store's ``head_position``."""
        head: int = await self.inner.head_position()  # type: ignore[attr-defined]
        return head

    async def checkpoint_position(self, name: str) -> int:
        """The inner store's ``checkpoint_position``."""
        position: int = await self.inner.checkpoint_position(name)  # type: ignore[attr-defined]
        return position

    def watch(self) -> AbstractAsyncContextManager[Any]:
        """The inner store's ``watch``."""
        watch: AbstractAsyncContextManager[Any] = self.inner.watch()  # type: ignore[attr-defined]
        return watch

    def projection_lease(self, name: str) -> AbstractAsyncContextManager[Any]:
        """The inner store's ``projection_lease``."""
        lease: AbstractAsyncContextManager[Any] = self.inner.projection_lease(name)  # type: ignore[attr-defined]
        return lease

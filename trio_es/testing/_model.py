"""The sequential reference model: what a correct eventsourcing system must produce.

The runtime runs commands concurrently, batches them into commits, restarts crashed
aggregates and retries failed transactions; none of that may change what a caller or a
read model observes. Whatever it does, each aggregate must end up as if its commands
had been run one at a time, in the order they were processed, by this model.

The model is plain Python (no Trio, no store): it needs ``handle`` as a plain function
(an async ``handle`` cannot be run here; pass the pure decision it awaits). Given the
commands one aggregate processed, :meth:`ReferenceModel.run` yields each command's reply
(its events, a domain rejection, or a crash), the sequence numbers its events take and
the entity after it. The snapshot rules a batching runtime must keep are
:meth:`ReferenceModel.snapshot_due` and :meth:`ReferenceModel.snapshot_window`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, Generic, Literal, TypeAlias, TypeVar, final

import attrs

from .._aggregate import BadEvents, events_of
from .._errors import DomainError

__all__ = ["Accepted", "Crashed", "Decision", "ModelStep", "ReferenceModel", "Rejected"]

CommandT = TypeVar("CommandT")
EventT = TypeVar("EventT")
EntityT = TypeVar("EntityT")


@final
@attrs.frozen
class Accepted(Generic[EventT, EntityT]):
    """The command was accepted: ``events`` are appended and the entity becomes ``entity``.

    ``events`` may be empty: the command is acknowledged and nothing is stored.
    """

    events: tuple[EventT, ...]
    entity: EntityT


@final
@attrs.frozen
class Rejected:
    """``handle`` raised a :class:`~trio_es.DomainError`: the caller gets it, nothing is stored."""

    error: DomainError


@final
@attrs.frozen
class Crashed:
    """``handle`` or ``apply`` raised something else (a bug): nothing may be stored."""

    error: Exception


class _Start(enum.Enum):
    EMPTY = enum.auto()


#: Stands for the model's empty state where an entity is optional.
_EMPTY: Final = _Start.EMPTY

#: What the model says one command does.
Decision: TypeAlias = Accepted[Any, Any] | Rejected | Crashed


@final
@attrs.frozen
class ModelStep(Generic[CommandT, EntityT]):
    """One command as the model runs it.

    Attributes:
        command: the command.
        decision: its reply and, when accepted, its events and the entity after them.
        entity_before: the entity the command was decided on.
        sequence_before: the aggregate's sequence before the command.
        sequence_after: the sequence after it (``sequence_before`` unless it stored events);
            its events take ``sequence_before + 1 .. sequence_after``.
    """

    command: CommandT
    decision: Decision
    entity_before: EntityT
    sequence_before: int
    sequence_after: int

    @property
    def entity_after(self) -> EntityT:
        """The entity after the command (unchanged unless it was accepted)."""
        if isinstance(self.decision, Accepted):
            entity: EntityT = self.decision.entity
            return entity
        return self.entity_before


def _check_frequency(_: object, attribute: attrs.Attribute[int | None], value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{attribute.name} must be a positive int or None (got {value!r})")


@final
@attrs.frozen(kw_only=True)
class ReferenceModel(Generic[CommandT, EventT, EntityT]):
    """Runs one aggregate's commands one at a time, as a correct system must appear to.

    Attributes:
        handle: ``handle(entity, command) -> events`` (any iterable; it is materialised
            once, as the runtime must). Raises ``DomainError`` to reject a command.
        apply: ``apply(entity, event) -> entity``, pure.
        empty_state: the entity before the first event.
        snapshot_every: the snapshot frequency ``n``, or ``None`` when snapshots are off.
    """

    handle: Callable[[EntityT, CommandT], Iterable[EventT]]
    apply: Callable[[EntityT, EventT], EntityT]
    empty_state: EntityT
    snapshot_every: int | None = attrs.field(default=None, validator=_check_frequency)

    def decide(self, entity: EntityT, command: CommandT) -> Decision:
        """What ``command`` does to ``entity``: accepted with events, rejected, or crashed.

        ``handle`` returning no iterable of events (``None``, a str, a mapping) is
        reported as ``Crashed`` with the ``TypeError`` its caller gets: nothing is stored
        and the reply is that error (the runtime does not restart for it, which the
        model does not track). ``apply`` raising on one of the events is a crash.
        """
        try:
            events = tuple(events_of(self.handle(entity, command), command))
        except DomainError as rejection:
            return Rejected(rejection)
        except BadEvents as bad:
            return Crashed(bad.error)
        except Exception as error:
            return Crashed(error)
        try:
            after = self.replay(events, entity)
        except Exception as error:
            return Crashed(error)
        return Accepted(events, after)

    def replay(
        self, events: Iterable[EventT], entity: EntityT | Literal[_Start.EMPTY] = _EMPTY
    ) -> EntityT:
        """Fold ``events`` into ``entity`` (by default the empty state) with ``apply``."""
        state = self.empty_state if entity is _EMPTY else entity
        for event in events:
            state = self.apply(state, event)
        return state

    def run(
        self,
        commands: Iterable[CommandT],
        *,
        entity: EntityT | Literal[_Start.EMPTY] = _EMPTY,
        sequence: int = 0,
    ) -> list[ModelStep[CommandT, EntityT]]:
        """Run ``commands`` in order from ``entity`` at ``sequence`` (default: the start).

        Rejected and crashed commands leave the entity and sequence as they were.
        """
        state = self.empty_state if entity is _EMPTY else entity
        steps: list[ModelStep[CommandT, EntityT]] = []
        for command in commands:
            decision = self.decide(state, command)
            after = sequence
            if isinstance(decision, Accepted):
                after = sequence + len(decision.events)
            step = ModelStep(command, decision, state, sequence, after)
            steps.append(step)
            state, sequence = step.entity_after, after
        return steps

    def snapshot_due(self, sequence_before: int, sequence_after: int) -> bool:
        """Whether a commit from ``sequence_before`` to ``sequence_after`` saves a snapshot.

        It does when it reaches or crosses a multiple of ``n``; the snapshot is taken at
        the commit's end (``sequence_after``), with the entity after the whole commit.
        A commit may carry several commands, so it may cross a multiple in its middle.
        """
        n = self.snapshot_every
        return n is not None and sequence_after // n > sequence_before // n

    def snapshots_saved(self, commit_ends: Sequence[int]) -> list[int]:
        """The sequences of the snapshots saved by commits ending at ``commit_ends``.

        ``commit_ends`` are the sequences after each commit, in commit order, starting
        from an empty aggregate.
        """
        saved: list[int] = []
        before = 0
        for end in commit_ends:
            if self.snapshot_due(before, end):
                saved.append(end)
            before = end
        return saved

    def snapshot_window(self, head: int) -> tuple[int, int] | None:
        """Where the latest snapshot of a stream of ``head`` events must be, or ``None``.

        ``None``: there must be no snapshot (snapshots are off, or ``head < n``).
        Otherwise ``(low, high)``: the latest snapshot's sequence ``s`` satisfies
        ``low <= s <= high``, with ``low = n * (head // n)`` and ``high = head``. Why: the
        commit that reached or crossed ``low`` saved a snapshot at its end, which is at
        least ``low``; a later commit saves one only by crossing a higher multiple, and
        there is none up to ``head``. ``s`` is also a commit boundary (the end of some
        command's events), which only the caller can check.
        """
        n = self.snapshot_every
        if n is None or head < n:
            return None
        return n * (head // n), head

"""The values trio_es passes around: aggregates, snapshots, envelopes, stats and messages.

All of them are frozen attrs classes: safe to share between tasks, compared by value.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Generic, TypeAlias, TypeVar, final

import attrs
import outcome

from ._subject import Subject
from ._validated import Frequency

__all__ = [
    "Aggregate",
    "AggregateMessage",
    "AggregateStats",
    "EventEnvelope",
    "ExecuteCommand",
    "ExecuteCommandWithResponse",
    "ExecuteForResult",
    "ExecuteResult",
    "GetAggregateStats",
    "GetSystemStats",
    "LoadAggregate",
    "LoadAllEvents",
    "LoadEvents",
    "LoadLatestSnapshot",
    "MemoryStoreEventEnvelope",
    "Message",
    "Metadata",
    "ProcessEvents",
    "ProjectionStats",
    "Reply",
    "SerializedEventEnvelope",
    "Snapshot",
    "SnapshotConfig",
    "StoredEvent",
    "SystemStats",
    "check_aggregate_id",
    "metadata_tuple",
    "utc_now",
]

EventT = TypeVar("EventT")
EntityT = TypeVar("EntityT")
T = TypeVar("T")

#: Metadata stored with each event of a command: ``(key, value)`` pairs of strings.
Metadata: TypeAlias = tuple[tuple[str, str], ...]

#: A subject that receives one reply: the value, or the error ``receive`` raises.
Reply: TypeAlias = Subject[outcome.Outcome[T]]


def metadata_tuple(metadata: Iterable[tuple[str, str]]) -> Metadata:
    """Return ``metadata`` as a tuple of ``(str, str)`` pairs, or raise ``TypeError``."""
    pairs = tuple(metadata)
    for pair in pairs:
        if (
            not isinstance(pair, tuple)
            or len(pair) != 2
            or not isinstance(pair[0], str)
            or not isinstance(pair[1], str)
        ):
            raise TypeError(f"metadata must be (str, str) pairs (got {pair!r})")
    return pairs


def check_aggregate_id(aggregate_id: object) -> str:
    """Return ``aggregate_id`` if it is a non-empty ``str``, else raise.

    Raises:
        TypeError: it is not a ``str``.
        ValueError: it is the empty string.
    """
    if not isinstance(aggregate_id, str):
        raise TypeError(
            f"aggregate_id must be a non-empty str (got {aggregate_id!r} of type "
            f"{type(aggregate_id).__name__})"
        )
    if not aggregate_id:
        raise ValueError("aggregate_id must be a non-empty str (got '')")
    return aggregate_id


def utc_now() -> datetime.datetime:
    """The current wall-clock time as an aware UTC datetime (for snapshot timestamps)."""
    return datetime.datetime.now(datetime.UTC)


@final
@attrs.frozen
class Aggregate(Generic[EntityT]):
    """An entity together with its identity and the sequence of its last applied event.

    ``sequence`` is 0 before the first event; events are numbered from 1 without gaps.
    """

    aggregate_id: str
    entity: EntityT
    sequence: int


@final
@attrs.frozen
class Snapshot(Generic[EntityT]):
    """The entity as it was after event ``sequence``, taken at ``timestamp`` (aware, UTC)."""

    aggregate_id: str
    entity: EntityT
    sequence: int
    timestamp: datetime.datetime


@final
@attrs.frozen
class SnapshotConfig:
    """Save a snapshot whenever a commit reaches or crosses a multiple of ``frequency.n``."""

    frequency: Frequency


@final
@attrs.frozen
class MemoryStoreEventEnvelope(Generic[EventT]):
    """A stored event as the memory store keeps it: the payload is the event object itself."""

    aggregate_id: str
    sequence: int
    payload: EventT
    metadata: Metadata
    #: The event's unique id, given when it was staged; it never changes. Not part of
    #: equality: envelopes compare by their content, as before ids existed.
    event_id: uuid.UUID | None = attrs.field(default=None, kw_only=True, eq=False)
    #: The event's place in the whole store, increasing in commit order (``None`` until
    #: committed, e.g. in the envelopes ``commit_events`` returns). Not part of equality.
    global_position: int | None = attrs.field(default=None, kw_only=True, eq=False)
    #: When the event was committed (aware, UTC; ``None`` until committed).
    recorded_at: datetime.datetime | None = attrs.field(default=None, kw_only=True, eq=False)


@final
@attrs.frozen
class SerializedEventEnvelope(Generic[EventT]):
    """A stored event read back from a serializing store, with its type information."""

    aggregate_id: str
    sequence: int
    payload: EventT
    metadata: Metadata
    event_type: str
    event_version: int
    aggregate_type: str
    #: The event's unique id, given when it was staged; it never changes (``None`` only
    #: for envelopes built by hand). Not part of equality: envelopes compare by content.
    event_id: uuid.UUID | None = attrs.field(default=None, kw_only=True, eq=False)
    #: The event's place in the whole store, increasing in commit order (``None`` until
    #: committed, e.g. in the envelopes ``commit_events`` returns). Not part of equality.
    global_position: int | None = attrs.field(default=None, kw_only=True, eq=False)
    #: When the event was committed (aware, UTC; ``None`` until committed).
    recorded_at: datetime.datetime | None = attrs.field(default=None, kw_only=True, eq=False)


#: Either kind of stored event.
EventEnvelope: TypeAlias = MemoryStoreEventEnvelope[EventT] | SerializedEventEnvelope[EventT]


@final
@attrs.frozen
class StoredEvent(Generic[EventT]):
    """An event as a store's ``read_all`` returns it: its place in the whole log, and when.

    Attributes:
        global_position: increases in commit order across every aggregate of the table.
        envelope: the event with its aggregate, sequence, metadata and type information.
        recorded_at: when it was committed (aware, UTC).
    """

    global_position: int
    envelope: EventEnvelope[EventT]
    recorded_at: datetime.datetime


@final
@attrs.frozen
class SystemStats:
    """How busy the system is: queries running and commands handled so far.

    ``total_commands_processed`` counts accepted commands and commands the domain
    rejected (a :class:`~trio_es.DomainError` is a normal outcome). ``live_aggregates``
    (not in the Gleam package) counts the aggregate tasks alive now, holding cached state: it
    falls as idle aggregates stop. ``failed_queries`` (not in the Gleam package) names the queries
    that kept raising and were stopped; commands go on without them.
    """

    query_actors_count: int
    total_commands_processed: int
    live_aggregates: int = 0
    #: The queries that kept failing and were stopped (their mailbox names' labels).
    failed_queries: tuple[str, ...] = attrs.field(default=(), kw_only=True)


@final
@attrs.frozen
class AggregateStats:
    """One aggregate's stored history: how many events, the last sequence, a snapshot or not."""

    aggregate_id: str
    event_count: int
    current_sequence: int
    has_snapshot: bool


@final
@attrs.frozen
class ExecuteResult:
    """What :meth:`EventSourcing.execute <trio_es.EventSourcing.execute>` returns.

    Attributes:
        aggregate_id: the aggregate the command ran on.
        sequence: the aggregate's sequence right after this command's events (its
            sequence before the command when it emitted none).
        global_position: the ``global_position`` of the command's last event, or
            ``None`` when it emitted none: pass it to
            :meth:`~trio_es.EventSourcing.wait_for_projection` to read your own write.
    """

    aggregate_id: str
    sequence: int
    global_position: int | None


@final
@attrs.frozen
class ProjectionStats:
    """How far one projection has got, as :meth:`~trio_es.EventSourcing.projection_stats` tells.

    Attributes:
        name: the projection's name.
        position: the ``global_position`` of the last event it processed (its checkpoint
            when it runs in another process).
        head: the ``global_position`` of the store's last event.
        lag: ``head - position``: how many positions it is behind (0 when caught up).
        status: ``"running"`` (active here, or waiting to take over from the process
            that is), ``"failed"`` (stopped after a batch kept failing; see the log) or
            ``"stopped"`` (the system is stopping).
        events_per_second: events processed per second over the last few seconds.
        active: whether this process is the one processing it (only one process is).
    """

    name: str
    position: int
    head: int
    lag: int
    status: str
    events_per_second: float
    active: bool = attrs.field(default=False, kw_only=True)


# Messages. The public functions build them; code that talks to the eventsourcing subject
# directly may build them too. ``reply_to`` subjects receive an ``outcome.Outcome``.


@final
@attrs.frozen
class ExecuteCommand:
    """Run ``command`` on the aggregate; nobody waits for the result."""

    aggregate_id: str
    command: Any
    metadata: Metadata = ()


@final
@attrs.frozen
class ExecuteCommandWithResponse:
    """Run ``command``; ``reply_to`` gets ``None`` once it is committed, or the error."""

    aggregate_id: str
    command: Any
    metadata: Metadata
    reply_to: Reply[None]


@final
@attrs.frozen
class ExecuteForResult:
    """Run ``command``; ``reply_to`` gets an :class:`ExecuteResult` once committed, or the error.

    What :meth:`EventSourcing.execute <trio_es.EventSourcing.execute>` sends; the message
    API's :class:`ExecuteCommandWithResponse` keeps answering ``None``.
    """

    aggregate_id: str
    command: Any
    metadata: Metadata
    reply_to: Reply[ExecuteResult]


@final
@attrs.frozen
class LoadAggregate:
    """Reply with the aggregate's current :class:`Aggregate`, or ``EntityNotFound``."""

    aggregate_id: str
    reply_to: Reply[Aggregate[Any]]


@final
@attrs.frozen
class LoadAllEvents:
    """Reply with all of the aggregate's events, in sequence order."""

    aggregate_id: str
    reply_to: Reply[list[EventEnvelope[Any]]]


@final
@attrs.frozen
class LoadEvents:
    """Reply with the aggregate's events whose sequence is greater than ``start_from``."""

    aggregate_id: str
    start_from: int
    reply_to: Reply[list[EventEnvelope[Any]]]


@final
@attrs.frozen
class LoadLatestSnapshot:
    """Reply with the aggregate's latest :class:`Snapshot`, or ``None``."""

    aggregate_id: str
    reply_to: Reply[Snapshot[Any] | None]


@final
@attrs.frozen
class GetSystemStats:
    """Reply with :class:`SystemStats`."""

    reply_to: Reply[SystemStats]


@final
@attrs.frozen
class GetAggregateStats:
    """Reply with the aggregate's :class:`AggregateStats`."""

    aggregate_id: str
    reply_to: Reply[AggregateStats]


@final
@attrs.frozen
class ProcessEvents(Generic[EventT]):
    """Sent to each query after a commit: the events just committed for one aggregate."""

    aggregate_id: str
    events: Sequence[EventEnvelope[EventT]]


#: Messages that one aggregate's task handles, in the order they were sent.
AggregateMessage: TypeAlias = (
    ExecuteCommand
    | ExecuteCommandWithResponse
    | ExecuteForResult
    | LoadAggregate
    | LoadAllEvents
    | LoadEvents
    | LoadLatestSnapshot
    | GetAggregateStats
)

#: Everything the eventsourcing subject accepts.
Message: TypeAlias = AggregateMessage | GetSystemStats

"""The message-passing API of the Gleam eventsourcing package, on Trio: functions that send.

They are synchronous and send to the eventsourcing subject.

None of them waits. Those that expect an answer return a reply subject; read it with
``await receive(subject, timeout)``, which returns the value or raises the error the
aggregate replied with. Arguments are checked before anything is sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from ._subject import Subject, new_reply
from ._types import (
    Aggregate,
    AggregateStats,
    EventEnvelope,
    ExecuteCommand,
    ExecuteCommandWithResponse,
    GetAggregateStats,
    GetSystemStats,
    LoadAggregate,
    LoadAllEvents,
    LoadEvents,
    LoadLatestSnapshot,
    Message,
    Reply,
    Snapshot,
    SystemStats,
    check_aggregate_id,
    metadata_tuple,
)
from ._validated import check_start_from

__all__ = [
    "aggregate_stats",
    "execute",
    "execute_with_metadata",
    "execute_with_response",
    "latest_snapshot",
    "load_aggregate",
    "load_events",
    "load_events_from",
    "system_stats",
]

T = TypeVar("T")


def _ask(es: Subject[Message], label: str, make: Callable[[Reply[T]], Message]) -> Reply[T]:
    reply: Reply[T] = new_reply(label)
    es.send(make(reply))
    return reply


def execute(es: Subject[Message], aggregate_id: str, command: Any) -> None:
    """Send ``command`` to the aggregate without waiting for, or hearing of, its result."""
    es.send(ExecuteCommand(check_aggregate_id(aggregate_id), command, ()))


def execute_with_metadata(
    es: Subject[Message], aggregate_id: str, command: Any, metadata: Iterable[tuple[str, str]]
) -> None:
    """Like :func:`execute`; ``metadata`` pairs are stored with every event the command makes."""
    es.send(ExecuteCommand(check_aggregate_id(aggregate_id), command, metadata_tuple(metadata)))


def execute_with_response(
    es: Subject[Message],
    aggregate_id: str,
    command: Any,
    metadata: Iterable[tuple[str, str]] = (),
) -> Reply[None]:
    """Send ``command``; the reply is ``None`` once its events are committed, or the error.

    ``receive`` raises the ``DomainError`` when the domain rejected the command.
    """
    aggregate_id = check_aggregate_id(aggregate_id)
    pairs = metadata_tuple(metadata)
    return _ask(
        es, "execute reply", lambda r: ExecuteCommandWithResponse(aggregate_id, command, pairs, r)
    )


def load_aggregate(es: Subject[Message], aggregate_id: str) -> Reply[Aggregate[Any]]:
    """Ask for the aggregate's current state; ``EntityNotFound`` if it has no events."""
    aggregate_id = check_aggregate_id(aggregate_id)
    return _ask(es, "load_aggregate reply", lambda r: LoadAggregate(aggregate_id, r))


def load_events(es: Subject[Message], aggregate_id: str) -> Reply[list[EventEnvelope[Any]]]:
    """Ask for all of the aggregate's events, in sequence order."""
    aggregate_id = check_aggregate_id(aggregate_id)
    return _ask(es, "load_events reply", lambda r: LoadAllEvents(aggregate_id, r))


def load_events_from(
    es: Subject[Message], aggregate_id: str, start_from: int
) -> Reply[list[EventEnvelope[Any]]]:
    """Ask for the aggregate's events with sequence greater than ``start_from`` (>= 0)."""
    aggregate_id = check_aggregate_id(aggregate_id)
    start = check_start_from(start_from)
    return _ask(es, "load_events reply", lambda r: LoadEvents(aggregate_id, start, r))


def latest_snapshot(es: Subject[Message], aggregate_id: str) -> Reply[Snapshot[Any] | None]:
    """Ask for the latest snapshot; ``None`` when snapshots are off or none exists yet."""
    aggregate_id = check_aggregate_id(aggregate_id)
    return _ask(es, "latest_snapshot reply", lambda r: LoadLatestSnapshot(aggregate_id, r))


def system_stats(es: Subject[Message]) -> Reply[SystemStats]:
    """Ask for the number of queries and of commands processed so far."""
    return _ask(es, "system_stats reply", GetSystemStats)


def aggregate_stats(es: Subject[Message], aggregate_id: str) -> Reply[AggregateStats]:
    """Ask for the aggregate's event count, current sequence and whether it has a snapshot."""
    aggregate_id = check_aggregate_id(aggregate_id)
    return _ask(es, "aggregate_stats reply", lambda r: GetAggregateStats(aggregate_id, r))

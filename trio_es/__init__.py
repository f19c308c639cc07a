"""trio_es: event sourcing for Trio.

Commands go to aggregates, each served by one supervised task that keeps its state
cached; committed events are kept in an append-only store and fed to read models
(queries). Modelled on the Gleam ``eventsourcing`` package.

Two ways in: the Gleam package's message API (``supervised``, ``execute``, ``receive`` ...)
and the awaiting facade ``open_eventsourcing``. Stores live in submodules
(``trio_es.memory_store``); supervision trees in ``trio_es.supervision``. The Gleam
package's spellings ``EventEnvelop``, ``MemoryStoreEventEnvelop`` and
``SerializedEventEnvelop`` are aliases, so that ported code imports unchanged.
"""

import inspect as _stdlib_inspect
import typing as _typing

from ._api import aggregate_stats as aggregate_stats
from ._api import execute as execute
from ._api import execute_with_metadata as execute_with_metadata
from ._api import execute_with_response as execute_with_response
from ._api import latest_snapshot as latest_snapshot
from ._api import load_aggregate as load_aggregate
from ._api import load_events as load_events
from ._api import load_events_from as load_events_from
from ._api import system_stats as system_stats
from ._errors import ActorTimeout as ActorTimeout
from ._errors import AggregateCrashed as AggregateCrashed
from ._errors import CheckpointMoved as CheckpointMoved
from ._errors import CommitOutcomeUnknown as CommitOutcomeUnknown
from ._errors import ConcurrencyConflict as ConcurrencyConflict
from ._errors import DomainError as DomainError
from ._errors import EntityNotFound as EntityNotFound
from ._errors import EventSourcingError as EventSourcingError
from ._errors import EventStoreError as EventStoreError
from ._errors import MailboxFull as MailboxFull
from ._errors import NonPositiveArgument as NonPositiveArgument
from ._errors import ProjectionFailed as ProjectionFailed
from ._errors import SystemStopped as SystemStopped
from ._errors import TransactionFailed as TransactionFailed
from ._errors import TransactionRolledBack as TransactionRolledBack
from ._errors import describe_error as describe_error
from ._facade import EventSourcing as EventSourcing
from ._facade import open_eventsourcing as open_eventsourcing
from ._projection import Projection as Projection
from ._runtime import Query as Query
from ._runtime import RuntimeOptions as RuntimeOptions
from ._runtime import supervised as supervised
from ._store import EventStore as EventStore
from ._subject import DEFAULT_CAPACITY as DEFAULT_CAPACITY
from ._subject import Name as Name
from ._subject import Subject as Subject
from ._subject import named_subject as named_subject
from ._subject import new_name as new_name
from ._subject import new_subject as new_subject
from ._subject import receive as receive
from ._subscription import Subscription as Subscription
from ._subscription import subscribe as subscribe
from ._supervisor import SupervisorGaveUp as SupervisorGaveUp
from ._types import Aggregate as Aggregate
from ._types import AggregateMessage as AggregateMessage
from ._types import AggregateStats as AggregateStats
from ._types import EventEnvelope as EventEnvelop
from ._types import EventEnvelope as EventEnvelope
from ._types import ExecuteCommand as ExecuteCommand
from ._types import ExecuteCommandWithResponse as ExecuteCommandWithResponse
from ._types import ExecuteResult as ExecuteResult
from ._types import GetAggregateStats as GetAggregateStats
from ._types import GetSystemStats as GetSystemStats
from ._types import LoadAggregate as LoadAggregate
from ._types import LoadAllEvents as LoadAllEvents
from ._types import LoadEvents as LoadEvents
from ._types import LoadLatestSnapshot as LoadLatestSnapshot
from ._types import MemoryStoreEventEnvelope as MemoryStoreEventEnvelop
from ._types import MemoryStoreEventEnvelope as MemoryStoreEventEnvelope
from ._types import Message as Message
from ._types import Metadata as Metadata
from ._types import ProcessEvents as ProcessEvents
from ._types import ProjectionStats as ProjectionStats
from ._types import Reply as Reply
from ._types import SerializedEventEnvelope as SerializedEventEnvelop
from ._types import SerializedEventEnvelope as SerializedEventEnvelope
from ._types import Snapshot as Snapshot
from ._types import SnapshotConfig as SnapshotConfig
from ._types import StoredEvent as StoredEvent
from ._types import SystemStats as SystemStats
from ._validated import Frequency as Frequency
from ._validated import Timeout as Timeout
from ._validated import frequency as frequency
from ._validated import timeout as timeout

__all__ = [
    "ActorTimeout",
    "Aggregate",
    "AggregateCrashed",
    "AggregateMessage",
    "AggregateStats",
    "CheckpointMoved",
    "CommitOutcomeUnknown",
    "ConcurrencyConflict",
    "DEFAULT_CAPACITY",
    "DomainError",
    "EntityNotFound",
    "EventEnvelop",
    "EventEnvelope",
    "EventSourcing",
    "EventSourcingError",
    "EventStore",
    "EventStoreError",
    "ExecuteCommand",
    "ExecuteCommandWithResponse",
    "ExecuteResult",
    "Frequency",
    "GetAggregateStats",
    "GetSystemStats",
    "LoadAggregate",
    "LoadAllEvents",
    "LoadEvents",
    "LoadLatestSnapshot",
    "MailboxFull",
    "MemoryStoreEventEnvelop",
    "MemoryStoreEventEnvelope",
    "Message",
    "Metadata",
    "Name",
    "NonPositiveArgument",
    "ProcessEvents",
    "Projection",
    "ProjectionFailed",
    "ProjectionStats",
    "Query",
    "Reply",
    "RuntimeOptions",
    "SerializedEventEnvelop",
    "SerializedEventEnvelope",
    "Snapshot",
    "SnapshotConfig",
    "StoredEvent",
    "Subject",
    "Subscription",
    "SupervisorGaveUp",
    "SystemStats",
    "SystemStopped",
    "Timeout",
    "TransactionFailed",
    "TransactionRolledBack",
    "aggregate_stats",
    "describe_error",
    "execute",
    "execute_with_metadata",
    "execute_with_response",
    "frequency",
    "latest_snapshot",
    "load_aggregate",
    "load_events",
    "load_events_from",
    "named_subject",
    "new_name",
    "new_subject",
    "open_eventsourcing",
    "receive",
    "subscribe",
    "supervised",
    "system_stats",
    "timeout",
]


def _claim_public_names(namespace: dict[str, object], names: list[str], module: str) -> None:
    """Make the classes and functions in ``names`` say they live in ``module``.

    Public names then show their public module in reprs, tracebacks and pickles, as Trio's do
    (``trio_es.DomainError``, not ``trio_es._errors.DomainError``); pickle finds them there.
    Only objects still naming a private module are changed, so a name re-exported by a public
    submodule keeps the module that claimed it first (``trio_es`` is always imported first).
    Unions and other aliases have no module of their own and are left alone.

    The private modules postpone annotations (``from __future__ import annotations``), and
    ``typing.get_type_hints`` (so cattrs, attrs.resolve_types ...) resolves those strings in
    the module an object names: they are resolved first, where they were written, so that
    moving the name breaks nothing.
    """
    for name in names:
        obj = namespace[name]
        if not (_stdlib_inspect.isclass(obj) or _stdlib_inspect.isfunction(obj)):
            continue
        parts = obj.__module__.split(".")
        if parts[0] == "trio_es" and any(part.startswith("_") for part in parts):
            _resolve_annotations(obj)
            obj.__module__ = module


def _resolve_annotations(obj: _typing.Any) -> None:
    """Replace ``obj``'s own string annotations by the objects they name, in place."""
    # The object's own dict, changed in place (inspect.get_annotations returns a copy).
    own = vars(obj).get("__annotations__") if _stdlib_inspect.isclass(obj) else None
    if own is None and not _stdlib_inspect.isclass(obj):
        own = getattr(obj, "__annotations__", None)
    if not own:
        return
    hints = _typing.get_type_hints(obj, include_extras=True)
    for key in list(own):
        if key in hints:
            own[key] = hints[key]


_claim_public_names(globals(), __all__, __name__)

__version__ = "0.1.0"

"""The public API: which names trio_es exports, and that they name their public module."""

from __future__ import annotations

import importlib
import inspect
import pickle
import sys
import traceback
import types
import typing

import pytest

import trio_es

# Update this list, deliberately, when a public name is added or removed.
EXPORTED = [
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

SUBMODULES = [
    "trio_es.memory_store",
    "trio_es.sqlite_store",
    "trio_es.postgres_store",
    "trio_es.serialization",
    "trio_es.supervision",
    "trio_es.testing",
]


def _has_own_module(obj: object) -> bool:
    return inspect.isclass(obj) or inspect.isfunction(obj)


def test_exported_names_are_pinned() -> None:
    """trio_es.__all__ is exactly the pinned, sorted list of public names."""
    assert sorted(EXPORTED) == EXPORTED
    assert trio_es.__all__ == EXPORTED


def test_every_public_attribute_is_in_all() -> None:
    """Every public attribute of trio_es (submodules aside) is listed in __all__, and exists."""
    public = {
        name
        for name, value in vars(trio_es).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(EXPORTED)


@pytest.mark.parametrize("name", [n for n in EXPORTED if _has_own_module(getattr(trio_es, n))])
def test_public_names_claim_the_package(name: str) -> None:
    """Each exported class and function says it lives in trio_es, not a private module."""
    assert getattr(trio_es, name).__module__ == "trio_es"


@pytest.mark.parametrize("module_name", SUBMODULES)
def test_submodule_names_claim_their_public_module(module_name: str) -> None:
    """A public submodule's own classes and functions name it; trio_es's own names stay there."""
    module = importlib.import_module(module_name)
    claimed = {}
    for name in module.__all__:
        obj = getattr(module, name)
        if _has_own_module(obj):
            claimed[name] = obj.__module__
    assert claimed, f"{module_name} exports no class or function"
    for name, owner in claimed.items():
        same_as_package = getattr(trio_es, name, None) is getattr(module, name)
        expected = "trio_es" if same_as_package else module_name
        assert owner == expected, name


def test_gleam_spellings_are_aliases() -> None:
    """The Gleam package's EventEnvelop spellings are the same objects as trio_es's names."""
    assert trio_es.EventEnvelop is trio_es.EventEnvelope
    assert trio_es.MemoryStoreEventEnvelop is trio_es.MemoryStoreEventEnvelope
    assert trio_es.SerializedEventEnvelop is trio_es.SerializedEventEnvelope


def test_reprs_name_the_public_module() -> None:
    """Reprs of public classes, functions and generic aliases show trio_es, not a private path."""
    assert repr(trio_es.DomainError) == "<class 'trio_es.DomainError'>"
    assert repr(type(trio_es.DomainError("x"))) == "<class 'trio_es.DomainError'>"
    assert "trio_es.MemoryStoreEventEnvelope" in repr(trio_es.EventEnvelope)
    assert "_types" not in repr(trio_es.EventEnvelope)
    assert repr(trio_es.Aggregate[int]) == "trio_es.Aggregate[int]"


def test_traceback_names_the_public_module() -> None:
    """A traceback's last line names trio_es.DomainError, as Trio's errors name trio."""
    try:
        raise trio_es.DomainError("x")
    except trio_es.DomainError:
        last = traceback.format_exc().strip().splitlines()[-1]
    assert last == "trio_es.DomainError: domain error: 'x'"


def test_public_errors_still_pickle() -> None:
    """Pickle finds the classes under their public module: errors and values round-trip."""
    error = pickle.loads(pickle.dumps(trio_es.DomainError("x")))
    assert type(error) is trio_es.DomainError
    assert error.error == "x"
    aggregate = trio_es.Aggregate("a", 1, 2)
    assert pickle.loads(pickle.dumps(aggregate)) == aggregate
    assert b"trio_es._" not in pickle.dumps(aggregate)
    assert "trio_es._errors" in sys.modules  # the private modules are still where code lives


@pytest.mark.parametrize(
    "module_name",
    [
        "trio_es",
        "trio_es.memory_store",
        "trio_es.sqlite_store",
        "trio_es.postgres_store",
        "trio_es.serialization",
        "trio_es.supervision",
        "trio_es.testing",
    ],
)
def test_type_hints_of_public_names_resolve(module_name: str) -> None:
    """get_type_hints works on every public class and function after the module move."""
    module = importlib.import_module(module_name)
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            typing.get_type_hints(obj)

"""A small domain for runtime tests: an aggregate is the tuple of items appended to it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

import trio_es
from trio_es.memory_store import MemoryStore


@attrs.frozen
class Append:
    """Append each item, one event per item (so one command may make several events)."""

    items: tuple[str, ...]


@attrs.frozen
class Explode:
    """A bug in handle: raises RuntimeError."""


@attrs.frozen
class Refuse:
    """Rejected by the domain."""


@attrs.frozen
class SlowAppend:
    """Append one item after sleeping (handle is async)."""

    item: str
    seconds: float


@attrs.frozen
class Appended:
    item: str


class Refused(trio_es.DomainError):
    """The domain said no."""


def handle(entity: tuple[str, ...], command: Any) -> list[Appended]:
    match command:
        case Append(items):
            return [Appended(item) for item in items]
        case Explode():
            raise RuntimeError("bug in handle")
        case Refuse():
            raise Refused("no")
    raise TypeError(command)


async def async_handle(entity: tuple[str, ...], command: Any) -> list[Appended]:
    if isinstance(command, SlowAppend):
        await trio.sleep(command.seconds)
        return [Appended(command.item)]
    return handle(entity, command)


def apply(entity: tuple[str, ...], event: Appended) -> tuple[str, ...]:
    if event.item == "poison":
        raise RuntimeError("bug in apply")
    return (*entity, event.item)


def replay(
    events: list[trio_es.EventEnvelope[Any]], start: tuple[str, ...] = ()
) -> tuple[str, ...]:
    entity = start
    for envelope in events:
        entity = apply(entity, envelope.payload)
    return entity


@asynccontextmanager
async def open_counter(
    store: trio_es.EventStore[Any, Any, Any] | None = None, **kwargs: Any
) -> AsyncIterator[trio_es.EventSourcing[Any, Appended, tuple[str, ...]]]:
    kwargs.setdefault("handle", handle)
    async with trio_es.open_eventsourcing(
        eventstore=MemoryStore() if store is None else store,
        apply=apply,
        empty_state=(),
        **kwargs,
    ) as es:
        yield es

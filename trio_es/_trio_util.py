"""Small Trio helpers: the parts of trio-util that trio_es uses, typed, and a nursery for
background tasks.

trio-util has no type information, so its objects would be ``Any`` everywhere; this
module gives them narrow protocols and is the only place that imports trio-util. Only
its primitives are used, never its ``defer_to_*`` helpers (broken on Trio 0.24+).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Generic, Protocol, TypeVar, cast

import trio
import trio_util  # type: ignore[import-untyped]

__all__ = ["AsyncValue", "async_value", "background", "lone", "periodic"]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class AsyncValue(Protocol, Generic[T]):
    """A value that tasks can wait on: ``trio_util.AsyncValue``.

    Setting :attr:`value` never blocks and wakes the tasks whose condition now holds.
    """

    value: T

    async def wait_value(self, predicate: Callable[[T], bool], /) -> T:
        """Return the value once ``predicate(value)`` holds (at once if it holds now)."""
        ...


def async_value(initial: T) -> AsyncValue[T]:
    """A new :class:`AsyncValue` holding ``initial``."""
    return cast(AsyncValue[T], trio_util.AsyncValue(initial))


def periodic(period: float) -> AsyncGenerator[tuple[float, float | None], None]:
    """``trio_util.periodic``: iterate every ``period`` seconds (Trio's clock).

    Yields ``(elapsed, delta)``, the first time at once; the loop body's time counts
    towards the period. An async generator: wrap it in ``contextlib.aclosing`` when the
    loop may be left early.
    """
    iterator: Any = trio_util.periodic(period)
    return cast(AsyncGenerator[tuple[float, float | None], None], iterator)


@asynccontextmanager
async def background() -> AsyncIterator[trio.Nursery]:
    """A nursery for helper tasks that never raise, cancelled when the block exits.

    For a context manager that runs tasks beside its caller's block: an exception of the
    block comes out as itself, not wrapped in an ``ExceptionGroup`` (the helpers raise
    nothing, so the group holds only the block's exception, or ``Cancelled``).
    """
    error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            try:
                yield nursery
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        error = lone(group)
    if error is not None:
        raise error


def lone(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception a nursery really raised (however nested), else the group itself.

    Nurseries wrap everything in a group (strict exception groups). A lone exception is
    re-raised as itself, so that a caller sees e.g. ``KeyboardInterrupt`` rather than a
    group. A ``Cancelled`` next to another exception is redundant: the other exception
    unwinds the cancelled scope anyway. Anything else keeps its group.
    """
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    if len(leaves) == 1:
        return leaves[0]
    real = [exc for exc in leaves if not isinstance(exc, trio.Cancelled)]
    return real[0] if len(real) == 1 else group

"""The parts of trio-util that trio_es uses, with the types trio-util does not ship.

trio-util has no type information, so its objects would be ``Any`` everywhere; this
module gives them narrow protocols and is the only place that imports trio-util. Only
its primitives are used, never its ``defer_to_*`` helpers (broken on Trio 0.24+).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, Protocol, TypeVar, cast

import trio_util  # type: ignore[import-untyped]

__all__ = ["AsyncValue", "async_value", "periodic"]

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


def periodic(period: float) -> AsyncIterator[tuple[float, float | None]]:
    """``trio_util.periodic``: iterate every ``period`` seconds (Trio's clock).

    Yields ``(elapsed, delta)``; the loop body's time counts towards the period.
    """
    iterator: Any = trio_util.periodic(period)
    return cast(AsyncIterator[tuple[float, float | None]], iterator)

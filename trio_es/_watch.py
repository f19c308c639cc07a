"""What the stores share for subscribers and projections: the in-process head and its watch.

Each store object keeps an :func:`~trio_es._trio_util.async_value` holding the highest
global position committed through it, raised right after each commit. A subscriber's
:class:`HeadWatch` waits on it, so a commit in this process wakes it at once; commits
nobody announces (another process's, on SQLite) are found by waking up every
``poll_interval`` seconds and reading.
"""

from __future__ import annotations

from typing import final

import attrs
import trio

from ._trio_util import AsyncValue
from ._validated import check_int

__all__ = ["FnFailed", "HeadWatch", "check_projection_name", "raise_head"]


def raise_head(head: AsyncValue[int], position: int) -> None:
    """Move ``head`` up to ``position`` (never down), waking the watches it satisfies.

    Commits of a group commit may be answered out of order, and a commit found already
    stored reports old positions: neither may move the head back.
    """
    if position > head.value:
        head.value = position


@final
@attrs.frozen
class HeadWatch:
    """A :class:`~trio_es._store.Watch` on a store object's in-process head.

    Attributes:
        head: the highest global position committed through the store object.
        poll_interval: the longest :meth:`wait` waits without a commit, in seconds.
    """

    head: AsyncValue[int]
    poll_interval: float

    async def wait(self, after: int) -> None:
        """Return once this store object committed beyond ``after``, or after the poll interval.

        Returns at once (after a checkpoint) when it already has. A return without new
        events is allowed: the subscriber reads and waits again.

        Raises:
            TypeError: ``after`` is not an int.
            NonPositiveArgument: ``after`` is negative.
        """
        after = check_int("after", after, minimum=0)
        with trio.move_on_after(self.poll_interval):
            await self.head.wait_value(lambda value: value > after)


def check_projection_name(name: object) -> str:
    """Return ``name`` if it can name a projection (a non-empty str), else raise.

    Raises:
        TypeError: ``name`` is not a str.
        ValueError: ``name`` is empty.
    """
    if not isinstance(name, str):
        raise TypeError(f"a projection name must be a str (got {name!r:.80}); e.g. 'balances'")
    if not name:
        raise ValueError("a projection name must be a non-empty str (got ''); e.g. 'balances'")
    return name


class FnFailed(Exception):
    """Carries the exception of a projection's ``fn`` out of a lease's worker thread.

    A lease translates its driver's errors into trio_es errors; wrapped in this, an
    error that ``fn`` raised (a driver error included) gets past that untouched, and the
    lease re-raises ``error`` itself.
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error

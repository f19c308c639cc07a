"""Validated value types: a ``Timeout`` or ``Frequency`` that exists is positive."""

from __future__ import annotations

from typing import final

import attrs

from ._errors import NonPositiveArgument

__all__ = ["Frequency", "Timeout", "check_start_from", "frequency", "positive_int", "timeout"]


def positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is a positive ``int``, else raise.

    Raises:
        TypeError: ``value`` is not an ``int`` (``bool`` is refused too: ``True`` is no count).
        NonPositiveArgument: ``value`` is zero or negative.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{name} must be a positive int (got {value!r} of type {type(value).__name__})"
        )
    if value <= 0:
        raise NonPositiveArgument(name=name, value=value)
    return value


def check_start_from(start_from: object) -> int:
    """Return ``start_from`` if it is an int >= 0, else raise.

    Raises:
        TypeError: ``start_from`` is not an ``int``.
        NonPositiveArgument: ``start_from`` is negative.
    """
    if isinstance(start_from, bool) or not isinstance(start_from, int):
        raise TypeError(f"start_from must be an int >= 0 (got {start_from!r})")
    if start_from < 0:
        raise NonPositiveArgument(name="start_from", value=start_from, requirement="an int >= 0")
    return start_from


def _check_timeout(_: object, __: object, value: int) -> None:
    positive_int("timeout", value)


def _check_frequency(_: object, __: object, value: int) -> None:
    positive_int("frequency", value)


@final
@attrs.frozen
class Timeout:
    """A positive duration in milliseconds; build it with :func:`timeout`."""

    milliseconds: int = attrs.field(validator=_check_timeout)

    @property
    def seconds(self) -> float:
        """The same duration in seconds, as Trio's timeouts take it."""
        return self.milliseconds / 1000


@final
@attrs.frozen
class Frequency:
    """A positive count, as in "snapshot every n events"; build it with :func:`frequency`."""

    n: int = attrs.field(validator=_check_frequency)


def timeout(ms: int) -> Timeout:
    """Validate a timeout of ``ms`` milliseconds.

    Raises:
        TypeError: ``ms`` is not an int.
        NonPositiveArgument: ``ms`` is zero or negative.
    """
    return Timeout(ms)


def frequency(n: int) -> Frequency:
    """Validate a frequency of one in ``n``.

    Raises:
        TypeError: ``n`` is not an int.
        NonPositiveArgument: ``n`` is zero or negative.
    """
    return Frequency(n)

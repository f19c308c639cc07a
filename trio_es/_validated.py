"""Argument validation in one place, and validated value types.

A ``Timeout`` or ``Frequency`` that exists is positive. Every check raises the same kind
of exception for the same kind of bad value: a wrong type is a ``TypeError``, a number out
of range is :class:`~trio_es.NonPositiveArgument` (also a ``ValueError``).
"""

from __future__ import annotations

import math
from typing import final

import attrs

from ._errors import NonPositiveArgument

__all__ = [
    "Frequency",
    "Timeout",
    "check_int",
    "check_seconds",
    "check_start_from",
    "frequency",
    "positive_int",
    "timeout",
]


def check_int(name: str, value: object, *, minimum: int, hint: str = "") -> int:
    """Return ``value`` if it is an ``int >= minimum``, else raise.

    Every count, size and position that trio_es takes is checked here, so that the same
    kind of bad value gets the same exception everywhere: a wrong type is a ``TypeError``,
    an int out of range is :class:`NonPositiveArgument` (also a ``ValueError``).

    Args:
        hint: appended to the message after ``"; "``, e.g. ``"4 suits most uses"``.

    Raises:
        TypeError: ``value`` is not an ``int`` (``bool`` is refused too).
        NonPositiveArgument: ``value < minimum``.
    """
    requirement = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{name} must be {requirement} (got {value!r})" + (f"; {hint}" if hint else "")
        )
    if value < minimum:
        raise NonPositiveArgument(name=name, value=value, requirement=requirement, hint=hint)
    return value


def check_seconds(name: str, value: object, *, allow_zero: bool = False, hint: str = "") -> float:
    """Return ``value`` if it is a number of seconds ``> 0`` (or ``>= 0``), else raise.

    Raises:
        TypeError: ``value`` is not an ``int`` or ``float`` (``bool`` is refused too).
        NonPositiveArgument: ``value`` is negative, zero (unless ``allow_zero``) or NaN.
    """
    requirement = "a number of seconds >= 0" if allow_zero else "a positive number of seconds"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"{name} must be {requirement} (got {value!r})" + (f"; {hint}" if hint else "")
        )
    if math.isnan(value) or value < 0 or (value == 0 and not allow_zero):
        raise NonPositiveArgument(name=name, value=value, requirement=requirement, hint=hint)
    return value


def positive_int(name: str, value: object) -> int:
    """Return ``value`` if it is a positive ``int``, else raise.

    Raises:
        TypeError: ``value`` is not an ``int`` (``bool`` is refused too: ``True`` is no count).
        NonPositiveArgument: ``value`` is zero or negative.
    """
    return check_int(name, value, minimum=1)


def check_start_from(start_from: object) -> int:
    """Return ``start_from`` if it is an int >= 0, else raise.

    Raises:
        TypeError: ``start_from`` is not an ``int``.
        NonPositiveArgument: ``start_from`` is negative.
    """
    return check_int("start_from", start_from, minimum=0)


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

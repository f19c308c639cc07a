"""Validated constructors: timeout(ms) and frequency(n)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_es import Frequency, NonPositiveArgument, Timeout, frequency, timeout


@given(st.integers(min_value=1, max_value=10**12))
def test_timeout_accepts_positive_ints(ms: int) -> None:
    """Any positive int of milliseconds is a Timeout exposing milliseconds and seconds."""
    t = timeout(ms)
    assert isinstance(t, Timeout)
    assert t.milliseconds == ms
    assert t.seconds == ms / 1000


@given(st.integers(min_value=1, max_value=10**12))
def test_frequency_accepts_positive_ints(n: int) -> None:
    """Any positive int is a Frequency exposing n."""
    assert frequency(n) == Frequency(n)
    assert frequency(n).n == n


@pytest.mark.parametrize("make", [timeout, frequency])
@pytest.mark.parametrize("bad", [0, -1, -(10**9)])
def test_zero_and_negatives_raise_non_positive_argument(make: Any, bad: int) -> None:
    """0 and negatives raise NonPositiveArgument naming the argument and the bad value."""
    with pytest.raises(NonPositiveArgument) as info:
        make(bad)
    assert info.value.value == bad
    assert str(bad) in str(info.value)
    assert "positive int" in str(info.value)


@pytest.mark.parametrize("make", [timeout, frequency])
@pytest.mark.parametrize("bad", [True, False, 1.0, 2.5, "5", None, [1]])
def test_non_ints_raise_type_error(make: Any, bad: object) -> None:
    """Non-ints, bool included, raise TypeError that shows the bad value."""
    with pytest.raises(TypeError, match="must be a positive int") as info:
        make(bad)
    assert repr(bad) in str(info.value)


def test_direct_construction_is_validated_too() -> None:
    """Timeout(0) and Frequency(-1) cannot bypass validation."""
    with pytest.raises(NonPositiveArgument):
        Timeout(0)
    with pytest.raises(NonPositiveArgument):
        Frequency(-1)


def test_error_message_matches_house_style() -> None:
    """The message is one sentence that shows the bad value."""
    with pytest.raises(NonPositiveArgument) as info:
        frequency(0)
    assert str(info.value) == "frequency must be a positive int (got 0)"

"""Errors: fields, readable messages, describe_error, hierarchy."""

from __future__ import annotations

import pytest

from trio_es import (
    ActorTimeout,
    AggregateCrashed,
    ConcurrencyConflict,
    DomainError,
    EntityNotFound,
    EventSourcingError,
    EventStoreError,
    MailboxFull,
    NonPositiveArgument,
    TransactionFailed,
    TransactionRolledBack,
    describe_error,
)


class Overdrawn(DomainError):
    """A domain error subclass with no value."""


def test_every_error_is_an_event_sourcing_error() -> None:
    """One except clause catches all of trio_es's errors."""
    errors: list[Exception] = [
        DomainError("x"),
        EventStoreError("disk full"),
        NonPositiveArgument(),
        EntityNotFound(),
        TransactionFailed(),
        TransactionRolledBack(),
        ActorTimeout("receive", 5),
        MailboxFull(mailbox="m", capacity=1),
        ConcurrencyConflict(aggregate_id="a", expected_sequence=1, actual_sequence=2),
        AggregateCrashed(aggregate_id="a", restarts=3),
    ]
    for error in errors:
        assert isinstance(error, EventSourcingError)
        assert str(error)
        assert describe_error(error) == str(error)


def test_seed_errors_without_fields_construct_with_no_arguments() -> None:
    """Errors without fields in the seed construct with no arguments."""
    assert str(EntityNotFound()) == "entity not found"
    assert str(TransactionFailed()) == "transaction failed"
    assert str(TransactionRolledBack()) == "transaction rolled back"
    assert str(NonPositiveArgument()) == "argument must be positive"


def test_optional_context_shows_in_the_message() -> None:
    """Keyword context (which aggregate) makes the message more useful."""
    error = EntityNotFound(aggregate_id="acc-1")
    assert error.aggregate_id == "acc-1"
    assert "acc-1" in str(error)
    assert "acc-9" in str(EventStoreError("boom", aggregate_id="acc-9"))


def test_domain_error_carries_the_domain_value() -> None:
    """DomainError(value).error is the value; a bare subclass's .error is itself."""
    assert DomainError({"code": 7}).error == {"code": 7}
    bare = Overdrawn()
    assert bare.error is bare
    assert "Overdrawn" in str(bare)
    assert isinstance(bare, DomainError)


def test_actor_timeout_fields_and_message() -> None:
    """ActorTimeout keeps operation and timeout_ms and says both."""
    error = ActorTimeout("receive", 250)
    assert (error.operation, error.timeout_ms) == ("receive", 250)
    assert str(error) == "actor timeout during receive after 250 ms"


def test_event_store_error_keeps_its_message() -> None:
    """EventStoreError(message).message is the message."""
    assert EventStoreError("disk full").message == "disk full"
    assert "disk full" in describe_error(EventStoreError("disk full"))


def test_concurrency_conflict_is_a_retryable_transaction_failure() -> None:
    """A conflict is a TransactionFailed, so the runtime retries it; it names both sequences."""
    error = ConcurrencyConflict(aggregate_id="a", expected_sequence=3, actual_sequence=5)
    assert isinstance(error, TransactionFailed)
    assert "expected stored sequence 3, found 5" in str(error)


def test_non_positive_argument_is_a_value_error() -> None:
    """Generic argument checking code catches NonPositiveArgument as ValueError."""
    with pytest.raises(ValueError, match="start_from must be an int >= 0"):
        raise NonPositiveArgument(name="start_from", value=-1, requirement="an int >= 0")


def test_describe_error_handles_foreign_exceptions() -> None:
    """describe_error works on any exception, naming its type."""
    assert describe_error(KeyError("k")) == "KeyError: 'k'"

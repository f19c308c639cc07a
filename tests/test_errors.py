"""Errors: fields, readable messages, describe_error, hierarchy."""

from __future__ import annotations

import pickle
import re

import pytest

import trio_es
from trio_es import (
    ActorTimeout,
    AggregateCrashed,
    CheckpointMoved,
    CommitOutcomeUnknown,
    ConcurrencyConflict,
    DomainError,
    EntityNotFound,
    EventSourcingError,
    EventStoreError,
    MailboxFull,
    NonPositiveArgument,
    ProjectionFailed,
    SupervisorGaveUp,
    SystemStopped,
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


def crashed_with(cause: BaseException) -> AggregateCrashed:
    error = AggregateCrashed(aggregate_id="acc-1", restarts=3)
    error.__cause__ = cause
    return error


class Unprintable(Exception):
    """An exception whose ``str()`` itself fails."""

    def __str__(self) -> str:
        raise RuntimeError("no str for you")


#: At least one instance of every error class trio_es exports, with and without context,
#: plus foreign exceptions; multi-line texts check that descriptions stay on one line.
SAMPLES: list[BaseException] = [
    ActorTimeout("receive", 250),
    AggregateCrashed(aggregate_id="acc-1", restarts=3),
    crashed_with(RuntimeError("bug in handle\nsecond line")),
    CommitOutcomeUnknown("the connection was lost after COMMIT"),
    CommitOutcomeUnknown("the connection was lost after COMMIT", aggregate_id="acc-1"),
    ConcurrencyConflict(aggregate_id="acc-1", expected_sequence=3, actual_sequence=5),
    CheckpointMoved(name="balances", expected=40, found=0),
    ProjectionFailed("balances", 17, "its handler failed 6 times in a row"),
    DomainError("x"),
    DomainError(),
    DomainError({"code": 7}),
    Overdrawn(),
    Overdrawn(500),
    EntityNotFound(),
    EntityNotFound(aggregate_id="acc-1"),
    EventSourcingError(),
    EventSourcingError("something went wrong"),
    EventStoreError("disk full"),
    EventStoreError("line one\nline two", aggregate_id="acc-1"),
    EventStoreError(""),
    MailboxFull(mailbox="orders", capacity=3),
    NonPositiveArgument(),
    NonPositiveArgument(name="start_from", value=-1, requirement="an int >= 0"),
    SupervisorGaveUp("root", 3, 5.0, "worker"),
    SupervisorGaveUp("root", 0, 5.0),
    SystemStopped("execute"),
    TransactionFailed(),
    TransactionFailed("database is locked", aggregate_id="acc-1"),
    TransactionRolledBack(),
    TransactionRolledBack("deadlock"),
    KeyError("k"),
    ValueError(),
    RuntimeError("first line\r\n  second line\n"),
    Unprintable(),
    ExceptionGroup("two failures", [ValueError("a"), KeyError("b")]),
    KeyboardInterrupt(),
]


def kind_words(error: BaseException) -> str:
    """``TransactionFailed`` -> ``transaction failed``."""
    return re.sub(r"(?<!^)(?=[A-Z])", " ", type(error).__name__).lower()


def test_the_samples_cover_every_exported_error_class() -> None:
    """Every error class trio_es exports has a sample in the describe_error test."""
    exported = {
        value
        for value in vars(trio_es).values()
        if isinstance(value, type) and issubclass(value, BaseException)
    }
    assert exported
    assert exported <= {type(error) for error in SAMPLES}


@pytest.mark.parametrize("error", SAMPLES, ids=lambda error: f"{type(error).__name__}")
def test_describe_error_is_one_line_type_colon_message(error: BaseException) -> None:
    """describe_error gives one line, 'Type: message', for every error, never an empty message."""
    text = describe_error(error)
    assert text.splitlines() == [text], "more than one line"
    kind, colon, message = text.partition(": ")
    assert (kind, colon) == (type(error).__name__, ": ")
    assert message.strip() == message
    assert message
    # The message does not say the type again ("TransactionFailed: transaction failed: x").
    assert not message.lower().startswith(f"{kind_words(error)}:")
    assert not message.startswith(f"{type(error).__name__}:")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            TransactionFailed("busy", aggregate_id="acc-1"),
            "TransactionFailed: busy (aggregate 'acc-1')",
        ),
        (TransactionFailed(), "TransactionFailed: the transaction failed"),
        (EventStoreError("disk full"), "EventStoreError: disk full"),
        (Overdrawn(500), "Overdrawn: 500"),
        (Overdrawn(), "Overdrawn: the command was rejected"),
        (DomainError({"code": 7}), "DomainError: {'code': 7}"),
        (EntityNotFound(aggregate_id="acc-1"), "EntityNotFound: aggregate 'acc-1' has no events"),
        (ActorTimeout("receive", 250), "ActorTimeout: no reply during receive within 250 ms"),
        (
            ConcurrencyConflict(aggregate_id="a", expected_sequence=3, actual_sequence=5),
            "ConcurrencyConflict: expected stored sequence 3, found 5 (aggregate 'a')",
        ),
        (ValueError(), "ValueError: (no message)"),
        (RuntimeError("first line\n  second line"), "RuntimeError: first line second line"),
        (Unprintable(), "Unprintable: (str() failed)"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else "",
)
def test_describe_error_examples(error: BaseException, expected: str) -> None:
    """describe_error's exact text for typical errors, trio_es's and foreign ones."""
    assert describe_error(error) == expected


def test_describe_error_keeps_a_domain_error_override() -> None:
    """An error's own describe() is used, kept on one line."""

    class Custom(DomainError):
        def describe(self) -> str:
            return "Custom: over\ntwo lines"

    assert describe_error(Custom()) == "Custom: over two lines"


def test_describe_error_survives_a_broken_describe_or_repr() -> None:
    """A describe() or a domain value's repr() that raises still gives 'Type: message'."""

    class Broken(DomainError):
        def describe(self) -> str:
            raise RuntimeError("bug in describe")

    class Unrepresentable:
        def __repr__(self) -> str:
            raise RuntimeError("bug in repr")

    assert describe_error(Broken(5)).startswith("Broken: ")  # the generic form, from str()
    assert describe_error(DomainError(Unrepresentable())) == "DomainError: (repr() failed)"


def test_a_bare_domain_error_does_not_repeat_itself() -> None:
    """str(DomainError()) says 'domain error' once."""
    assert str(DomainError()) == "domain error"
    assert str(Overdrawn()) == "domain error: Overdrawn"


@pytest.mark.parametrize(
    "error",
    [sample for sample in SAMPLES if isinstance(sample, EventSourcingError)],
    ids=lambda e: type(e).__name__,
)
def test_every_error_survives_pickling(error: BaseException) -> None:
    """Each trio_es error pickles and unpickles to the same type, message and attributes."""
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert vars(copy).keys() == vars(error).keys()

"""The errors trio_es raises, modelled on the Gleam eventsourcing package's
``EventSourcingError`` variants.

Every error is an :class:`EventSourcingError`, so ``except EventSourcingError`` catches all
of them. Each keeps the Gleam variant's fields as attributes; extra context (which aggregate, which
value) is optional keyword data that makes ``str()`` more useful without changing the type.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, final

__all__ = [
    "ActorTimeout",
    "AggregateCrashed",
    "CheckpointMoved",
    "CommitOutcomeUnknown",
    "ConcurrencyConflict",
    "DomainError",
    "EntityNotFound",
    "EventSourcingError",
    "EventStoreError",
    "MailboxFull",
    "NonPositiveArgument",
    "ProjectionFailed",
    "SystemStopped",
    "TransactionFailed",
    "TransactionRolledBack",
    "describe_error",
]


def _restore(
    cls: type[BaseException], args: tuple[Any, ...], cause: BaseException | None
) -> BaseException:
    """Unpickle an error without calling its ``__init__`` (see ``__reduce__``)."""
    error = cls.__new__(cls, *args)
    error.args = args
    error.__cause__ = cause
    return error


def _about(aggregate_id: str | None) -> str:
    return "" if aggregate_id is None else f" (aggregate {aggregate_id!r})"


class EventSourcingError(Exception):
    """Base class of every error that trio_es raises or replies with.

    ``str()`` is a sentence that stands alone (it names what went wrong, for logs that do
    not show the type); :meth:`describe` is the one line :func:`describe_error` gives.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        # Many errors take keyword-only arguments, which the default pickling (calling
        # the class with ``args``) cannot pass: rebuild from the attributes instead.
        # The state comes third, applied after the error is made, so an attribute that
        # refers to the error itself (a bare DomainError's ``error``) pickles too.
        return (_restore, (type(self), self.args, self.__cause__), dict(self.__dict__))

    def describe(self) -> str:
        """A one-line description, ``TypeName: message``, as :func:`describe_error` gives.

        Subclasses whose ``str()`` starts by naming their kind ("transaction failed: ...")
        override it, so that the message does not say the type twice.
        """
        return f"{type(self).__name__}: {_message(self)}"


class DomainError(EventSourcingError):
    """A command was rejected by the domain: a normal outcome, not a bug.

    ``handle`` raises it (or a subclass) to refuse a command. Nothing is committed, the
    aggregate keeps running, and the caller receives this exception.

    Args:
        error: the domain's own error value, kept as ``.error``. Subclasses that need no
            value may leave it out; ``.error`` is then the exception itself.
    """

    error: object

    def __init__(self, error: object = None) -> None:
        super().__init__(error)
        self.error = self if error is None else error

    def __str__(self) -> str:
        kind = "domain error" if type(self) is DomainError else type(self).__name__
        if self.error is self:
            return "domain error" if type(self) is DomainError else f"domain error: {kind}"
        return f"{kind}: {self.error!r}"

    def describe(self) -> str:
        """``Overdrawn: 500`` (the value's repr), or ``Overdrawn: the command was rejected``."""
        what = "the command was rejected" if self.error is self else _safe(repr, self.error)
        return f"{type(self).__name__}: {what}"


class EventStoreError(EventSourcingError):
    """The event store failed or refused an operation; ``message`` says why."""

    message: str
    aggregate_id: str | None

    def __init__(self, message: str, *, aggregate_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.aggregate_id = aggregate_id

    def __str__(self) -> str:
        return f"event store error: {self.message}{_about(self.aggregate_id)}"

    def describe(self) -> str:
        """``EventStoreError: disk full (aggregate 'acc-1')``."""
        message = self.message or "the event store failed"
        return f"{type(self).__name__}: {message}{_about(self.aggregate_id)}"


@final
class NonPositiveArgument(EventSourcingError, ValueError):
    """An argument that must be positive (or non-negative) was not.

    Also a ``ValueError``, so generic argument checking code catches it.
    """

    name: str | None
    value: object
    requirement: str
    hint: str

    def __init__(
        self,
        *,
        name: str | None = None,
        value: object = None,
        requirement: str = "a positive int",
        hint: str = "",
    ) -> None:
        super().__init__(name, value)
        self.name = name
        self.value = value
        self.requirement = requirement
        self.hint = hint

    def __str__(self) -> str:
        if self.name is None:
            return "argument must be positive"
        hint = f"; {self.hint}" if self.hint else ""
        return f"{self.name} must be {self.requirement} (got {self.value!r}){hint}"


@final
class EntityNotFound(EventSourcingError):
    """The aggregate has no events, so there is no entity to load."""

    aggregate_id: str | None

    def __init__(self, *, aggregate_id: str | None = None) -> None:
        super().__init__(aggregate_id)
        self.aggregate_id = aggregate_id

    def __str__(self) -> str:
        return f"entity not found{_about(self.aggregate_id)}"

    def describe(self) -> str:
        """``EntityNotFound: aggregate 'acc-1' has no events``."""
        which = "the aggregate" if self.aggregate_id is None else f"aggregate {self.aggregate_id!r}"
        return f"{type(self).__name__}: {which} has no events"


class TransactionFailed(EventSourcingError):
    """A store transaction failed in a way that is safe to retry.

    The aggregate task reloads its state and retries the command a bounded number of
    times before it replies with this error.
    """

    reason: str | None
    aggregate_id: str | None

    def __init__(self, reason: str | None = None, *, aggregate_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.aggregate_id = aggregate_id

    def __str__(self) -> str:
        why = "" if self.reason is None else f": {self.reason}"
        return f"transaction failed{why}{_about(self.aggregate_id)}"

    def describe(self) -> str:
        """``TransactionFailed: database is locked (aggregate 'acc-1')``."""
        reason = self.reason or "the transaction failed"
        return f"{type(self).__name__}: {reason}{_about(self.aggregate_id)}"


@final
class ConcurrencyConflict(TransactionFailed):
    """Optimistic concurrency: another writer committed to the aggregate first.

    The store refused to write because the stored sequence was not the one the command
    was decided on. Like any :class:`TransactionFailed` it is retried after a reload.
    """

    expected_sequence: int
    actual_sequence: int

    def __init__(self, *, aggregate_id: str, expected_sequence: int, actual_sequence: int) -> None:
        super().__init__(
            f"expected stored sequence {expected_sequence}, found {actual_sequence}",
            aggregate_id=aggregate_id,
        )
        self.expected_sequence = expected_sequence
        self.actual_sequence = actual_sequence

    def __str__(self) -> str:
        return (
            f"concurrency conflict on aggregate {self.aggregate_id!r}: expected stored "
            f"sequence {self.expected_sequence}, found {self.actual_sequence}; reload and retry"
        )


@final
class CommitOutcomeUnknown(EventStoreError):
    """A commit was sent but its outcome could not be learned: it may or may not be stored.

    Raised when the connection to the database was lost after the commit was sent and
    the store could not find out afterwards whether it landed (the PostgreSQL store looks
    the commit's event ids up on a fresh connection first, and answers for certain when it
    can), or when SQLite's COMMIT failed in a way that may leave it written (an I/O error
    while syncing). It is never retried automatically, since a retry could store the command twice:
    read the aggregate (``load_events``) to learn what happened, then decide.
    """

    def __init__(self, message: str, *, aggregate_id: str | None = None) -> None:
        super().__init__(message, aggregate_id=aggregate_id)

    def __str__(self) -> str:
        return f"commit outcome unknown: {self._details()}"

    def describe(self) -> str:
        """``CommitOutcomeUnknown: <what happened>; it may or may not be stored, ...``."""
        return f"{type(self).__name__}: {self._details()}"

    def _details(self) -> str:
        return (
            f"{self.message or 'the commit was sent'}{_about(self.aggregate_id)}; it may or "
            "may not be stored, so load the aggregate's events before retrying"
        )


@final
class CheckpointMoved(EventStoreError):
    """A projection's stored checkpoint was not where its active instance left it.

    Only a rebuild (which resets the checkpoint to 0) moves it from elsewhere; the
    projection restarts from the stored checkpoint, keeping nothing of the batch.
    """

    name: str
    expected: int
    found: int | None

    def __init__(self, *, name: str, expected: int, found: int | None) -> None:
        super().__init__(
            f"the checkpoint of projection {name!r} is at {found} where it should be at "
            f"{expected} (reset by a rebuild?); the projection restarts from the stored "
            "checkpoint"
        )
        self.name, self.expected, self.found = name, expected, found


@final
class ProjectionFailed(EventSourcingError):
    """A projection stopped because one batch kept failing, or is not running.

    The events from ``position + 1`` on were not processed; fix the handler (or the
    data) and restart the system, or rebuild the projection. Raised by
    :meth:`~trio_es.EventSourcing.wait_for_projection` instead of waiting forever.
    """

    name: str
    position: int
    reason: str

    def __init__(self, name: str, position: int, reason: str) -> None:
        super().__init__(name, position, reason)
        self.name, self.position, self.reason = name, position, reason

    def __str__(self) -> str:
        return f"projection {self.name!r} stopped at position {self.position}: {self.reason}"


@final
class SystemStopped(EventSourcingError):
    """The eventsourcing system was stopped, so the call could not be served.

    A call made after the ``open_eventsourcing`` block exited, or one still waiting for
    its turn when it exited, gets this error and nothing of it was committed; one whose
    commit was under way finished it first (and got its real reply) unless the store
    itself hung.
    """

    operation: str

    def __init__(self, operation: str) -> None:
        super().__init__(operation)
        self.operation = operation

    def __str__(self) -> str:
        return (
            f"{self.operation} failed: the eventsourcing system has stopped; call it inside "
            "the open_eventsourcing block"
        )


@final
class TransactionRolledBack(EventSourcingError):
    """The transaction was rolled back; nothing it wrote was kept."""

    reason: str | None

    def __init__(self, reason: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return "transaction rolled back" + ("" if self.reason is None else f": {self.reason}")

    def describe(self) -> str:
        """``TransactionRolledBack: deadlock``."""
        return f"{type(self).__name__}: {self.reason or 'the transaction was rolled back'}"


@final
class ActorTimeout(EventSourcingError):
    """No reply arrived within ``timeout_ms`` milliseconds during ``operation``."""

    operation: str
    timeout_ms: int

    def __init__(self, operation: str, timeout_ms: int) -> None:
        super().__init__(operation, timeout_ms)
        self.operation = operation
        self.timeout_ms = timeout_ms

    def __str__(self) -> str:
        return f"actor timeout during {self.operation} after {self.timeout_ms} ms"

    def describe(self) -> str:
        """``ActorTimeout: no reply during receive within 250 ms``."""
        return (
            f"{type(self).__name__}: no reply during {self.operation} within {self.timeout_ms} ms"
        )


@final
class MailboxFull(EventSourcingError):
    """A send found the mailbox at capacity; the message was not delivered.

    Raise the mailbox capacity, slow the sender down, or use the awaiting facade
    (:func:`trio_es.open_eventsourcing`), which waits for room instead.
    """

    mailbox: str
    capacity: int

    def __init__(self, *, mailbox: str, capacity: int) -> None:
        super().__init__(mailbox, capacity)
        self.mailbox = mailbox
        self.capacity = capacity

    def __str__(self) -> str:
        return (
            f"mailbox {self.mailbox} is full (capacity {self.capacity}); raise its capacity "
            "or wait for room with the async facade"
        )


@final
class AggregateCrashed(EventSourcingError):
    """The aggregate's task crashed more often than its restart intensity allows.

    It stays stopped, and messages waiting for it get this error; the next message sent
    to the aggregate starts it again from the store. ``__cause__`` is the last crash.
    """

    aggregate_id: str
    restarts: int

    def __init__(self, *, aggregate_id: str, restarts: int) -> None:
        super().__init__(aggregate_id, restarts)
        self.aggregate_id = aggregate_id
        self.restarts = restarts

    def __str__(self) -> str:
        cause = self.__cause__
        last = "" if cause is None else f" (last crash: {type(cause).__name__}: {cause})"
        return (
            f"aggregate {self.aggregate_id!r} crashed {self.restarts} times in its restart "
            f"period and was stopped{last}; fix the bug in handle/apply or the store, then "
            "send again"
        )


def describe_error(error: BaseException) -> str:
    """Describe any exception in one line: ``TypeName: message``.

    The same form for trio_es's errors and any other exception, like the last line of a
    traceback without the module: ``TransactionFailed: database is locked (aggregate
    'acc-1')``, ``Overdrawn: 500``, ``KeyError: 'k'``. trio_es's errors give it through
    their :meth:`~EventSourcingError.describe` (whose message does not repeat the type,
    as their ``str()`` does to stand alone). Line breaks in a message become spaces, an
    empty message reads ``(no message)``, and a ``str()`` that raises reads
    ``(str() failed)``: this never raises and never returns more than one line.
    """
    if isinstance(error, EventSourcingError):
        try:
            text = _one_line(error.describe())
        except Exception:
            text = ""  # a broken describe() override: the generic form below
        if text:
            return text
    return f"{type(error).__name__}: {_message(error)}"


def _safe(show: Callable[[object], str], value: object) -> str:
    # A description must not fail because the value's own str() or repr() does.
    try:
        return show(value)
    except Exception:
        return f"({show.__name__}() failed)"


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _message(error: BaseException) -> str:
    """The error's ``str()`` on one line, or ``(no message)`` when it is empty."""
    return _one_line(_safe(str, error)) or "(no message)"

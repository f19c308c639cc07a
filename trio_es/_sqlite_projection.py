"""Projection leases of the SQLite store: a file lock per projection, checkpoints in the file.

Exactly one instance of a projection may be active at a time, across every process using
the database. A lease is an exclusive ``flock`` on a sidecar file next to the database,
``{path}-trio_es-{digest}.lock``, where the digest names (events table, aggregate type,
projection name). ``flock`` rather than ``lockf``: ``flock`` locks belong to an open
file, so two leases in one process exclude each other too, and the kernel drops the lock
when its process dies (SIGKILL included), so a standby takes over at its next try. The
lock files are never deleted: deleting one while a standby has it open would let two
holders lock two different files.

While it holds the lock, a lease has its own sqlite3 connection (not the store's writer:
a projection's batch must not wait behind commands, nor commands behind it) for the
checkpoint row in ``trio_es_checkpoints``, used from a worker thread and interrupted on
cancellation like the store's connections. Every write is one ``BEGIN IMMEDIATE``
transaction in one thread call; ``advance_with`` runs the projection's own writes in the
same transaction as the checkpoint move, so they are kept together or not at all.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import hashlib
import json
import logging
import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from typing import Any, Final, TypeVar, final

import attrs
import trio

from ._errors import CheckpointMoved, EventStoreError
from ._sql import Statements, check_text, utc_text
from ._sqlite_connection import (
    BUSY_SLICE_MS,
    CLOSE_TIMEOUT_S,
    Connection,
    Interrupt,
    Interrupted,
    begin_immediate,
    rollback,
    translate_error,
)
from ._types import EventEnvelope, utc_now
from ._validated import check_int
from ._watch import FnFailed, check_projection_name

__all__ = ["LeaseSettings", "SqliteLease", "lock_path", "open_lease"]

logger: Final = logging.getLogger("trio_es.sqlite_store")

T = TypeVar("T")


def lock_path(database: str, events_table_key: str, aggregate_type: str, name: str) -> str:
    """The lock file of projection ``name`` of ``aggregate_type`` in ``database``'s table.

    The three parts go into the digest as a JSON list, so no two keys share a file.
    """
    key = json.dumps([events_table_key, aggregate_type, name]).encode()
    return f"{database}-trio_es-{hashlib.blake2b(key, digest_size=8).hexdigest()}.lock"


@final
@attrs.frozen
class LeaseSettings:
    """What a lease needs from its store (all validated when the store was opened)."""

    path: str
    statements: Statements
    aggregate_type: str
    synchronous: str
    busy_timeout_ms: int
    takeover_interval: float


@final
@attrs.define(eq=False)
class SqliteLease:
    """A projection's lease in a :class:`~trio_es.sqlite_store.SqliteStore`.

    Valid inside the ``async with store.projection_lease(name)`` block that yielded it;
    see :class:`~trio_es._store.Lease` for the contract.

    Attributes:
        name: the projection's name.
    """

    _settings: LeaseSettings
    name: str
    _connection: Connection

    @property
    def _key(self) -> tuple[str, str, str]:
        return (
            self._settings.statements.events_table_key,
            self._settings.aggregate_type,
            self.name,
        )

    async def _run(self, fn: Callable[[sqlite3.Connection, Interrupt], T], doing: str) -> T:
        try:
            return await self._connection.run(fn)
        except sqlite3.Error as error:
            raise translate_error(
                error,
                doing=f"{doing} of projection {self.name!r}",
                path=self._settings.path,
                busy_timeout_ms=self._settings.busy_timeout_ms,
            ) from error

    def _transaction(
        self, connection: sqlite3.Connection, interrupt: Interrupt, body: Callable[[], None]
    ) -> None:
        """``BEGIN IMMEDIATE``, ``body()``, ``COMMIT`` (in the worker thread); or roll back."""
        begin_immediate(connection, interrupt, self._settings.busy_timeout_ms)
        try:
            body()
            if interrupt.requested:
                raise Interrupted
            connection.execute("COMMIT")
        except BaseException:
            rollback(connection)
            raise

    def _select(self, connection: sqlite3.Connection) -> int | None:
        rows = connection.execute(self._settings.statements.select_checkpoint, self._key)
        row = rows.fetchone()
        return None if row is None else int(row[0])

    def _insert(self, connection: sqlite3.Connection) -> None:
        connection.execute(
            self._settings.statements.insert_checkpoint, (*self._key, utc_text(utc_now()))
        )

    def _move(self, connection: sqlite3.Connection, expected: int, position: int) -> None:
        """Compare-and-set the checkpoint inside the open transaction, or raise."""
        cursor = connection.execute(
            self._settings.statements.advance_checkpoint,
            (position, utc_text(utc_now()), *self._key, expected),
        )
        if cursor.rowcount != 1:
            raise CheckpointMoved(name=self.name, expected=expected, found=self._select(connection))

    def _call(
        self,
        fn: Callable[..., None],
        connection: sqlite3.Connection,
        interrupt: Interrupt,
        *args: Any,
    ) -> None:
        """Run the projection's ``fn`` inside the open transaction, keeping its error as is."""
        try:
            fn(connection, *args)
        except Exception as error:
            if interrupt.requested:
                # Its statement was interrupted because the caller was cancelled.
                raise Interrupted from error
            raise FnFailed(error) from None
        if not connection.in_transaction:
            raise EventStoreError(
                f"the handler of projection {self.name!r} committed or rolled back the "
                "transaction it was given; leave that to trio_es (it commits the checkpoint "
                "with your writes)"
            )

    async def _run_fn(
        self, fn: Callable[[sqlite3.Connection, Interrupt], None], doing: str
    ) -> None:
        failure: Exception | None = None
        try:
            await self._run(fn, doing)
        except FnFailed as failed:
            failure = failed.error
        if failure is not None:
            # Raised here, outside the except block, so that its context stays its own.
            raise failure

    async def checkpoint(self) -> int:
        """The stored checkpoint; adds the row at 0 for a projection that never ran.

        Raises:
            EventStoreError: SQLite failed, or the lease has ended.
        """

        def read(connection: sqlite3.Connection, interrupt: Interrupt) -> int:
            found = self._select(connection)
            if found is not None:
                return found
            self._transaction(connection, interrupt, lambda: self._insert(connection))
            found = self._select(connection)
            assert found is not None  # inserted above, and checkpoint rows are never deleted
            return found

        return await self._run(read, "reading the checkpoint")

    async def advance(self, expected: int, position: int) -> None:
        """Move the checkpoint from ``expected`` to ``position``.

        Raises:
            CheckpointMoved: the stored checkpoint is not ``expected``; nothing changed.
            EventStoreError: SQLite failed, or the lease has ended; nothing changed.
        """
        expected = check_int("expected", expected, minimum=0)
        position = check_int("position", position, minimum=0)

        def move(connection: sqlite3.Connection, interrupt: Interrupt) -> None:
            self._transaction(
                connection, interrupt, lambda: self._move(connection, expected, position)
            )

        await self._run(move, "advancing the checkpoint")

    async def advance_with(
        self,
        expected: int,
        position: int,
        fn: Callable[[Any, list[EventEnvelope[Any]]], None],
        batch: list[EventEnvelope[Any]],
    ) -> None:
        """Run ``fn(connection, batch)`` and move the checkpoint, in one transaction.

        ``fn`` gets the lease's ``sqlite3.Connection`` inside ``BEGIN IMMEDIATE`` and
        must neither commit nor roll back. Cancelling the caller interrupts ``fn``'s
        running statement and rolls everything back.

        Raises:
            CheckpointMoved: the stored checkpoint is not ``expected``; nothing is kept.
            EventStoreError: SQLite failed, ``fn`` ended the transaction, or the lease
                has ended; nothing is kept.
            Exception: whatever ``fn`` raised, as itself; nothing is kept.
        """
        expected = check_int("expected", expected, minimum=0)
        position = check_int("position", position, minimum=0)
        if not callable(fn):
            raise TypeError(f"fn must be a function of (connection, batch) (got {fn!r:.80})")

        def run(connection: sqlite3.Connection, interrupt: Interrupt) -> None:
            def body() -> None:
                self._call(fn, connection, interrupt, batch)
                self._move(connection, expected, position)

            self._transaction(connection, interrupt, body)

        await self._run_fn(run, "applying a batch and advancing the checkpoint")

    async def reset(self, fn: Callable[[Any], None] | None = None) -> None:
        """Set the checkpoint to 0, running ``fn(connection)`` in the same transaction.

        Raises:
            EventStoreError: SQLite failed, ``fn`` ended the transaction, or the lease
                has ended; nothing is kept.
            Exception: whatever ``fn`` raised, as itself; nothing is kept.
        """
        if fn is not None and not callable(fn):
            raise TypeError(f"fn must be None or a function of (connection) (got {fn!r:.80})")

        def run(connection: sqlite3.Connection, interrupt: Interrupt) -> None:
            def body() -> None:
                if fn is not None:
                    self._call(fn, connection, interrupt)
                self._insert(connection)
                # Under the write lock nothing moves it between the read and the update.
                current = self._select(connection)
                assert current is not None
                self._move(connection, current, 0)

            self._transaction(connection, interrupt, body)

        await self._run_fn(run, "resetting the checkpoint")


def _open_lock_file(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)


class _Attempt(enum.Enum):
    LOCKED = "locked"
    #: Another lease holds the lock.
    BUSY = "busy"
    #: The path no longer names the file that was opened (someone removed or replaced
    #: it): a holder of the file there now would not be excluded, so open that one.
    STALE = "stale"


def _try_lock(fd: int, path: str) -> _Attempt:
    """Take the exclusive lock on ``fd`` if it is free and still the file at ``path``."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return _Attempt.BUSY
        raise
    try:
        current = os.stat(path)
    except FileNotFoundError:
        current = None
    locked = os.fstat(fd)
    if current is None or (current.st_dev, current.st_ino) != (locked.st_dev, locked.st_ino):
        fcntl.flock(fd, fcntl.LOCK_UN)
        return _Attempt.STALE
    return _Attempt.LOCKED


def _open_connection(settings: LeaseSettings) -> sqlite3.Connection:
    connection = sqlite3.connect(
        settings.path,
        timeout=min(settings.busy_timeout_ms, BUSY_SLICE_MS) / 1000,
        isolation_level=None,
        check_same_thread=False,
    )
    try:
        # Both passed validation when the store was opened; PRAGMA arguments cannot be
        # bound. A short busy slice, as the writer's: begin_immediate waits in slices.
        connection.execute(f"PRAGMA synchronous={settings.synchronous}")
        connection.execute(f"PRAGMA busy_timeout={min(settings.busy_timeout_ms, BUSY_SLICE_MS)}")
    except BaseException:
        connection.close()
        raise
    return connection


@contextlib.asynccontextmanager
async def open_lease(settings: LeaseSettings, name: object) -> AsyncIterator[SqliteLease]:
    """Wait for projection ``name``'s lock file, then yield its lease; release on exit.

    Tries the lock at once, then every ``takeover_interval`` seconds (cancellably).

    Raises:
        TypeError, ValueError: ``name`` is not a non-empty str.
        EventStoreError: the lock file or the database cannot be opened.
    """
    name = check_text(check_projection_name(name), "projection name")
    path = lock_path(
        settings.path, settings.statements.events_table_key, settings.aggregate_type, name
    )
    fd: int | None = None
    try:
        while True:
            if fd is None:
                fd = await _open_lock(path)
            try:
                attempt = _try_lock(fd, path)
            except OSError as error:
                raise EventStoreError(
                    f"cannot lock {path!r} for projection {name!r} ({error}); the lease "
                    "needs a local file system that supports flock"
                ) from error
            if attempt is _Attempt.LOCKED:
                break
            if attempt is _Attempt.STALE:
                os.close(fd)
                fd = None
                await trio.lowlevel.checkpoint()
            else:
                await trio.sleep(settings.takeover_interval)
        try:
            raw = await trio.to_thread.run_sync(_open_connection, settings)
        except sqlite3.Error as error:
            raise translate_error(
                error,
                doing=f"opening the lease of projection {name!r}",
                path=settings.path,
                busy_timeout_ms=settings.busy_timeout_ms,
            ) from error
        connection = Connection(
            raw,
            "lease",
            closed_message=(
                f"the lease of projection {name!r} has ended; use it only inside its "
                "async with store.projection_lease(...) block"
            ),
        )
        try:
            yield SqliteLease(settings, name, connection)
        finally:
            # Close before unlocking: no write of this lease may follow a standby's first.
            with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True) as scope:
                await connection.close()
            if scope.cancelled_caught:  # pragma: no cover - a thread call hung
                logger.error(
                    "gave up closing the lease connection of projection %r after %s s",
                    name,
                    CLOSE_TIMEOUT_S,
                )
    finally:
        if fd is not None:
            # Closing the file releases the lock; unlocking first says so explicitly.
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


async def _open_lock(path: str) -> int:
    try:
        return await trio.to_thread.run_sync(_open_lock_file, path)
    except OSError as error:
        raise EventStoreError(
            f"cannot open the lease file {path!r} ({error}); the directory of the database "
            "must be writable"
        ) from error

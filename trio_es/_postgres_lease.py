"""The single-active projection lease of a PostgreSQL store, and its checkpoint.

A lease is a session-level advisory lock (``pg_try_advisory_lock``) held by a
connection of its own. PostgreSQL lets one session at a time hold it, across every
process and machine using the database, and releases it when that session ends: when
the lease's block exits (the connection is closed), and when its process dies (the
server sees the connection close; on a machine that vanished, once TCP keepalives
notice). A standby instance keeps its connection and tries again every
``takeover_interval`` seconds.

The checkpoint row is read and written on that same connection, and ``advance_with``
runs the projection's own writes there in one transaction with the checkpoint's
compare-and-set: losing the connection loses the lock and the ability to write at
once, so an instance that was replaced can never move the checkpoint again. After the
connection is lost every call on the lease raises ``EventStoreError``; the projection
then takes a new lease (and resumes from the stored checkpoint).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final, TypeVar, final

import attrs
import psycopg
import trio

from ._errors import CheckpointMoved, EventStoreError, TransactionFailed
from ._postgres_connection import (
    CLEANUP_SECONDS,
    Call,
    CallFn,
    Connection,
    PooledConnection,
    connect,
    first_line,
    keep_session_open,
    translate_error,
)
from ._sql import Statements
from ._types import EventEnvelope, utc_now
from ._validated import check_int
from ._watch import FnFailed
from ._watch import check_projection_name as check_name

__all__ = [
    "LEASE_APPLICATION_NAME",
    "PostgresLease",
    "check_projection_name",
    "hold_lease",
    "lease_key",
]

logger: Final = logging.getLogger("trio_es.postgres_store")

T = TypeVar("T")

#: The ``application_name`` of lease sessions, unless the DSN names one.
LEASE_APPLICATION_NAME: Final = "trio_es_lease"
#: How many times ``reset`` re-reads a checkpoint that moved under it before giving up.
_RESET_ATTEMPTS: Final = 3


def check_projection_name(name: object) -> str:
    """``name`` if it can name a projection (a non-empty str PostgreSQL text can hold).

    Raises:
        TypeError: ``name`` is not a str.
        ValueError: ``name`` is empty, or holds a NUL character or a lone surrogate.
    """
    name = check_name(name)
    if "\x00" in name:
        raise ValueError(
            f"a projection name must not contain NUL characters (got {name!r:.80}), which "
            "PostgreSQL text cannot hold; remove them"
        )
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(
            f"a projection name must be valid Unicode text (got {name!r:.80}, with a lone "
            "surrogate); remove it"
        ) from None
    return name


def lease_key(events_table_key: str, aggregate_type: str, name: str) -> int:
    """The advisory-lock key of projection ``name`` of ``aggregate_type`` in that table.

    A 64-bit BLAKE2b digest, as the commit lock's key: advisory locks are per database,
    and NUL (which none of the parts may hold) keeps the parts apart.
    """
    text = "\x00".join(("trio_es projection", events_table_key, aggregate_type, name))
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


@final
@attrs.define(eq=False)
class PostgresLease:
    """The held lease of one projection; see :class:`trio_es._store.Lease`.

    Made by :meth:`PostgresStore.projection_lease
    <trio_es.postgres_store.PostgresStore.projection_lease>`; only usable inside its
    block, and only while its connection lives.
    """

    name: str
    _conn: PooledConnection
    _statements: Statements
    _aggregate_type: str
    _server: str
    _ended: bool = False
    #: Why the connection was lost, once it was.
    _lost: str | None = None

    @property
    def _key(self) -> tuple[str, str, str]:
        return (self._statements.events_table_key, self._aggregate_type, self.name)

    async def checkpoint(self) -> int:
        """The stored checkpoint (0 for a projection that never ran; the row is made)."""
        statements, key = self._statements, self._key

        def read(raw: Connection, _: Call) -> int:
            raw.execute(statements.insert_checkpoint, (*key, utc_now()))
            row = raw.execute(statements.select_checkpoint, key).fetchone()
            if row is None:  # pragma: no cover - the row was just made, and leases hold it
                raise EventStoreError(f"the checkpoint row of projection {self.name!r} vanished")
            return int(row[0])

        return await self._call(read, "reading a projection checkpoint")

    async def advance(self, expected: int, position: int) -> None:
        """Move the checkpoint from ``expected`` to ``position``.

        Raises:
            CheckpointMoved: the stored checkpoint is not ``expected``; nothing changed.
            EventStoreError: PostgreSQL failed, or the lease's connection was lost.
        """
        expected = check_int("expected", expected, minimum=0)
        position = check_int("position", position, minimum=0)
        await self._call(
            lambda raw, _: self._compare_and_set(raw, expected, position),
            "advancing a projection checkpoint",
        )

    async def advance_with(
        self,
        expected: int,
        position: int,
        fn: Callable[[Any, list[EventEnvelope[Any]]], None],
        batch: list[EventEnvelope[Any]],
    ) -> None:
        """Run ``fn(connection, batch)`` and move the checkpoint, in one transaction.

        ``fn`` gets the lease's ``psycopg.Connection`` inside a transaction, in a worker
        thread; it must not commit or roll back (psycopg refuses both inside the
        transaction block). Cancelling the call cancels the statement running.

        Raises:
            CheckpointMoved: the stored checkpoint is not ``expected``; nothing of ``fn``
                is kept.
            EventStoreError: PostgreSQL failed, or the lease's connection was lost;
                nothing is kept (unless the connection broke during COMMIT, when the
                writes and the checkpoint landed together or not at all).
            Exception: whatever ``fn`` raised, as itself; nothing of it is kept.
        """
        expected = check_int("expected", expected, minimum=0)
        position = check_int("position", position, minimum=0)

        def work(raw: Connection, call: Call) -> None:
            call.checkpoint()
            with raw.transaction():
                _run_handler(fn, raw, batch)
                call.checkpoint()
                self._compare_and_set(raw, expected, position)

        await self._call_handler(work, "advancing a projection checkpoint with its writes")

    async def reset(self, fn: Callable[[Any], None] | None = None) -> None:
        """Set the checkpoint to 0, running ``fn(connection)`` first in the same transaction.

        Raises:
            EventStoreError: PostgreSQL failed, or the lease's connection was lost;
                nothing changed.
            Exception: whatever ``fn`` raised, as itself; nothing changed.
        """
        statements, key = self._statements, self._key

        def work(raw: Connection, call: Call) -> None:
            call.checkpoint()
            with raw.transaction():
                if fn is not None:
                    _run_handler(fn, raw)
                call.checkpoint()
                raw.execute(statements.insert_checkpoint, (*key, utc_now()))
                for _ in range(_RESET_ATTEMPTS):
                    row = raw.execute(statements.select_checkpoint, key).fetchone()
                    found = 0 if row is None else int(row[0])
                    try:
                        self._compare_and_set(raw, found, 0)
                    except CheckpointMoved:
                        continue  # only a writer without the lease can get here
                    return
                raise EventStoreError(
                    f"the checkpoint of projection {self.name!r} kept moving while it was "
                    "reset; stop whatever writes it without holding the lease"
                )

        await self._call_handler(work, "resetting a projection checkpoint")

    def _compare_and_set(self, raw: Connection, expected: int, position: int) -> None:
        """In the worker thread: the checkpoint's CAS; ``CheckpointMoved`` on a miss."""
        statements, key = self._statements, self._key
        cursor = raw.execute(statements.advance_checkpoint, (position, utc_now(), *key, expected))
        if cursor.rowcount == 1:
            return
        row = raw.execute(statements.select_checkpoint, key).fetchone()
        raise CheckpointMoved(
            name=self.name, expected=expected, found=None if row is None else int(row[0])
        )

    async def _call_handler(self, fn: CallFn[None], doing: str) -> None:
        """:meth:`_call`, re-raising the projection's own error as itself."""
        error: Exception | None = None
        try:
            await self._call(fn, doing)
        except FnFailed as failed:
            error = failed.error
            self._note_lost("the connection broke while the projection's function ran")
        if error is not None:
            # Outside the except block: the wrapper must not become its __context__.
            raise error

    async def _call(self, fn: CallFn[T], doing: str) -> T:
        """Run ``fn`` on the lease's connection in a worker thread (cancellable)."""
        if self._ended:
            raise EventStoreError(
                f"the lease of projection {self.name!r} has ended; use it only inside its "
                "async with block"
            )
        if self._note_lost("the connection was closed"):
            raise self._lost_error()
        try:
            return await self._conn.run(fn)
        except psycopg.Error as error:
            if self._note_lost(first_line(error)):
                raise self._lost_error() from error
            translated = translate_error(error, doing=doing, server=self._server)
            if isinstance(translated, EventStoreError):
                raise translated from error
            # The lease is held and its connection lives: the caller may try again,
            # but as a store failure, like every other lease error.
            raise EventStoreError(str(translated)) from error

    def _note_lost(self, reason: str) -> bool:
        """Whether the connection is lost; the first time it is found so, for ``reason``."""
        if self._lost is None and not self._conn.usable():
            self._lost = reason
            # Already broken (or given up on): make sure the session ends, so that the
            # lock is free for a standby as soon as the server agrees.
            self._conn.discard()
        return self._lost is not None

    def _lost_error(self) -> EventStoreError:
        return EventStoreError(
            f"lost the connection to PostgreSQL at {self._server} that held the lease of "
            f"projection {self.name!r} ({self._lost}); another instance may have taken "
            "over, so take the lease again"
        )


def _run_handler(fn: Callable[..., None], *args: Any) -> None:
    """Call the projection's ``fn``; its error comes out wrapped, to be told apart."""
    try:
        fn(*args)
    except Exception as error:
        raise FnFailed(error) from error


async def _close(conn: PooledConnection) -> None:
    # Closing ends the session and so releases the lock; it is network I/O.
    with trio.move_on_after(CLEANUP_SECONDS, shield=True):
        await trio.to_thread.run_sync(conn.discard, abandon_on_cancel=True)


def _try_lock(raw: Connection, key: int) -> bool:
    row = raw.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
    return row is not None and bool(row[0])


async def _acquire(
    conninfo: str, key: int, name: str, takeover_interval: float, server: str
) -> PooledConnection:
    """A connection that holds the lock ``key``; waits (cancellably) until it can be had."""
    conn: PooledConnection | None = None
    failures = 0
    try:
        while True:
            if conn is not None and not conn.usable():
                await _close(conn)
                conn = None
            try:
                if conn is None:
                    conn = await connect(conninfo, application_name=LEASE_APPLICATION_NAME)
                    await conn.run(lambda raw, _: keep_session_open(raw))
                if await conn.run(lambda raw, _: _try_lock(raw, key)):
                    held, conn = conn, None
                    return held
                failures = 0
            except (TransactionFailed, psycopg.OperationalError) as error:
                # The server is away: a standby waits for it as for the holder.
                failures += 1
                logger.log(
                    logging.WARNING if failures == 1 else logging.DEBUG,
                    "cannot try the lease of projection %r at %s (%s); retrying every %s s",
                    name,
                    server,
                    first_line(error),
                    takeover_interval,
                )
            except psycopg.Error as error:
                raise translate_error(
                    error, doing="taking a projection lease", server=server
                ) from error
            await trio.sleep(takeover_interval)
    finally:
        if conn is not None:
            await _close(conn)


@asynccontextmanager
async def hold_lease(
    conninfo: str,
    statements: Statements,
    aggregate_type: str,
    name: str,
    *,
    takeover_interval: float,
    server: str,
) -> AsyncIterator[PostgresLease]:
    """Wait until this instance holds projection ``name``'s lease; yield it; release it."""
    key = lease_key(statements.events_table_key, aggregate_type, name)
    conn = await _acquire(conninfo, key, name, takeover_interval, server)
    lease = PostgresLease(name, conn, statements, aggregate_type, server)
    try:
        yield lease
    finally:
        lease._ended = True
        await _close(conn)

"""The PostgreSQL store's connection pool: cancellable waits, one task per connection.

A :class:`Pool` holds up to ``size`` autocommit connections, made on demand. A task
borrows one for a single call (``fn(connection, call)`` in a worker thread, see
``_postgres_connection.py``) and returns it idle, so a connection is never shared and
never handed out in the middle of a transaction.

Semantics the store relies on:

* Waiting for a free connection is an ordinary Trio wait: cancelling it costs nothing
  and leaves nothing behind.
* A connection is pooled again only if it is open, idle (no transaction left open) and
  was not given up on; anything else is closed and replaced on demand.
* A reused connection found broken (the server restarted, the backend was terminated)
  is replaced and the call retried, once per pooled connection and then once on a fresh
  connection. Only a plain ``psycopg.OperationalError`` is retried: a commit raises one
  only while nothing can have been committed.
* A call that raises :class:`SessionAbandoned` (a commit whose COMMIT may have reached
  the server) is never retried and its connection never reused: the store is about to
  end that very session and must not be handed it for the lookup.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar, final

import attrs
import psycopg
import trio

from ._errors import EventStoreError
from ._postgres_connection import CallFn, PooledConnection, connect

__all__ = ["Pool", "SessionAbandoned"]

logger: Final = logging.getLogger("trio_es.postgres_store")

T = TypeVar("T")


class SessionAbandoned(Exception):
    """Internal: a call gave its session up; the pool closes it and does not retry the call.

    Raised (as a subclass) by a commit that failed after COMMIT may have reached the
    server: sending it again could store it twice, and the store ends the session before
    it finds out what happened.
    """


@final
@attrs.define(eq=False)
class Pool:
    """Up to ``size`` connections, made on demand, each used by one task at a time.

    Waiting for a free connection is an ordinary Trio wait (cancellable). A connection
    that broke (server restart, terminated backend) is dropped and replaced on demand.

    Why not ``psycopg_pool``: its ``getconn`` blocks a thread, so waiting for a
    connection could not be cancelled from Trio without abandoning a thread that would
    then hold a connection nobody returns; it runs its own maintenance threads and
    checks, adding hops and threads to what is here a list and a semaphore; and its
    reconnect logic would still need the per-connection limiter and cancel handling
    of ``_postgres_connection.py``. What it offers beyond that (max lifetime, idle
    timeouts, health checks) a short-lived autocommit connection used this way hardly
    needs.
    """

    conninfo: str = attrs.field(repr=False)  # may hold a password
    size: int
    _slots: trio.Semaphore = attrs.field(init=False)
    _idle: list[PooledConnection] = attrs.field(init=False, factory=list)
    _closed: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self) -> None:
        self._slots = trio.Semaphore(self.size)

    @property
    def closed(self) -> bool:
        """Whether :meth:`aclose` was called (the store's block has exited)."""
        return self._closed

    async def run(self, fn: CallFn[T]) -> T:
        """Run ``fn(connection, call)`` on a pooled connection in a worker thread.

        A reused connection found broken before anything was committed (the server
        restarted since it was last used) is replaced and the call retried, so a server
        restart costs callers nothing once the server is back. Only a plain
        ``OperationalError`` is retried: a commit raises one only while nothing can have
        been committed, and :class:`SessionAbandoned` otherwise, which is never retried.

        Raises:
            EventStoreError: the pool is closed.
            TransactionFailed: no connection could be made.
            SessionAbandoned: as ``fn`` raised it (its connection is closed).
        """
        return await self.use(lambda conn: conn.run(fn))

    async def use(self, use: Callable[[PooledConnection], Awaitable[T]]) -> T:
        """``await use(connection)`` with a pooled connection; as :meth:`run`, for any call.

        ``use`` may call the connection's ``run`` (a worker thread) and ``exchange``
        (the Trio thread) as it needs; the same retry and discard rules apply.
        """
        if self._closed:
            raise EventStoreError("the PostgreSQL store is closed; open it again to use it")
        # A free slot is taken without a scheduling point; ``use`` checkpoints anyway
        # (every connection call does).
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            await self._slots.acquire()
        try:
            if self._closed:
                raise EventStoreError("the PostgreSQL store is closed; open it again to use it")
            attempts = 0
            while True:
                attempts += 1
                conn = self._idle.pop() if self._idle else await connect(self.conninfo)
                try:
                    return await use(conn)
                except SessionAbandoned:
                    # Never reused: the store is about to end this very session, and must
                    # not be handed it for the lookup.
                    conn.discard()
                    raise
                except psycopg.OperationalError:
                    # Every idle connection may have died with the server: allow one retry
                    # per pooled connection, then one on a fresh connection.
                    if conn.reused and conn.raw.closed and attempts <= self.size:
                        logger.info("replacing a broken PostgreSQL connection and retrying")
                        continue
                    raise
                finally:
                    if not self._closed and conn.usable():
                        conn.reused = True
                        self._idle.append(conn)
                    else:
                        conn.discard()
        finally:
            self._slots.release()

    async def aclose(self) -> None:
        """Close the idle connections; connections in use are closed when returned."""
        self._closed = True
        idle, self._idle = self._idle, []

        def close_all() -> None:
            for conn in idle:
                conn.discard()

        # Closing sends a goodbye to the server: network I/O, so not in the Trio thread.
        await trio.to_thread.run_sync(close_all, abandon_on_cancel=True)

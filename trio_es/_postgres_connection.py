"""PostgreSQL connections for the store, its listeners and its leases: one user at a time.

A connection is used in one of two ways, never both at once:

* The hot path (commits, loads) runs from the Trio thread: :meth:`PooledConnection.exchange`
  pipelines statements through libpq's non-blocking calls (``_postgres_wire.py``), with
  no thread hop.
* Everything else (setup, the rare commit shapes, lookups after a lost commit, LISTEN,
  leases) runs blocking psycopg code in a worker thread (``trio.to_thread.run_sync``).

Each :class:`PooledConnection` has its own ``CapacityLimiter(1)`` that both ways take:
at most one task or thread ever uses it, and a task that takes a connection whose
previous (cancelled) thread call is still finishing waits for that thread first.

Cancellation, either way: the server is asked to cancel the running statement
(``Connection.cancel_safe``), the call is let finish and roll back, and only then does
``trio.Cancelled`` propagate, with the connection idle; a call that does not stop within
``CLEANUP_SECONDS`` has its connection dropped. The store's pool, the LISTEN connection
of a watch and the connection holding a projection lease all go through this one
mechanism.
"""

from __future__ import annotations

import contextlib
import datetime
import enum
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar

import attrs
import psycopg
import psycopg.errors
import trio
from psycopg.pq import TransactionStatus
from psycopg.pq.abc import PGresult

from ._errors import EventStoreError, TransactionFailed
from ._postgres_wire import ROLLBACK, Query, Session, exchange, finish

__all__ = [
    "CLEANUP_SECONDS",
    "Backend",
    "Call",
    "CallFn",
    "CallState",
    "Connection",
    "Handoff",
    "Interrupted",
    "PooledConnection",
    "close_quietly",
    "connect",
    "describe_server",
    "first_line",
    "keep_session_open",
    "translate_error",
]

logger: Final = logging.getLogger("trio_es.postgres_store")

T = TypeVar("T")

#: How long (seconds) cleanup after a cancellation may take before the connection is dropped.
CLEANUP_SECONDS: Final = 10.0
#: How long (seconds) the cancel request to the server may take.
CANCEL_SECONDS: Final = 5.0
#: How often (seconds) a cancel request is repeated while a cancelled call still runs.
CANCEL_RETRY_SECONDS: Final = 0.5
#: libpq's ``connect_timeout`` (whole seconds).
CONNECT_SECONDS: Final = 10


Connection = psycopg.Connection[tuple[Any, ...]]


class CallState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    SKIPPED = "skipped"


class Interrupted(Exception):
    """Internal: a worker thread stopped early because the calling task was cancelled."""


#: A server session: its pid and start time (a pid alone may be reused by a later session).
Backend = tuple[int, datetime.datetime]


@attrs.define(eq=False)
class Call:
    """One thread call, shared by the worker thread and the Trio side.

    ``state`` tells the Trio side whether a statement may be running (so whether to
    send the server a cancel request); ``interrupted`` tells the thread to start no
    further statement. Both change under ``lock``.
    """

    #: The server session the call runs on, if known (see ``_CommitOutcomeUnknown``).
    backend: Backend | None = None
    lock: threading.Lock = attrs.Factory(threading.Lock)
    state: CallState = CallState.PENDING
    interrupted: bool = False

    def checkpoint(self) -> None:
        """Raise ``Interrupted`` if the caller was cancelled; call between statements.

        A cancel request only stops the statement running when it arrives; one that
        lands between two statements would be lost without this.
        """
        if self.interrupted:
            raise Interrupted


#: What runs in a worker thread: ``fn(connection, call)``.
CallFn = Callable[[Connection, Call], T]


@attrs.define(eq=False)
class PooledConnection:
    """One psycopg connection and the limiter that keeps it to one thread at a time."""

    raw: Connection
    #: The server session behind ``raw``, if known.
    backend: Backend | None = None
    reused: bool = False
    limiter: trio.CapacityLimiter = attrs.Factory(lambda: trio.CapacityLimiter(1))
    # Guards ``busy`` and ``discarded`` between the worker thread and the Trio thread, so
    # exactly one of them closes a discarded connection.
    lock: threading.Lock = attrs.Factory(threading.Lock)
    busy: bool = False
    discarded: bool = False
    #: The state :meth:`exchange` keeps (made on first use).
    session: Session | None = None

    def usable(self) -> bool:
        """Whether the connection can go back to the pool: open, idle, not given up on."""
        raw = self.raw
        # pgconn's status, not ``raw.info``'s: that builds an object on every call.
        return (
            not self.discarded
            and not raw.closed
            and raw.pgconn.transaction_status == TransactionStatus.IDLE
        )

    def discard(self) -> None:
        """Give up on the connection; it is closed now, or by its thread when that ends."""
        with self.lock:
            self.discarded = True
            if self.busy:
                return
        close_quietly(self.raw)

    # -- worker thread side --

    def _execute(self, fn: CallFn[T], call: Call) -> T:
        with call.lock:
            if call.state is CallState.SKIPPED:
                raise Interrupted
            call.state = CallState.RUNNING
        with self.lock:
            self.busy = True
        try:
            return fn(self.raw, call)
        finally:
            self._tidy()
            with call.lock:
                call.state = CallState.DONE
            with self.lock:
                self.busy = False
                close = self.discarded
            if close:
                close_quietly(self.raw)

    def _tidy(self) -> None:
        """Leave the connection idle: roll back whatever the call left open."""
        raw = self.raw
        # A cancel request that arrives late can hit the ROLLBACK itself; try twice.
        for _ in range(2):
            if raw.closed or raw.info.transaction_status == TransactionStatus.IDLE:
                return
            try:
                raw.rollback()
            except psycopg.Error:
                continue
        if not raw.closed and raw.info.transaction_status != TransactionStatus.IDLE:
            with self.lock:
                self.discarded = True

    def _cancel_statement(self) -> None:
        try:
            self.raw.cancel_safe(timeout=CANCEL_SECONDS)
        except psycopg.Error as error:
            logger.warning("could not cancel a PostgreSQL statement: %s", error)

    # -- Trio side --

    async def run(self, fn: CallFn[T]) -> T:
        """Run ``fn(connection, call)`` in a worker thread.

        On cancellation the server is asked to cancel the running statement, the thread
        is told to start no other, and it is left to finish (rolling back); only then
        does ``Cancelled`` propagate, with the connection idle for the next user. If
        that takes longer than ``CLEANUP_SECONDS`` the connection is discarded instead.
        """
        call = Call(self.backend)
        try:
            return await trio.to_thread.run_sync(
                self._execute,
                fn,
                call,
                limiter=self.limiter,
                abandon_on_cancel=True,
                thread_name="trio_es postgres",
            )
        except trio.Cancelled:
            with trio.move_on_after(CLEANUP_SECONDS, shield=True) as scope:
                await self._stop(call)
            if scope.cancelled_caught:
                logger.warning("a cancelled PostgreSQL call did not stop; dropping its connection")
                self.discard()
            raise

    async def exchange(
        self, statements: Sequence[tuple[Query, Sequence[object]]]
    ) -> list[PGresult]:
        """Run ``statements`` in one pipeline from the Trio thread (no worker thread).

        See :func:`._postgres_wire.exchange`. It waits first for a previous call's
        thread that is still finishing (after a cancellation). A statement's own error
        leaves the connection usable (idle, or in a failed transaction that ``usable``
        reports and the pool does not reuse); anything else that interrupts the exchange
        (cancellation included) discards the connection at once: its session's state is
        unknown, and a COMMIT sent in it may or may not land, as when a connection is lost.
        """
        # Free in all but a rare case (a cancelled thread call still finishing): take it
        # without the scheduling point ``async with`` costs; the exchange checkpoints.
        try:
            self.limiter.acquire_nowait()
        except trio.WouldBlock:
            await self.limiter.acquire()
        try:
            if self.session is None:
                self.session = Session(self.raw)
            session = self.session
            with self.lock:
                self.busy = True
            try:
                return await exchange(session, statements)
            except BaseException as error:
                if session.broken and not isinstance(error, Exception):
                    # Cancelled (or interrupted) mid-exchange: as ``run`` does, have the
                    # server stop and roll back, so the connection is idle for the next user.
                    with trio.move_on_after(CLEANUP_SECONDS, shield=True) as scope:
                        await self._settle(session)
                    if scope.cancelled_caught:
                        logger.warning(
                            "a cancelled PostgreSQL call did not stop; dropping its connection"
                        )
                raise
            finally:
                with self.lock:
                    self.busy = False
                    if session.broken:
                        self.discarded = True
                    close = self.discarded
                if close:
                    with contextlib.suppress(OSError, ValueError):
                        trio.lowlevel.notify_closing(self.raw.pgconn.socket)
                    close_quietly(self.raw)
        finally:
            self.limiter.release()

    def rows(self, result: PGresult) -> list[tuple[Any, ...]]:
        """The rows of a result of :meth:`exchange`, as a psycopg cursor returns them."""
        assert self.session is not None
        transformer = self.session.transformer
        transformer.set_pgresult(result)
        return transformer.load_rows(0, result.ntuples, tuple)

    async def _settle(self, session: Session) -> None:
        """End an interrupted exchange: cancel what runs, read to the end, roll back.

        Leaves ``session.broken`` set unless the connection ended up idle.
        """
        try:
            while True:
                # A statement may wait (for a lock) indefinitely: ask the server to cancel
                # it, again while the results do not come, as ``_stop`` does.
                await trio.to_thread.run_sync(self._cancel_statement, abandon_on_cancel=True)
                with trio.move_on_after(CANCEL_RETRY_SECONDS):
                    await finish(session)
                    break
            # A cancel request that arrives late can hit the ROLLBACK itself; try twice.
            for _ in range(2):
                if self.raw.info.transaction_status == TransactionStatus.IDLE:
                    return
                with contextlib.suppress(psycopg.Error):
                    await exchange(session, [(ROLLBACK, ())])
        except psycopg.Error as error:
            logger.info("could not end a cancelled PostgreSQL call: %s", first_line(error))
        finally:
            session.broken = session.broken or (
                self.raw.info.transaction_status != TransactionStatus.IDLE
            )

    async def _stop(self, call: Call) -> None:
        with call.lock:
            call.interrupted = True
            if call.state is CallState.PENDING:
                call.state = CallState.SKIPPED
        # The limiter is released once the abandoned thread has returned; from then on
        # nothing touches the connection. Until then, cancel whatever statement runs:
        # a request that reached the server between two statements was ignored.
        while True:
            with call.lock:
                running = call.state is CallState.RUNNING
            if running:
                await trio.to_thread.run_sync(self._cancel_statement, abandon_on_cancel=True)
            with trio.move_on_after(CANCEL_RETRY_SECONDS):
                async with self.limiter:
                    return


def close_quietly(raw: Connection) -> None:
    try:
        raw.close()
    except Exception as error:  # closing must never raise into cleanup code
        logger.debug("error closing a PostgreSQL connection: %s", error)


@attrs.define(eq=False)
class Handoff:
    """Hands a connection made in an abandoned thread back, or closes it if nobody waits."""

    #: The session's default ``application_name`` (one in the DSN wins).
    application_name: str = "trio_es"
    lock: threading.Lock = attrs.Factory(threading.Lock)
    abandoned: bool = False
    raw: Connection | None = None
    backend: Backend | None = None

    def connect(self, conninfo: str) -> Connection:
        # Autocommit: a read is one statement and needs no BEGIN/COMMIT round trips; a
        # commit sends its own BEGIN. Settings given in the DSN win over these defaults.
        params = psycopg.conninfo.conninfo_to_dict(conninfo)
        defaults: dict[str, Any] = {
            "connect_timeout": CONNECT_SECONDS,
            "application_name": self.application_name,
        }
        raw: Connection = psycopg.connect(
            conninfo,
            autocommit=True,
            **{key: value for key, value in defaults.items() if key not in params},
        )
        # psycopg's own statement cache answers a ROLLBACK with DEALLOCATE ALL, which
        # would drop the statements the wire path prepared (``_postgres_wire.Session``);
        # the wire path prepares the hot statements itself.
        raw.prepare_threshold = None
        try:
            # Who this session is, so that after a lost commit the store can end exactly
            # this session (not a later one that got its pid) before looking it up.
            row = raw.execute(
                "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
            ).fetchone()
        except BaseException:
            close_quietly(raw)
            raise
        if row is not None and row[1] is not None:
            self.backend = (int(row[0]), row[1])
        with self.lock:
            if not self.abandoned:
                self.raw = raw
                return raw
        close_quietly(raw)
        return raw

    def abandon(self) -> None:
        with self.lock:
            self.abandoned = True
            raw, self.raw = self.raw, None
        if raw is not None:
            close_quietly(raw)


def describe_server(conninfo: str) -> str:
    """``host:port/dbname`` of a DSN, without the password, for error messages."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return "<unparsable DSN>"
    host = params.get("host") or params.get("hostaddr") or "localhost"
    return f"{host}:{params.get('port') or 5432}/{params.get('dbname') or params.get('user') or ''}"


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def translate_error(error: psycopg.Error, *, doing: str, server: str) -> Exception:
    """A psycopg error as the trio_es error callers handle, keeping PostgreSQL's words."""
    said = first_line(error)
    if isinstance(error, psycopg.errors.SerializationFailure | psycopg.errors.DeadlockDetected):
        return TransactionFailed(
            f"PostgreSQL aborted the transaction while {doing} ({said}); nothing was written, "
            "retry it"
        )
    if isinstance(
        error, psycopg.errors.InvalidSqlStatementName | psycopg.errors.DuplicatePreparedStatement
    ):
        # Raised at the statement's preparation, before it ran; the exchange rolled back
        # what ran before it, and the session deallocates its statements before the next.
        return TransactionFailed(
            f"the connection to PostgreSQL at {server} had other prepared statements than "
            f"trio_es expected while {doing} ({said}); nothing was written, retry it"
        )
    if isinstance(error, psycopg.errors.QueryCanceled | psycopg.errors.LockNotAvailable):
        return TransactionFailed(
            f"PostgreSQL cancelled the statement while {doing} ({said}); nothing was written, "
            "retry it or raise the server's statement_timeout/lock_timeout"
        )
    if isinstance(error, psycopg.OperationalError):
        state = error.sqlstate
        if state is None or state.startswith("08") or state.startswith("57P"):
            return TransactionFailed(
                f"lost the connection to PostgreSQL at {server} while {doing} ({said}); "
                "nothing was committed, retry once the server is reachable"
            )
        return TransactionFailed(
            f"PostgreSQL at {server} could not serve the request while {doing} ({said}); "
            "nothing was written, retry it"
        )
    if isinstance(error, psycopg.errors.ReadOnlySqlTransaction):
        return EventStoreError(
            f"PostgreSQL at {server} is read-only ({said}) while {doing}; connect to the primary"
        )
    if isinstance(error, psycopg.errors.UndefinedTable | psycopg.errors.UndefinedColumn):
        return EventStoreError(
            f"a trio_es table at {server} is missing or altered ({said}) while {doing}; "
            "reopen the store to create it"
        )
    if isinstance(error, psycopg.errors.InsufficientPrivilege):
        return EventStoreError(
            f"PostgreSQL at {server} refused access ({said}) while {doing}; grant the user "
            "rights on the trio_es tables"
        )
    return EventStoreError(f"PostgreSQL at {server} failed while {doing}: {said}")


async def connect(conninfo: str, *, application_name: str = "trio_es") -> PooledConnection:
    """A new autocommit connection to ``conninfo``, made in a worker thread (cancellable).

    ``application_name`` is the default name the session shows in ``pg_stat_activity``;
    one given in the DSN wins.

    Raises:
        TransactionFailed: the server cannot be reached (retryable).
    """
    handoff = Handoff(application_name)
    try:
        raw = await trio.to_thread.run_sync(handoff.connect, conninfo, abandon_on_cancel=True)
    except trio.Cancelled:
        handoff.abandon()
        raise
    except psycopg.Error as error:
        raise TransactionFailed(
            f"cannot connect to PostgreSQL at {describe_server(conninfo)} "
            f"({first_line(error)}); check that the server is up and the DSN is right"
        ) from error
    return PooledConnection(raw, handoff.backend)


def keep_session_open(raw: Connection) -> None:
    """Set up a long-lived session (a listener, a lease): kept while idle, ended soon
    after its client's machine vanished.

    Such a session is idle by design; a server that ends idle sessions (PostgreSQL 14+)
    would otherwise make a watch reconnect, or a projection lose its lease, every time.
    The server's TCP keepalives (and ``tcp_user_timeout``) are shortened so that a lease
    whose machine vanished (a power cut, a network partition) is released within about
    7 s, not after the kernel's two hours; then a standby takes over within the 10 s the
    projections promise. Any user may set these; they do nothing on a Unix socket.
    """
    raw.execute(
        f"SET tcp_keepalives_idle = {_KEEPALIVE_IDLE_S}; "
        f"SET tcp_keepalives_interval = {_KEEPALIVE_INTERVAL_S}; "
        f"SET tcp_keepalives_count = {_KEEPALIVE_COUNT}; "
        f"SET tcp_user_timeout = {_USER_TIMEOUT_MS}"
    )
    if raw.info.server_version >= 140000:
        raw.execute("SET idle_session_timeout = 0")


# Idle 4 s, then 3 probes 1 s apart: a silent peer is given up after about 7 s.
_KEEPALIVE_IDLE_S: Final = 4
_KEEPALIVE_INTERVAL_S: Final = 1
_KEEPALIVE_COUNT: Final = 3
_USER_TIMEOUT_MS: Final = 7_000

"""SQLite connections used from Trio: one worker thread at a time, interrupted on cancel.

The SQLite store's writer and reader and each projection lease's connection are
:class:`Connection` objects. A thread call is never abandoned (its connection would be
left mid-way): when the calling task is cancelled, the running statement is interrupted
(``sqlite3.Connection.interrupt``), a wait for another process's lock stops, whatever
was begun is rolled back, and only then is ``trio.Cancelled`` raised.

Each connection's calls run on a thread of its own that lives as long as the connection
is used (:class:`_Worker`): handing a call to a thread that waits on a queue costs about
half of what starting one through Trio's thread cache does, and a SQLite commit is
shorter than either hop.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar

import attrs
import outcome
import trio

from ._errors import EventStoreError, TransactionFailed

__all__ = [
    "BUSY_SLICE_MS",
    "CLOSE_TIMEOUT_S",
    "Connection",
    "Interrupt",
    "Interrupted",
    "begin_immediate",
    "error_code",
    "rollback",
    "translate_error",
]

logger: Final = logging.getLogger("trio_es.sqlite_store")

T = TypeVar("T")

# SQLite's busy handler sleeps without looking at sqlite3_interrupt, so a writer waiting
# for another process's lock could not be cancelled for busy_timeout_ms. The writer's own
# busy timeout is therefore a short slice, and the store retries BEGIN IMMEDIATE until
# busy_timeout_ms is spent, checking for cancellation between slices.
BUSY_SLICE_MS: Final = 50
# How long closing may wait for a thread call still running on a connection.
CLOSE_TIMEOUT_S: Final = 30.0


# A connection's thread ends after this long without a call (the next call starts a new
# one), so that a connection nobody closed does not keep a thread forever.
_WORKER_IDLE_S: Final = 10.0


@attrs.define(eq=False)
class _Worker:
    """One long-lived thread running a connection's calls in the order they are handed in.

    The Trio side hands a call over with a queue ``put`` (no thread start, no cache
    lookup); the thread reports back with ``run_sync_soon``, as ``to_thread`` does.
    """

    name: str
    _jobs: queue.SimpleQueue[Callable[[], None]] = attrs.Factory(queue.SimpleQueue)
    #: Guards starting a thread against the thread's decision to end when idle.
    _lock: threading.Lock = attrs.Factory(threading.Lock)
    _running: bool = False

    def start(self) -> None:
        """Start the thread now if none runs, so that the first call does not wait for it."""
        with self._lock:
            self._start()

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job()`` on the thread; it must not raise (it reports its own outcome)."""
        with self._lock:
            self._jobs.put(job)
            self._start()

    def _start(self) -> None:
        if not self._running:
            self._running = True
            threading.Thread(target=self._serve, name=self.name, daemon=True).start()

    def _serve(self) -> None:
        jobs = self._jobs
        while True:
            try:
                job = jobs.get(timeout=_WORKER_IDLE_S)
            except queue.Empty:
                with self._lock:
                    # A job put after the timeout but before the lock still finds a thread.
                    if jobs.empty():
                        self._running = False
                        return
                continue
            try:
                job()
            except BaseException:  # pragma: no cover - jobs catch their own errors
                logger.exception("a SQLite worker job failed to report its outcome")


class Interrupted(Exception):
    """A worker thread stopped because the calling task was cancelled.

    Raised by a thread function that saw :attr:`Interrupt.requested`; :meth:`Connection.run`
    turns it into the task's ``Cancelled``.
    """


@attrs.define(eq=False)
class Interrupt:
    """Set from the Trio thread when the caller is cancelled; read by the worker thread."""

    requested: bool = False


def error_code(error: sqlite3.Error) -> int | None:
    """SQLite's primary result code of ``error`` (e.g. ``SQLITE_BUSY``), if it has one."""
    code = getattr(error, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


@attrs.define(eq=False)
class Connection:
    """One sqlite3 connection and the limiter that lets one thread use it at a time.

    Attributes:
        raw: the connection, opened with ``check_same_thread=False``.
        role: what it is for, in thread names (``"writer"``, ``"reader"``, ``"lease"``).
        closed_message: the error message of a call after :meth:`close`.
    """

    raw: sqlite3.Connection
    role: str
    limiter: trio.CapacityLimiter = attrs.Factory(lambda: trio.CapacityLimiter(1))
    closed: bool = False
    closed_message: str = "the store is closed; open it again with SqliteStore.open"
    _worker: _Worker = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._worker = _Worker(f"trio_es sqlite {self.role}")
        # Started with the connection: a store's first call after opening is often the one
        # a caller waits for (a cold load).
        self._worker.start()

    async def run(self, fn: Callable[[sqlite3.Connection, Interrupt], T]) -> T:
        """Run ``fn(connection, interrupt)`` in a worker thread; cancellation interrupts it.

        This is ``trio.to_thread.run_sync(..., abandon_on_cancel=False)`` plus a hook:
        ``to_thread`` gives no way to react to a cancellation while the thread runs, and
        a watcher task per call would double the cost of each hop. So it is built from
        the primitives ``to_thread`` uses, on the connection's own thread.
        """
        interrupt = Interrupt()
        connection = self.raw
        # Free in all but a rare case (a call still running for another task): taken
        # without the scheduling point ``async with`` costs, since the wait for the thread
        # below is one; a cancellation point first, as acquiring would make.
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            self.limiter.acquire_nowait()
        except trio.WouldBlock:
            await self.limiter.acquire()
        try:
            if self.closed:
                raise EventStoreError(self.closed_message)
            task = trio.lowlevel.current_task()
            token = trio.lowlevel.current_trio_token()

            def deliver(result: outcome.Outcome[T]) -> None:
                # The run may have ended meanwhile; then nobody waits for the result.
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(trio.lowlevel.reschedule, task, result)

            def abort(_: Any) -> trio.lowlevel.Abort:
                interrupt.requested = True
                with contextlib.suppress(sqlite3.ProgrammingError):  # already closed
                    connection.interrupt()
                # Keep waiting: the thread rolls back and returns, then Cancelled is
                # raised at the next checkpoint.
                return trio.lowlevel.Abort.FAILED

            def job() -> None:
                deliver(outcome.capture(fn, connection, interrupt))

            self._worker.submit(job)
            try:
                return await trio.lowlevel.wait_task_rescheduled(abort)  # type: ignore[no-any-return]
            except (Interrupted, sqlite3.OperationalError) as error:
                if not interrupt.requested or (
                    isinstance(error, sqlite3.OperationalError)
                    and error_code(error) != sqlite3.SQLITE_INTERRUPT
                ):
                    raise
        finally:
            self.limiter.release()
        # Cancelled is pending for this task, so this raises it.
        await trio.lowlevel.checkpoint()
        raise EventStoreError("a SQLite call was interrupted although nothing cancelled it")

    async def close(self) -> None:
        """Close the connection once no thread uses it; later calls raise."""
        async with self.limiter:
            if not self.closed:
                self.closed = True
                await trio.to_thread.run_sync(self.raw.close)


def translate_error(
    error: sqlite3.Error, *, doing: str, path: str, busy_timeout_ms: int
) -> Exception:
    """A sqlite3 error as the trio_es error callers handle, keeping SQLite's words."""
    code = error_code(error)
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return TransactionFailed(
            f"the SQLite database {path!r} stayed locked by another connection for "
            f"busy_timeout_ms={busy_timeout_ms} while {doing}; retry, or raise busy_timeout_ms"
        )
    if code == sqlite3.SQLITE_NOTADB:
        return EventStoreError(
            f"{path!r} is not a SQLite database ({error}); open a SQLite file or a new path"
        )
    if code == sqlite3.SQLITE_CORRUPT:
        return EventStoreError(
            f"the SQLite database {path!r} is corrupt ({error}) while {doing}; restore it "
            "from a backup"
        )
    if code == sqlite3.SQLITE_FULL:
        return EventStoreError(f"the disk holding {path!r} is full while {doing}; free space")
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM):
        return EventStoreError(
            f"cannot write or open the SQLite database {path!r} ({error}) while {doing}; "
            "check the path and its permissions"
        )
    return EventStoreError(f"SQLite failed while {doing} on {path!r}: {error}")


def rollback(connection: sqlite3.Connection) -> None:
    """Roll back the open transaction, if any (in the worker thread)."""
    if not connection.in_transaction:
        return
    try:
        connection.execute("ROLLBACK")
    except sqlite3.Error:  # pragma: no cover - SQLite rolls back on close anyway
        logger.exception("ROLLBACK failed; SQLite rolls the transaction back on close")


def begin_immediate(
    connection: sqlite3.Connection, interrupt: Interrupt, busy_timeout_ms: int
) -> None:
    """``BEGIN IMMEDIATE``, waiting up to ``busy_timeout_ms`` for the write lock.

    The connection's own busy timeout must be a short slice (:data:`BUSY_SLICE_MS`): the
    wait is retried slice by slice, and stops with :class:`Interrupted` when the caller
    is cancelled.
    """
    # time.monotonic, not Trio's clock: this runs in a worker thread and stands in for
    # SQLite's own busy timeout, which counts wall time too.
    deadline = time.monotonic() + busy_timeout_ms / 1000
    while True:
        if interrupt.requested:
            raise Interrupted
        try:
            connection.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as error:
            if error_code(error) != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                raise

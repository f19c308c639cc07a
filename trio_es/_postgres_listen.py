"""Wake-ups for subscribers of a PostgreSQL store: LISTEN/NOTIFY, with polling behind it.

Every commit that inserts events runs ``pg_notify(channel, last position)`` in its own
transaction (see ``_postgres_store._commit``), so PostgreSQL announces it to every
listening session when, and only when, it commits, and only once it is visible to
new snapshots. Each :class:`PostgresWatch` has a connection of its own that runs
``LISTEN`` and is then only read from.

No thread waits on that connection: the listener task waits until the socket is
readable (``trio.lowlevel.wait_readable``), then has libpq take in what arrived
(``PQconsumeInput``, which never blocks: libpq keeps its socket non-blocking) and hands
out the notifications. Cancelling the task is an ordinary Trio cancellation.

What wakes a waiting subscriber, whichever comes first:

* a commit through the same store object (its in-process head, at once);
* a notification announcing a position beyond the subscriber's;
* the LISTEN connection coming back after it was lost: the commits in between were
  announced to nobody, so the next wait returns at once and the subscriber reads
  from its own position (nothing is missed, since it reads rather than trusts the
  notifications);
* the store's ``poll_interval`` passing: the fallback while the connection is down
  (it is reconnected with back-off), or a notification that never came.
"""

from __future__ import annotations

import functools
import logging
import operator
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final, final

import attrs
import psycopg
import trio
from psycopg import sql
from psycopg.pq import ConnStatus

from ._errors import TransactionFailed
from ._postgres_connection import (
    CLEANUP_SECONDS,
    Backend,
    Connection,
    PooledConnection,
    connect,
    first_line,
    keep_session_open,
)
from ._trio_util import AsyncValue, async_value, background
from ._validated import check_int

__all__ = ["LISTEN_APPLICATION_NAME", "PostgresWatch", "open_watch"]

logger: Final = logging.getLogger("trio_es.postgres_store")

#: The ``application_name`` of listener sessions, unless the DSN names one.
LISTEN_APPLICATION_NAME: Final = "trio_es_listen"
#: The first pause (seconds) before reconnecting a lost LISTEN connection; it doubles.
_RECONNECT_MIN_SECONDS: Final = 0.05
#: The longest pause (seconds) between two reconnection attempts.
_RECONNECT_MAX_SECONDS: Final = 5.0
#: What a notification whose payload is not a position announces: anything may be new.
_ANYTHING: Final = 2**63 - 1


@final
@attrs.define(eq=False)
class PostgresWatch:
    """Wake-ups for one subscriber of a :class:`~trio_es.postgres_store.PostgresStore`.

    Made by :meth:`PostgresStore.watch <trio_es.postgres_store.PostgresStore.watch>`; see
    :class:`trio_es._store.Watch` for the contract.
    """

    _head: AsyncValue[int]
    _poll_interval: float
    #: Rung whenever something a waiter checks may have changed.
    _bell: AsyncValue[int] = attrs.Factory(lambda: async_value(0))
    #: The highest position announced since a wait last returned.
    _announced: int = 0
    #: The LISTEN connection came back since a wait last returned: catch up.
    _missed: bool = False
    #: The server session that listens now (``None`` while there is none).
    backend: Backend | None = None

    async def wait(self, after: int) -> None:
        """Return once events after global position ``after`` may have been committed.

        At once when this store object committed beyond ``after``, when a notification
        beyond it arrived since the previous wait returned, or when the listener
        reconnected since then; else on the next of these, and after the store's
        ``poll_interval`` at the latest.

        Raises:
            TypeError, NonPositiveArgument: ``after`` is not an int >= 0.
        """
        after = check_int("after", after, minimum=0)
        with trio.move_on_after(self._poll_interval):
            await self._bell.wait_value(lambda _: self._ready(after))
        # Announcements that arrive from here on are for the subscriber's next wait.
        self._announced = 0
        self._missed = False

    def _ready(self, after: int) -> bool:
        return self._missed or self._head.value > after or self._announced > after

    def _ring(self) -> None:
        self._bell.value = self._bell.value + 1

    def _announce(self, position: int) -> None:
        if position > self._announced:
            self._announced = position
        self._ring()

    async def _follow_head(self) -> None:
        """Ring whenever this store object commits (a subscriber may wait on it)."""
        while True:
            await self._head.wait_value(functools.partial(operator.ne, self._head.value))
            self._ring()

    async def _listen(
        self,
        conninfo: str,
        channel: str,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keep a LISTEN connection open and pass its notifications on; never raises
        (but ``Cancelled``).

        Reports ``started`` once the first LISTEN is in place, or after the first
        attempt failed (the subscriber then runs on polling until a later one works).
        """
        listen = sql.SQL("LISTEN {}").format(sql.Identifier(channel))
        started = False
        delay = _RECONNECT_MIN_SECONDS
        failures = 0
        while True:
            conn: PooledConnection | None = None
            try:
                conn = await connect(conninfo, application_name=LISTEN_APPLICATION_NAME)
                await conn.run(lambda raw, _: _start_listening(raw, listen))
                self.backend = conn.backend
                if started:
                    logger.info("listening to %s again; subscribers catch up", channel)
                    self._missed = True
                    self._ring()
                else:
                    started = True
                    task_status.started()
                delay, failures = _RECONNECT_MIN_SECONDS, 0
                await self._receive(conn)
            except Exception as error:  # a lost connection, or anything: start again
                failures += 1
                # An outage would log every attempt: the first one says it all.
                logger.log(
                    logging.WARNING if failures == 1 else logging.DEBUG,
                    "no LISTEN connection for %s (%s); polling every %s s and reconnecting",
                    channel,
                    first_line(error),
                    self._poll_interval,
                    exc_info=not isinstance(error, psycopg.Error | TransactionFailed),
                )
            finally:
                self.backend = None
                if conn is not None:
                    with trio.move_on_after(CLEANUP_SECONDS, shield=True):
                        await trio.to_thread.run_sync(conn.discard, abandon_on_cancel=True)
            if not started:
                started = True
                task_status.started()
            await trio.sleep(delay)
            delay = min(delay * 2, _RECONNECT_MAX_SECONDS)

    async def _receive(self, conn: PooledConnection) -> None:
        """Hand out notifications until the connection breaks (raises ``psycopg.Error``).

        Runs in the Trio thread: nothing else uses the connection after LISTEN, and
        libpq only reads what already arrived.
        """
        pgconn = conn.raw.pgconn
        socket = pgconn.socket
        while True:
            pgconn.consume_input()  # raises OperationalError once the server is gone
            announced = 0
            while (notification := pgconn.notifies()) is not None:
                announced = max(announced, _position(notification.extra))
            if announced:
                self._announce(announced)
            if pgconn.status != ConnStatus.OK:
                raise psycopg.OperationalError("the LISTEN connection broke")
            await trio.lowlevel.wait_readable(socket)


def _start_listening(raw: Connection, listen: sql.Composed) -> None:
    keep_session_open(raw)
    raw.execute(listen)


def _position(payload: bytes) -> int:
    """The position a notification announces (anything, if the payload is no position)."""
    try:
        return max(int(payload.decode("ascii")), 1)
    except (UnicodeDecodeError, ValueError):
        return _ANYTHING


@asynccontextmanager
async def open_watch(
    conninfo: str, channel: str, head: AsyncValue[int], poll_interval: float
) -> AsyncIterator[PostgresWatch]:
    """Yield a :class:`PostgresWatch` listening on ``channel``; stop listening on exit.

    LISTEN is in place before the watch is yielded (unless the server cannot be reached
    right now), so a subscriber that reads after entering misses no announcement.
    """
    watch = PostgresWatch(head, poll_interval)
    # The background tasks never raise: an error comes from the subscriber's block.
    async with background() as nursery:
        await nursery.start(watch._listen, conninfo, channel)
        nursery.start_soon(watch._follow_head)
        yield watch

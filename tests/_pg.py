"""PostgreSQL test helpers: find the server (skip without one, fail on CI), fresh databases.

The server comes from ``TRIO_ES_TEST_POSTGRES_DSN``. Each test gets a database of its
own with a random name, force-dropped afterwards; the fixtures live in the test module
and use these helpers.

Creating and dropping a database each cost a checkpoint's worth of disk I/O, which on
a busy machine is most of a short test's time. :class:`Databases` therefore creates a
few databases ahead in worker threads and drops used ones in the background, so that
tests rarely wait for either (concurrent drops also share checkpoints).

:class:`FaultInjectingProxy` sits between a store and the server (on loopback only) and
loses a connection at the worst moments of a commit, as a network fault would.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import secrets
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
import trio
from psycopg import sql

import trio_es._postgres_store as pg_module
from trio_es._sql import EventRow

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
_PREFIX = "trio_es_test_"


def server_dsn() -> str:
    """The DSN of the test server's maintenance database (``postgres`` by default)."""
    return os.environ.get("TRIO_ES_TEST_POSTGRES_DSN", DEFAULT_DSN)


def connect(dsn: str, **kwargs: Any) -> psycopg.Connection[tuple[Any, ...]]:
    """A plain autocommit connection, for test setup and inspection."""
    return psycopg.connect(dsn, autocommit=True, connect_timeout=5, **kwargs)


def require_server() -> str:
    """The server DSN; skips the calling test when no server answers, fails when CI=true."""
    dsn = server_dsn()
    try:
        with connect(dsn) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as error:
        reason = f"no PostgreSQL server at TRIO_ES_TEST_POSTGRES_DSN={dsn!r}: {error}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: the PostgreSQL tests must run)")
        pytest.skip(reason)
    return dsn


def database_dsn(server: str, name: str) -> str:
    """``server`` pointing at database ``name`` instead."""
    return psycopg.conninfo.make_conninfo(server, dbname=name)


def create_database(server: str) -> str:
    """Create an empty UTF8 database with a random name; return the name."""
    name = f"{_PREFIX}{secrets.token_hex(6)}"
    with connect(server) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} ENCODING 'UTF8' TEMPLATE template0").format(
                sql.Identifier(name)
            )
        )
    return name


def drop_database(server: str, name: str) -> None:
    """Drop database ``name``, disconnecting whoever is still connected."""
    with connect(server) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@contextmanager
def fresh_database(server: str) -> Iterator[str]:
    """Create a database, yield its DSN, drop it: for tests that need one right now."""
    name = create_database(server)
    try:
        yield database_dsn(server, name)
    finally:
        drop_database(server, name)


class Databases:
    """Fresh databases made ahead of need, dropped in the background after use.

    Call :meth:`close` at the end: it waits for every drop and raises the first error.
    """

    def __init__(self, server: str, ahead: int = 2) -> None:
        self._server = server
        self._ahead = ahead
        self._workers = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="pg-db")
        self._ready: deque[concurrent.futures.Future[str]] = deque()
        self._drops: list[concurrent.futures.Future[None]] = []

    def _refill(self) -> None:
        while len(self._ready) < self._ahead:
            self._ready.append(self._workers.submit(create_database, self._server))

    @contextmanager
    def fresh(self) -> Iterator[str]:
        """Yield the DSN of an empty database of this session's own; drop it afterwards."""
        self._refill()
        name = self._ready.popleft().result()
        self._refill()
        try:
            yield database_dsn(self._server, name)
        finally:
            self._drops.append(self._workers.submit(drop_database, self._server, name))

    def close(self) -> None:
        """Drop the databases made ahead, wait for all drops, raise the first failure."""
        errors: list[BaseException] = []
        for made in self._ready:
            try:
                self._drops.append(self._workers.submit(drop_database, self._server, made.result()))
            except Exception as failure:
                errors.append(failure)
        self._ready.clear()
        self._workers.shutdown(wait=True)
        errors.extend(e for drop in self._drops if (e := drop.exception()) is not None)
        if errors:
            raise errors[0]


#: The server's reply to a successful COMMIT: CommandComplete, length 11, tag "COMMIT".
_COMMIT_COMPLETE = b"C\x00\x00\x00\x0bCOMMIT\x00"
#: ReadyForQuery (length 5) in a failed transaction: the COMMIT was skipped after an error.
_READY_FAILED = b"Z\x00\x00\x00\x05E"
#: ReadyForQuery (length 5), idle: a statement sent without BEGIN committed or rolled back.
_READY_IDLE = b"Z\x00\x00\x00\x05I"
#: CommandComplete (length 15) of an INSERT of one row.
_INSERT_ONE = b"C\x00\x00\x00\x0fINSERT 0 1\x00"
#: The name in a Parse message of a statement that commits itself (the store's commit of a
#: lone event, see ``_commit_alone_statement``): its later runs carry only the name.
_SELF_COMMITTING = re.compile(rb"(trio_es_[0-9a-f]+)\x00WITH commit_lock")


async def serve_proxy(
    dsn: str, handle: Callable[[trio.SocketStream], Awaitable[None]], task_status: Any
) -> None:
    """Serve ``handle`` on a free loopback port; ``started`` gets ``dsn`` pointed at it.

    SSL is switched off in that DSN, so that a proxy can see the messages.
    """
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    task_status.started(
        psycopg.conninfo.make_conninfo(dsn, host="127.0.0.1", port=str(port), sslmode="disable")
    )
    await trio.serve_listeners(handle, listeners)


class FaultInjectingProxy:
    """A TCP proxy to the test server that loses one connection around its next COMMIT.

    Run :meth:`serve` in a nursery (``dsn = await nursery.start(proxy.serve)``) and open
    the store on the DSN it returns. :meth:`drop_at_next_commit` arms one fault:

    * ``landed=True``: the COMMIT reaches the server and commits, then the connection is
      cut before the client hears the reply (a COMMIT the server skipped after an error
      passes, and the fault waits for the next one);
    * ``landed=False``: the connection is cut as the COMMIT is sent, before the server
      gets it (the server rolls back when it notices).

    A statement that commits itself (the store's commit of a lone event) counts as a
    COMMIT: it lands once the server says it is idle after the insert.

    With :attr:`refuse` set, new connections are closed at once: the server looks down.
    :attr:`refuse_after_drop` sets it when the fault is injected, and cuts every other
    connection too, as a network outage would.
    SSL is switched off in the DSN so that the proxy can see the statements.
    """

    def __init__(self, dsn: str) -> None:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
        self._dsn = dsn
        self._host = str(params.get("host") or "127.0.0.1")
        self._port = int(params.get("port") or 5432)
        self._armed: bool | None = None
        #: Close new connections at once (set it, e.g., right after a drop).
        self.refuse = False
        #: Set new connections to be refused as soon as a fault was injected.
        self.refuse_after_drop = False
        #: How many connections were cut.
        self.drops = 0
        self._connections: set[trio.CancelScope] = set()
        #: Names of the prepared statements that commit themselves, as Parse messages gave them.
        self._self_committing: set[bytes] = set()

    def _commits(self, data: bytes | bytearray) -> bool:
        """Whether ``data`` (from the client) carries a COMMIT or a statement committing itself."""
        self._self_committing.update(_SELF_COMMITTING.findall(data))
        return b"COMMIT\x00" in data or any(
            name + b"\x00" in data for name in self._self_committing
        )

    def drop_at_next_commit(self, *, landed: bool) -> None:
        """Cut the connection that sends the next COMMIT (after it ``landed`` or before)."""
        self._armed = landed

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Accept connections on a free loopback port; report the DSN through ``started``."""
        await serve_proxy(self._dsn, self._handle, task_status)

    def _dropped(self) -> None:
        self.drops += 1
        if self.refuse_after_drop:
            self.refuse = True
            for connection in self._connections:
                connection.cancel()

    async def _handle(self, client: trio.SocketStream) -> None:
        if self.refuse:
            await client.aclose()
            return
        server = await trio.open_tcp_stream(self._host, self._port)
        commit_sent = False
        async with client, server, trio.open_nursery() as nursery:

            async def upstream() -> None:
                nonlocal commit_sent
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    async for data in client:
                        if self._commits(data) and self._armed is not None:
                            landed, self._armed = self._armed, None
                            if not landed:
                                self._dropped()
                                break
                            commit_sent = True
                        await server.send_all(data)
                nursery.cancel_scope.cancel()

            async def downstream() -> None:
                nonlocal commit_sent
                reply = b""
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    async for data in server:
                        if commit_sent:
                            # Hold the reply back; once it says COMMIT, cut the connection.
                            reply += data
                            if _COMMIT_COMPLETE in reply or (
                                _INSERT_ONE in reply and _READY_IDLE in reply
                            ):
                                self._dropped()
                                break
                            if _READY_FAILED in reply or _READY_IDLE in reply:
                                commit_sent, self._armed = False, True
                                await client.send_all(reply)
                                reply = b""
                            continue
                        await client.send_all(data)
                nursery.cancel_scope.cancel()

            self._connections.add(nursery.cancel_scope)
            try:
                nursery.start_soon(upstream)
                nursery.start_soon(downstream)
                await trio.sleep_forever()
            finally:
                self._connections.discard(nursery.cancel_scope)


def commit_plan(store: Any, expected: dict[str, int], events: dict[str, int]) -> Any:
    """A commit plan expecting ``expected`` and appending ``events[id]`` events to each id."""
    rows = [
        EventRow(
            aggregate_id,
            sequence,
            "conformance.Added",
            1,
            f'{{"amount": {sequence}}}',
            "[]",
            uuid.uuid4(),
        )
        for aggregate_id, count in events.items()
        for sequence in range(expected[aggregate_id] + 1, expected[aggregate_id] + count + 1)
    ]
    return pg_module._Commit(
        store._statements,
        "default",
        store._lock_key,
        expected,
        rows,
        [],
        store._channel,
        store._notify,
    )

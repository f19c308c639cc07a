"""PostgreSQL test helpers: find the server (skip without one, fail on CI), fresh databases.

The server comes from ``TRIO_ES_TEST_POSTGRES_DSN``. Each test gets a database of its
own with a random name, force-dropped afterwards; the fixtures live in the test module
and use these helpers.

Creating and dropping a database each cost a checkpoint's worth of disk I/O, which on
a busy machine is most of a short test's time. :class:`Databases` therefore creates a
few databases ahead in worker threads and drops used ones in the background, so that
tests rarely wait for either (concurrent drops also share checkpoints).
"""

from __future__ import annotations

import concurrent.futures
import os
import secrets
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from psycopg import sql

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

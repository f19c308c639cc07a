"""Where each store keeps its data during a run, and how each library opens it.

A :class:`Location` is one empty place for one library's data: a fresh SQLite file in
the run's temporary directory, a freshly reset schema in the run's own PostgreSQL
database, or (for memory) a slot holding the in-process store. Every measurement gets
a fresh location, except R1, which loads from the location its setup wrote.

The harness only uses the stores' public ``open`` methods and the ``EventStore``
protocol, never their internals.

Durability: trio_es's SQLite store is opened with ``synchronous="FULL"`` (its
default: WAL, and every acknowledged commit survives a power cut). The peer's SQLite
module puts the file in WAL mode and leaves ``synchronous`` at SQLite's default
(FULL in the builds this harness reports on; see :func:`sqlite_default_synchronous`).
PostgreSQL runs with the server's settings for both (``synchronous_commit`` is
reported in the machine description).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import sqlite3
import tempfile
from collections.abc import Iterator
from typing import Any, Final

__all__ = [
    "Location",
    "PostgresSpace",
    "SqliteSpace",
    "postgres_reachable",
    "sqlite_default_synchronous",
]

_SYNCHRONOUS_NAMES: Final = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}


@dataclasses.dataclass
class Location:
    """One library's data for one measurement.

    Attributes:
        kind: ``memory``, ``sqlite`` or ``postgres``.
        sqlite_path: the SQLite file (``sqlite`` only).
        postgres_dsn: the database (``postgres`` only).
        shared: in-process objects that must outlive one system (``memory``: the store).
    """

    kind: str
    sqlite_path: str | None = None
    postgres_dsn: str | None = None
    shared: dict[str, Any] = dataclasses.field(default_factory=dict)


def sqlite_default_synchronous() -> str:
    """SQLite's default ``PRAGMA synchronous`` in this build (what the peer runs with)."""
    with contextlib.closing(sqlite3.connect(":memory:")) as connection:
        value = connection.execute("PRAGMA synchronous").fetchone()[0]
    return _SYNCHRONOUS_NAMES.get(int(value), str(value))


@dataclasses.dataclass
class SqliteSpace:
    """A temporary directory holding one SQLite file per measurement."""

    directory: str
    _count: int = 0

    @classmethod
    @contextlib.contextmanager
    def create(cls) -> Iterator[SqliteSpace]:
        """A space in a new temporary directory, removed with everything in it on exit."""
        with tempfile.TemporaryDirectory(prefix="trio_es_bench_") as directory:
            yield cls(directory)

    def fresh(self, label: str) -> Location:
        """A new, not yet existing database file."""
        self._count += 1
        return Location(
            "sqlite", sqlite_path=os.path.join(self.directory, f"{label}-{self._count}.db")
        )

    def discard(self, location: Location) -> None:
        """Delete the location's database file and its WAL companions."""
        assert location.sqlite_path is not None
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(location.sqlite_path + suffix)


def postgres_reachable(dsn: str) -> str | None:
    """``None`` when the server answers at ``dsn``, else why not."""
    try:
        import psycopg
    except ImportError:
        return "psycopg is not installed"
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error as error:
        return f"no PostgreSQL server at {dsn!r}: {str(error).strip()}"
    return None


@dataclasses.dataclass
class PostgresSpace:
    """A database of the run's own, with a random name; each measurement resets it.

    The database is created on entry and dropped (with ``FORCE``) on exit. A fresh
    location is the same database with its ``public`` schema dropped and recreated,
    which removes every table, type and function either library created.
    """

    server_dsn: str
    database: str
    dsn: str

    @classmethod
    @contextlib.contextmanager
    def create(cls, server_dsn: str) -> Iterator[PostgresSpace]:
        """Create the database on the server at ``server_dsn``; drop it on exit."""
        import psycopg
        from psycopg import sql

        database = f"trio_es_bench_{secrets.token_hex(6)}"
        with psycopg.connect(server_dsn, autocommit=True, connect_timeout=5) as connection:
            connection.execute(
                sql.SQL("CREATE DATABASE {} ENCODING 'UTF8' TEMPLATE template0").format(
                    sql.Identifier(database)
                )
            )
        try:
            yield cls(
                server_dsn, database, psycopg.conninfo.make_conninfo(server_dsn, dbname=database)
            )
        finally:
            with psycopg.connect(server_dsn, autocommit=True, connect_timeout=5) as connection:
                connection.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(database)
                    )
                )

    def fresh(self, label: str) -> Location:
        """The database, emptied: nothing either library wrote before is left."""
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as connection:
            connection.execute("DROP SCHEMA IF EXISTS public CASCADE")
            connection.execute("CREATE SCHEMA public")
        return Location("postgres", postgres_dsn=self.dsn)

    def settle(self) -> None:
        """``VACUUM ANALYZE`` the database: rows written in bulk become as a later read finds them.

        The first scan of freshly written rows sets their hint bits (writing the pages
        again) and the planner has no statistics for new tables yet; autovacuum would
        have done both for events written a while ago. Settling after a bulk fill keeps
        that one-off cost out of whichever library happens to read first.
        """
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as connection:
            connection.execute("VACUUM ANALYZE")

    def peer_env(self) -> dict[str, str]:
        """The peer's PostgreSQL settings (its ``POSTGRES_*`` variables) for this database."""
        import psycopg

        parts = psycopg.conninfo.conninfo_to_dict(self.dsn)
        return {
            "POSTGRES_DBNAME": str(parts.get("dbname", self.database)),
            "POSTGRES_HOST": str(parts.get("host", "127.0.0.1")),
            "POSTGRES_PORT": str(parts.get("port", "5432")),
            "POSTGRES_USER": str(parts.get("user", "postgres")),
            "POSTGRES_PASSWORD": str(parts.get("password", "")),
        }

    def server_settings(self) -> dict[str, str]:
        """The server's version and the settings that decide commit durability."""
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as connection:
            settings = {}
            for name in ("server_version", "synchronous_commit", "fsync", "wal_sync_method"):
                row = connection.execute(f"SHOW {name}").fetchone()
                settings[name] = str(row[0]) if row else "?"
        return settings

"""The floor: what the database itself does with the same rows, without any library.

Rows are what trio_es keeps for a deposit (its documented ``events`` layout: aggregate
type and id, sequence, event type and version, JSON payload, JSON metadata, UTC
timestamp), in a table with the same keys (an integer primary key in commit order and
a unique ``(aggregate_type, aggregate_id, sequence)``), written by plain ``sqlite3`` or
``psycopg`` calls:

- **one row per transaction**: what a store without group commit must do per command;
- **batched**: ``floor_batch`` rows per transaction, the most a group commit could
  gather from the same number of concurrent callers as W3.

SQLite uses the durability of trio_es's store (WAL, ``synchronous=FULL``); PostgreSQL
uses the server's settings. The rows are spread over 1,000 aggregates like W3's.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import sqlite3
import time
from collections.abc import Iterator, Sequence
from typing import Any, Final

__all__ = ["postgres_floor", "rows", "sqlite_floor"]

_AGGREGATES: Final = 1_000

Row = tuple[str, str, int, str, int, str, str, str]

_SQLITE_DDL: Final = (
    "CREATE TABLE floor_events ("
    " global_position INTEGER PRIMARY KEY,"
    " aggregate_type TEXT NOT NULL, aggregate_id TEXT NOT NULL, sequence INTEGER NOT NULL,"
    " event_type TEXT NOT NULL, event_version INTEGER NOT NULL,"
    " payload TEXT NOT NULL, metadata TEXT NOT NULL, recorded_at TEXT NOT NULL,"
    " UNIQUE (aggregate_type, aggregate_id, sequence))"
)
_POSTGRES_DDL: Final = (
    "CREATE TABLE floor_events ("
    " global_position BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
    " aggregate_type TEXT NOT NULL, aggregate_id TEXT NOT NULL, sequence BIGINT NOT NULL,"
    " event_type TEXT NOT NULL, event_version BIGINT NOT NULL,"
    " payload JSONB NOT NULL, metadata JSONB NOT NULL, recorded_at TIMESTAMPTZ NOT NULL,"
    " UNIQUE (aggregate_type, aggregate_id, sequence))"
)
_COLUMNS: Final = (
    "aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata,"
    " recorded_at"
)


def rows(count: int) -> list[Row]:
    """``count`` deposit rows over 1,000 aggregates, each aggregate's sequences from 1."""
    sequences: dict[str, int] = {}
    balances: dict[str, int] = {}
    recorded_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")
    result: list[Row] = []
    for i in range(count):
        aggregate_id = f"floor-{i % _AGGREGATES:05d}"
        sequence = sequences[aggregate_id] = sequences.get(aggregate_id, 0) + 1
        balance = balances[aggregate_id] = balances.get(aggregate_id, 0) + 7
        payload = json.dumps({"amount": 7, "balance": balance}, separators=(",", ":"))
        result.append(
            (
                "default",
                aggregate_id,
                sequence,
                "CustomerDepositedCash",
                1,
                payload,
                "[]",
                recorded_at,
            )
        )
    return result


def _chunks(values: Sequence[Row], size: int) -> Iterator[Sequence[Row]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def sqlite_floor(path: str, count: int, batch: int) -> float:
    """Rows per second inserting ``count`` rows, ``batch`` per transaction, into ``path``."""
    data = rows(count)
    insert = f"INSERT INTO floor_events ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as connection:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute(_SQLITE_DDL)
        started = time.perf_counter()
        for chunk in _chunks(data, batch):
            connection.execute("BEGIN IMMEDIATE")
            connection.executemany(insert, chunk)
            connection.execute("COMMIT")
        elapsed = time.perf_counter() - started
        stored = connection.execute("SELECT count(*) FROM floor_events").fetchone()[0]
    if stored != count:
        raise AssertionError(f"the SQLite floor stored {stored} rows, not {count}")
    return count / elapsed


def postgres_floor(dsn: str, count: int, batch: int) -> float:
    """Rows per second inserting ``count`` rows, ``batch`` per transaction, at ``dsn``."""
    import psycopg

    data = rows(count)
    insert = (
        f"INSERT INTO floor_events ({_COLUMNS})"
        " VALUES (%s, %s, %s, %s, %s, %s::jsonb, %s::jsonb, %s)"
    )
    connection: Any
    with psycopg.connect(dsn, connect_timeout=5) as connection:
        connection.execute(_POSTGRES_DDL)
        connection.commit()
        started = time.perf_counter()
        with connection.cursor() as cursor:
            for chunk in _chunks(data, batch):
                if len(chunk) == 1:
                    cursor.execute(insert, chunk[0], prepare=True)
                else:
                    cursor.executemany(insert, chunk)
                connection.commit()
        elapsed = time.perf_counter() - started
        row = connection.execute("SELECT count(*) FROM floor_events").fetchone()
        connection.execute("DROP TABLE floor_events")
        connection.commit()
    stored = row[0] if row else 0
    if stored != count:
        raise AssertionError(f"the PostgreSQL floor stored {stored} rows, not {count}")
    return count / elapsed

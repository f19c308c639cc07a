"""Read-only queries of a store's raw tables, for the ``trio-es`` inspector commands.

The inspector reads the tables :mod:`trio_es._sql` documents (``events``, ``snapshots``,
``trio_es_schema_version`` and ``trio_es_checkpoints``) with plain SQL, never through a
store: it must work without the application's event classes, so payloads and metadata
come back as the JSON that was stored, undecoded. It never writes: SQLite files are
opened with ``mode=ro`` (so a wrong path is reported, not created as an empty database),
and PostgreSQL sessions are set to ``default_transaction_read_only``.

Blocking driver calls run in Trio worker threads that are abandoned on cancellation:
an inspector holds no transaction open and writes nothing, so Ctrl-C need not wait for
a slow query or an unanswered connection attempt.

Failures a user can cause (a wrong path, a file that is not a store, an unreachable
server, an unknown aggregate) are raised as :class:`InspectError`, which carries a
one-sentence message and the command's exit status.
"""

from __future__ import annotations

import datetime
import json
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar, final

import attrs
import trio

from ._errors import EventStoreError
from ._sql import (
    CHECKPOINT_TABLE,
    SCHEMA_VERSION_TABLE,
    check_identifier,
    check_version_to_open,
    parse_utc,
)

__all__ = [
    "EXIT_FAILURE",
    "EXIT_NO_SUCH_FILE",
    "EXIT_NOT_A_STORE",
    "EXIT_UNKNOWN_AGGREGATE",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "EventRow",
    "InspectError",
    "Inspector",
    "ProjectionRow",
    "StoreStats",
    "StreamRow",
    "is_postgres_url",
]

#: A database error not covered by a more specific status (e.g. a query failed).
EXIT_FAILURE: Final = 1
#: Bad command line (argparse's status), or an aggregate id that needs ``--type``.
EXIT_USAGE: Final = 2
#: The SQLite path does not exist.
EXIT_NO_SUCH_FILE: Final = 3
#: The file or database is not a trio_es store (not SQLite, no trio_es tables, or a
#: schema version newer than this trio_es reads).
EXIT_NOT_A_STORE: Final = 4
#: The PostgreSQL server could not be reached (or refused the connection).
EXIT_UNREACHABLE: Final = 5
#: ``events``: no aggregate with that id is stored.
EXIT_UNKNOWN_AGGREGATE: Final = 6

T = TypeVar("T")

# Pages keep every query short and let ``streams`` report progress on big stores.
_PAGE_SIZE: Final = 1_000
_CONNECT_TIMEOUT_S: Final = 5


class InspectError(Exception):
    """A failure the user can act on: ``str(error)`` is the message, plus an exit status."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def is_postgres_url(store: str) -> bool:
    """Whether ``store`` names a PostgreSQL database rather than a SQLite file."""
    return store.startswith(("postgresql://", "postgres://"))


def _redacted(url: str) -> str:
    # Messages name the server as host:port/dbname: a password may sit in the user part
    # or in the query string, and messages land in logs. Only reached for PostgreSQL
    # URLs, where psycopg (which the store's helper parses with) is needed anyway.
    from ._postgres_store import _describe_server

    return _describe_server(url)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _timestamp(value: object) -> str:
    # SQLite keeps ISO text, PostgreSQL a timestamptz: both print as ISO 8601 in UTC.
    if not isinstance(value, str | datetime.datetime):
        raise TypeError(f"recorded_at must be text or a datetime (got {value!r})")
    return parse_utc(value).isoformat(timespec="microseconds")


def _json(value: object) -> object:
    # SQLite returns the stored text; PostgreSQL's jsonb is cast to text in the query.
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


@final
@attrs.frozen
class StreamRow:
    """One aggregate stream: its event count, last sequence, snapshot and last commit."""

    aggregate_type: str
    aggregate_id: str
    events: int
    last_sequence: int
    #: The sequence of the latest snapshot, ``None`` without one.
    snapshot_sequence: int | None
    last_recorded_at: str


@final
@attrs.frozen
class EventRow:
    """One stored event, payload and metadata decoded from JSON but not into classes."""

    global_position: int
    aggregate_type: str
    aggregate_id: str
    sequence: int
    event_type: str
    event_version: int
    recorded_at: str
    metadata: object
    payload: object
    #: ``None`` in a schema-version-1 table, which had no ``event_id`` column.
    event_id: str | None


@final
@attrs.frozen
class ProjectionRow:
    """One projection's stored checkpoint, against the head of its aggregate type."""

    aggregate_type: str
    name: str
    #: The checkpoint: the ``global_position`` of the last event the projection processed.
    position: int
    #: The highest ``global_position`` of the aggregate type, 0 when it has no events.
    head: int
    #: ``head - position`` (never below 0, as in ``projection_stats``): 0 when caught up.
    lag: int
    #: When the checkpoint was last written, ISO 8601 in UTC.
    updated_at: str


@final
@attrs.frozen
class StoreStats:
    """Totals over a store's tables."""

    schema_version: int
    events: int
    streams: int
    snapshots: int
    #: (event_type, count), most frequent first.
    event_types: tuple[tuple[str, int], ...]
    first_recorded_at: str | None
    last_recorded_at: str | None


class _Database(Protocol):
    """A blocking read-only connection; every method is called in a worker thread."""

    placeholder: str

    def json_text(self, column: str) -> str: ...

    def has_table(self, name: str) -> bool: ...

    def query(self, sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]: ...

    def close(self) -> None: ...


@attrs.define
class _Sqlite:
    path: str
    connection: sqlite3.Connection
    placeholder: str = "?"

    @classmethod
    def connect(cls, path: str) -> _Sqlite:
        file = Path(path)
        if not file.exists():
            raise InspectError(
                f"no such file: {path!r}; give the path of a trio_es SQLite store "
                "or a postgresql:// URL",
                EXIT_NO_SUCH_FILE,
            )
        if not file.is_file():
            raise InspectError(
                f"{path!r} is not a file; give the path of a trio_es SQLite store",
                EXIT_NOT_A_STORE,
            )
        # mode=ro: never create or change anything, even by accident.
        uri = f"{file.absolute().as_uri()}?mode=ro"
        try:
            connection = sqlite3.connect(uri, uri=True, check_same_thread=False)
        except sqlite3.Error as error:
            raise InspectError(
                f"cannot open {path!r} as SQLite ({_first_line(error)}); check the path "
                "and its permissions",
                EXIT_NOT_A_STORE,
            ) from None
        return cls(path, connection)

    def json_text(self, column: str) -> str:
        return column

    def has_table(self, name: str) -> bool:
        # SQLite compares table names case-insensitively, so the lookup does too.
        return bool(
            self.query(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND lower(name) = lower(?)",
                (name,),
            )
        )

    def query(self, sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
        try:
            return self.connection.execute(sql, tuple(params)).fetchall()
        except sqlite3.DatabaseError as error:
            message = _first_line(error)
            if "not a database" in message or "no such" in message:
                raise InspectError(
                    f"{self.path!r} is not a trio_es store ({message}); give the file a "
                    "trio_es SqliteStore writes, and --events-table if it is not 'events'",
                    EXIT_NOT_A_STORE,
                ) from None
            raise InspectError(f"reading {self.path!r} failed: {message}", EXIT_FAILURE) from None

    def close(self) -> None:
        self.connection.close()


@attrs.define
class _Postgres:
    url: str
    connection: Any
    placeholder: str = "%s"

    @classmethod
    def connect(cls, url: str) -> _Postgres:
        try:
            import psycopg
        except ImportError:
            raise InspectError(
                "reading PostgreSQL needs psycopg; install it with pip install 'trio_es[postgres]'",
                EXIT_FAILURE,
            ) from None
        try:
            connection = psycopg.connect(url, autocommit=True, connect_timeout=_CONNECT_TIMEOUT_S)
            connection.execute("SET default_transaction_read_only = on")
        except psycopg.Error as error:
            raise InspectError(
                f"cannot connect to PostgreSQL at {_redacted(url)} ({_first_line(error)}); "
                "check that the server runs and the URL's host, port, user and database",
                EXIT_UNREACHABLE,
            ) from None
        return cls(url, connection)

    def json_text(self, column: str) -> str:
        return f"{column}::text"

    def has_table(self, name: str) -> bool:
        # to_regclass resolves the name through search_path, as the store's unqualified
        # statements do, and gives NULL instead of an error when there is no such table.
        rows = self.query("SELECT to_regclass(%s) IS NOT NULL", (name,))
        return bool(rows[0][0])

    def query(self, sql: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
        import psycopg

        try:
            rows: list[tuple[Any, ...]] = self.connection.execute(sql, tuple(params)).fetchall()
        except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as error:
            raise InspectError(
                f"the database at {_redacted(self.url)} holds no trio_es store "
                f"({_first_line(error)}); give the database a trio_es PostgresStore writes, "
                "and --events-table if it is not 'events'",
                EXIT_NOT_A_STORE,
            ) from None
        except psycopg.OperationalError as error:
            raise InspectError(
                f"lost the connection to PostgreSQL at {_redacted(self.url)} "
                f"({_first_line(error)}); check that the server runs",
                EXIT_UNREACHABLE,
            ) from None
        except psycopg.Error as error:
            raise InspectError(
                f"reading {_redacted(self.url)} failed: {_first_line(error)}", EXIT_FAILURE
            ) from None
        return rows

    def close(self) -> None:
        self.connection.close()


@final
@attrs.define
class Inspector:
    """Read-only queries of one store's tables; open it with :meth:`open`."""

    _db: _Database
    _events: str
    _snapshots: str
    #: The layout version from ``trio_es_schema_version``.
    schema_version: int
    # One query at a time: an abandoned worker may still be running one after Ctrl-C.
    _lock: threading.Lock = attrs.field(factory=threading.Lock)

    @classmethod
    @asynccontextmanager
    async def open(
        cls, store: str, *, events_table: str = "events", snapshots_table: str | None = None
    ) -> AsyncIterator[Inspector]:
        """Connect to ``store`` (a SQLite path or a ``postgresql://`` URL) read-only.

        Raises:
            InspectError: no such file, not a store, unreachable server.
            ValueError: a table name is not a plain SQL identifier.
        """
        events = check_identifier(events_table, "--events-table")
        # None: the snapshots table the store itself recorded beside its events table.
        snapshots = (
            None
            if snapshots_table is None
            else check_identifier(snapshots_table, "--snapshots-table")
        )
        connect: Callable[[str], _Database] = (
            _Postgres.connect if is_postgres_url(store) else _Sqlite.connect
        )
        db = await trio.to_thread.run_sync(connect, store, abandon_on_cancel=True)
        inspector = cls(db, events, snapshots or "", 0)
        try:
            inspector.schema_version = await inspector._read_schema_version(
                store, snapshots is None
            )
            yield inspector
        finally:
            # A query abandoned by Ctrl-C may still hold the connection; the process is
            # about to exit then, which closes it anyway.
            if inspector._lock.acquire(blocking=False):
                try:
                    db.close()
                finally:
                    inspector._lock.release()

    async def _call(self, fn: Callable[[_Database], T]) -> T:
        def run() -> T:
            with self._lock:
                return fn(self._db)

        return await trio.to_thread.run_sync(run, abandon_on_cancel=True)

    async def _query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        return await self._call(lambda db: db.query(sql, params))

    async def _read_schema_version(self, store: str, recorded_snapshots: bool) -> int:
        p = self._db.placeholder
        where = _redacted(store) if is_postgres_url(store) else repr(store)
        rows = await self._query(
            f"SELECT version, snapshots_table FROM {SCHEMA_VERSION_TABLE} "
            f"WHERE lower(events_table) = lower({p})",
            (self._events,),
        )
        if not rows:
            raise InspectError(
                f"{where} has no trio_es events table named {self._events!r}; "
                "name the right one with --events-table",
                EXIT_NOT_A_STORE,
            )
        version, snapshots = rows[0]
        try:
            check_version_to_open(self._events, version, f"in {where}")
        except EventStoreError as error:
            raise InspectError(error.message, EXIT_NOT_A_STORE) from None
        if recorded_snapshots:
            self._snapshots = check_identifier(snapshots, "the recorded snapshots table")
        # Probe both tables now, so that a missing one fails before any output.
        await self._query(f"SELECT aggregate_type FROM {self._events} LIMIT 0")
        await self._query(f"SELECT aggregate_type FROM {self._snapshots} LIMIT 0")
        return int(version)

    async def count_streams(self) -> int:
        """The number of distinct (aggregate_type, aggregate_id) in the events table."""
        rows = await self._query(
            "SELECT COUNT(*) FROM (SELECT DISTINCT aggregate_type, aggregate_id "
            f"FROM {self._events}) AS streams"
        )
        return int(rows[0][0])

    async def streams(
        self,
        *,
        page_size: int = _PAGE_SIZE,
        progress: Callable[[int], None] | None = None,
    ) -> list[StreamRow]:
        """Every stream, ordered by (aggregate_type, aggregate_id).

        Args:
            page_size: streams per query (keyset pagination over the unique index).
            progress: called with the number of streams read after each page.
        """
        p = self._db.placeholder
        snapshots = {
            (row[0], row[1]): int(row[2])
            for row in await self._query(
                f"SELECT aggregate_type, aggregate_id, sequence FROM {self._snapshots}"
            )
        }
        select = (
            "SELECT aggregate_type, aggregate_id, COUNT(*), MAX(sequence), MAX(recorded_at) "
            f"FROM {self._events} "
        )
        group = (
            f"GROUP BY aggregate_type, aggregate_id ORDER BY aggregate_type, aggregate_id LIMIT {p}"
        )
        result: list[StreamRow] = []
        after: tuple[str, str] | None = None
        while True:
            if after is None:
                rows = await self._query(select + group, (page_size,))
            else:
                rows = await self._query(
                    f"{select}WHERE (aggregate_type, aggregate_id) > ({p}, {p}) {group}",
                    (*after, page_size),
                )
            result.extend(
                StreamRow(
                    aggregate_type=row[0],
                    aggregate_id=row[1],
                    events=int(row[2]),
                    last_sequence=int(row[3]),
                    snapshot_sequence=snapshots.get((row[0], row[1])),
                    last_recorded_at=_timestamp(row[4]),
                )
                for row in rows
            )
            if progress is not None:
                progress(len(result))
            if len(rows) < page_size:
                return result
            after = (rows[-1][0], rows[-1][1])

    def _event_columns(self) -> str:
        event_id = "event_id" if self.schema_version >= 2 else "NULL"
        return (
            "global_position, aggregate_type, aggregate_id, sequence, event_type, "
            f"event_version, recorded_at, {self._db.json_text('metadata')}, "
            f"{self._db.json_text('payload')}, {event_id}"
        )

    @staticmethod
    def _event(row: tuple[Any, ...]) -> EventRow:
        return EventRow(
            global_position=int(row[0]),
            aggregate_type=row[1],
            aggregate_id=row[2],
            sequence=int(row[3]),
            event_type=row[4],
            event_version=int(row[5]),
            recorded_at=_timestamp(row[6]),
            metadata=_json(row[7]),
            payload=_json(row[8]),
            event_id=None if row[9] is None else str(row[9]),
        )

    async def aggregate_types_of(self, aggregate_id: str) -> list[str]:
        """The aggregate types under which ``aggregate_id`` has events."""
        p = self._db.placeholder
        rows = await self._query(
            f"SELECT DISTINCT aggregate_type FROM {self._events} WHERE aggregate_id = {p} "
            "ORDER BY aggregate_type",
            (aggregate_id,),
        )
        return [row[0] for row in rows]

    async def events(
        self, aggregate_type: str, aggregate_id: str, *, start_from: int = 1
    ) -> list[EventRow]:
        """The stream's events with ``sequence >= start_from``, in sequence order."""
        p = self._db.placeholder
        result: list[EventRow] = []
        while True:
            rows = await self._query(
                f"SELECT {self._event_columns()} FROM {self._events} "
                f"WHERE aggregate_type = {p} AND aggregate_id = {p} AND sequence >= {p} "
                f"ORDER BY sequence LIMIT {p}",
                (aggregate_type, aggregate_id, start_from, _PAGE_SIZE),
            )
            result.extend(self._event(row) for row in rows)
            if len(rows) < _PAGE_SIZE:
                return result
            start_from = result[-1].sequence + 1

    async def last_position(self) -> int:
        """The highest global position stored, 0 for an empty table."""
        rows = await self._query(f"SELECT MAX(global_position) FROM {self._events}")
        return 0 if rows[0][0] is None else int(rows[0][0])

    async def events_after(self, position: int, *, limit: int = _PAGE_SIZE) -> list[EventRow]:
        """Up to ``limit`` events of every stream after global ``position``, in order.

        Positions increase in commit order (see :mod:`trio_es._sql`), so a reader that
        saw up to position *p* never later finds a new event at or below *p*.
        """
        p = self._db.placeholder
        rows = await self._query(
            f"SELECT {self._event_columns()} FROM {self._events} "
            f"WHERE global_position > {p} ORDER BY global_position LIMIT {p}",
            (position, limit),
        )
        return [self._event(row) for row in rows]

    async def stats(self) -> StoreStats:
        """Totals: events, streams, snapshots, event types, first and last commit times."""
        totals = await self._query(
            f"SELECT COUNT(*), MIN(recorded_at), MAX(recorded_at) FROM {self._events}"
        )
        count, first, last = totals[0]
        snapshots = await self._query(f"SELECT COUNT(*) FROM {self._snapshots}")
        types = await self._query(
            f"SELECT event_type, COUNT(*) FROM {self._events} "
            "GROUP BY event_type ORDER BY COUNT(*) DESC, event_type"
        )
        return StoreStats(
            schema_version=self.schema_version,
            events=int(count),
            streams=await self.count_streams(),
            snapshots=int(snapshots[0][0]),
            event_types=tuple((row[0], int(row[1])) for row in types),
            first_recorded_at=None if first is None else _timestamp(first),
            last_recorded_at=None if last is None else _timestamp(last),
        )

    async def projections(self, aggregate_type: str | None = None) -> list[ProjectionRow]:
        """The projections of this events table, ordered by aggregate type and name.

        Each is read from its checkpoint row, and compared with the head of its own
        aggregate type (projections follow one type, see :mod:`trio_es._sql`).

        Args:
            aggregate_type: only the projections of this type; ``None``: of every type.

        Returns:
            An empty list also for a store written before projections existed, which has
            no checkpoints table (the stores create it when they open).
        """
        if not await self._call(lambda db: db.has_table(CHECKPOINT_TABLE)):
            return []
        p = self._db.placeholder
        # The stores key checkpoint rows by the lower-cased events table name.
        params: list[object] = [self._events.lower()]
        of_type = ""
        if aggregate_type is not None:
            of_type = f" AND c.aggregate_type = {p}"
            params.append(aggregate_type)
        # ORDER BY ... LIMIT 1 reads one entry of the (type, position) index per row.
        rows = await self._query(
            "SELECT c.aggregate_type, c.name, c.position, c.updated_at, "
            f"(SELECT e.global_position FROM {self._events} AS e "
            "WHERE e.aggregate_type = c.aggregate_type "
            "ORDER BY e.global_position DESC LIMIT 1) "
            f"FROM {CHECKPOINT_TABLE} AS c WHERE c.events_table = {p}{of_type}",
            params,
        )
        result = []
        for kind, name, stored_position, updated_at, stored_head in rows:
            position = int(stored_position)
            head = 0 if stored_head is None else int(stored_head)
            result.append(
                ProjectionRow(
                    aggregate_type=kind,
                    name=name,
                    position=position,
                    head=head,
                    lag=max(head - position, 0),
                    updated_at=_timestamp(updated_at),
                )
            )
        # Sorted here, not in SQL: PostgreSQL's collation would order names differently
        # from SQLite's, and the command should print the same list from both.
        return sorted(result, key=lambda row: (row.aggregate_type, row.name))

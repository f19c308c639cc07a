"""What the SQL stores store: names, schema, statements, rows and their decoding.

How a store's transactions and reads use them is in ``_sql_store.py``.

Both the SQLite and the PostgreSQL store keep the same two tables (names configurable)
and one bookkeeping table:

``events``
    One row per event. ``event_id`` is a UUID the store gives each event when it is
    staged, unique across the table: a commit whose outcome was lost with its connection
    is resolved by looking one of its event ids up, and no event can ever be stored
    twice. ``global_position`` is the primary key and increases in commit
    order across the whole table: a reader that paged through :meth:`read_all` up to
    position *p* never later sees a new event at a position <= *p*. (SQLite gets that
    from its single writer and ``INTEGER PRIMARY KEY``; PostgreSQL must serialize
    commits, e.g. with ``pg_advisory_xact_lock``, because identity values are handed out
    before commit.) ``(aggregate_type, aggregate_id, sequence)`` is unique: sequences are
    contiguous from 1 for each aggregate. ``payload`` and ``metadata`` are JSON text from
    :class:`~trio_es.serialization.Transcoder`; ``recorded_at`` is the commit time, UTC.

``snapshots``
    At most one row per ``(aggregate_type, aggregate_id)``: the latest snapshot,
    replaced by each new one. Derived data: a snapshot that cannot be decoded is ignored.

``trio_es_schema_version``
    One row per events table, with the layout version (:data:`SCHEMA_VERSION`) of its
    tables. A store refuses to open tables written by a newer layout, and migrates
    older ones in place when it opens them, in one transaction: version 1 had no
    ``event_id`` column; opening it adds the column, gives every stored event a fresh
    UUID, adds the unique index and sets the version to 2.

``aggregate_type`` lets several event-sourced systems share one pair of tables; every
query of a store is restricted to its own type.

Only table names are ever put into SQL text, and only after :func:`check_identifier`;
every other value is a bound parameter.
"""

from __future__ import annotations

import datetime
import logging
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Protocol, final

import attrs

from ._errors import ConcurrencyConflict, EventStoreError
from ._serialization import Transcoder
from ._store import check_events as check_events
from ._store import check_read_all as check_read_all
from ._types import SerializedEventEnvelope, Snapshot
from ._types import StoredEvent as StoredEvent

__all__ = [
    "CHECKPOINT_TABLE",
    "EVENT_COLUMNS",
    "EVENT_COLUMNS_V1",
    "SCHEMA_VERSION",
    "SCHEMA_VERSION_TABLE",
    "SNAPSHOT_COLUMNS",
    "Dialect",
    "EventRow",
    "Queryable",
    "SnapshotRow",
    "Statements",
    "StoredEvent",
    "check_aggregate_type",
    "check_columns",
    "check_existing_tables",
    "check_events",
    "check_identifier",
    "check_read_all",
    "check_schema_version",
    "check_text",
    "check_version_to_open",
    "decode_event_row",
    "decode_snapshot_row",
    "find_conflict",
    "max_sequence",
    "notify_channel",
    "parse_utc",
    "utc_text",
]

logger: Final = logging.getLogger("trio_es.serialization")

#: The layout version this release creates and reads (version 1, without ``event_id``,
#: is migrated when opened).
SCHEMA_VERSION: Final = 2
#: The bookkeeping table; prefixed because it lives beside application tables.
SCHEMA_VERSION_TABLE: Final = "trio_es_schema_version"
#: Projection checkpoints: one row per (events table, aggregate type, projection name).
CHECKPOINT_TABLE: Final = "trio_es_checkpoints"
#: The columns of the events table, in the order the statements use them.
EVENT_COLUMNS: Final = (
    "global_position",
    "aggregate_type",
    "aggregate_id",
    "sequence",
    "event_type",
    "event_version",
    "payload",
    "metadata",
    "recorded_at",
    "event_id",
)
#: The columns of a version-1 events table (before ``event_id``), which opening migrates.
EVENT_COLUMNS_V1: Final = EVENT_COLUMNS[:-1]
#: The columns of the snapshots table.
SNAPSHOT_COLUMNS: Final = (
    "aggregate_type",
    "aggregate_id",
    "sequence",
    "entity_type",
    "entity_version",
    "payload",
    "recorded_at",
)

# 63 is PostgreSQL's identifier limit; SQLite has none, but names must work on both.
_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def check_identifier(value: object, what: str) -> str:
    """Return ``value`` if it can be put into SQL text as a table name, else raise.

    Raises:
        ValueError: ``value`` is not a str matching ``[A-Za-z_][A-Za-z0-9_]{0,62}``.
    """
    if not isinstance(value, str) or _IDENTIFIER.fullmatch(value) is None:
        raise ValueError(
            f"{what} must be a plain SQL identifier matching [A-Za-z_][A-Za-z0-9_]{{0,62}} "
            f"(got {value!r}); choose a name like 'bank_events'"
        )
    return value


def check_text(value: object, what: str) -> str:
    """Return ``value`` if it is a str that UTF-8 text columns can hold, else raise.

    Raises:
        EventStoreError: ``value`` is not a str, or holds a lone surrogate.
    """
    if not isinstance(value, str):
        raise EventStoreError(f"{what} must be a str (got {type(value).__name__} {value!r:.80})")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise EventStoreError(
                f"{what} {value!r:.80} holds a lone surrogate that UTF-8 cannot encode; "
                "use valid Unicode text"
            ) from None
    return value


def check_aggregate_type(value: object) -> str:
    """Return ``value`` if it is a non-empty str, else raise ``ValueError``."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"aggregate_type must be a non-empty str (got {value!r})")
    return value


def utc_text(moment: datetime.datetime) -> str:
    """``moment`` as ISO 8601 in UTC with microseconds: sortable as text, as SQLite keeps it.

    Raises:
        EventStoreError: ``moment`` is naive (its offset from UTC is unknown).
    """
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise EventStoreError(
            f"timestamp {moment.isoformat()} is naive; use an aware datetime such as "
            "datetime.now(UTC)"
        )
    return moment.astimezone(datetime.UTC).isoformat(timespec="microseconds")


def parse_utc(value: str | datetime.datetime) -> datetime.datetime:
    """A stored timestamp (ISO text, or a driver's datetime) as an aware UTC datetime."""
    moment = (
        value if isinstance(value, datetime.datetime) else datetime.datetime.fromisoformat(value)
    )
    if moment.tzinfo is None:
        return moment.replace(tzinfo=datetime.UTC)
    return moment.astimezone(datetime.UTC)


@final
@attrs.frozen
class Dialect:
    """How one database spells the shared schema and statements.

    Attributes:
        placeholder: a bound parameter, e.g. ``"?"`` (sqlite3) or ``"%s"`` (psycopg).
        position_type: the ``global_position`` column, e.g. ``"INTEGER PRIMARY KEY"`` or
            ``"BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"``.
        integer_type: sequences and versions, e.g. ``"INTEGER"`` or ``"BIGINT"``.
        json_type: the payload and metadata columns, e.g. ``"TEXT"`` or ``"JSONB"``.
        timestamp_type: ``recorded_at``, e.g. ``"TEXT"`` (ISO 8601) or ``"TIMESTAMPTZ"``.
        uuid_type: ``event_id``, e.g. ``"TEXT"`` (the canonical UUID string) or ``"UUID"``.
        json_parameter: a bound JSON-text parameter, e.g. ``"?"`` or ``"%s::jsonb"``.
        json_result: how a JSON column is selected so that the driver returns text,
            formatted with the column name, e.g. ``"{}"`` or ``"{}::text"``.
    """

    placeholder: str
    position_type: str
    integer_type: str
    json_type: str
    timestamp_type: str
    uuid_type: str
    json_parameter: str
    json_result: str = "{}"


def notify_channel(events_table: str) -> str:
    """The PostgreSQL ``LISTEN``/``NOTIFY`` channel on which commits to ``events_table``
    are announced (an identifier of at most 63 characters; lower case, as PostgreSQL
    folds the table name)."""
    return _derived_name(f"trio_es_{events_table.lower()}", "commits")


def _derived_name(table: str, suffix: str) -> str:
    # Index names derive from the table name and must stay within the 63-char limit.
    name = f"{table}_{suffix}"
    return name if len(name) <= 63 else f"{table[: 62 - len(suffix)]}_{suffix}"


def events_table_ddl(dialect: Dialect, table: str, *, if_not_exists: bool) -> str:
    """``CREATE TABLE`` for an events table of the current layout named ``table``.

    ``table`` must have passed :func:`check_identifier`. The SQLite store also uses it to
    rebuild a version-1 table (SQLite cannot add a NOT NULL column without a default).
    """
    i = dialect.integer_type
    return (
        f"CREATE TABLE {'IF NOT EXISTS ' if if_not_exists else ''}{table} ("
        f"global_position {dialect.position_type}, "
        "aggregate_type TEXT NOT NULL, "
        "aggregate_id TEXT NOT NULL, "
        f"sequence {i} NOT NULL CHECK (sequence > 0), "
        "event_type TEXT NOT NULL, "
        f"event_version {i} NOT NULL, "
        f"payload {dialect.json_type} NOT NULL, "
        f"metadata {dialect.json_type} NOT NULL, "
        f"recorded_at {dialect.timestamp_type} NOT NULL, "
        f"event_id {dialect.uuid_type} NOT NULL, "
        "UNIQUE (aggregate_type, aggregate_id, sequence))"
    )


@final
@attrs.frozen
class Statements:
    """Every SQL text a store runs, built once from validated table names and a dialect.

    Parameters, in order, are documented on each attribute. Rows come back in the column
    order given there.
    """

    #: The bookkeeping table's DDL, idempotent: run first on open, to read the version.
    create_schema_version: str
    #: DDL, idempotent, to run in one transaction on open (after a migration, if any).
    create: tuple[str, ...]
    #: The name of the unique index on ``event_id``.
    event_id_index: str
    #: (events_table, version): sets the bookkeeping row's version (after a migration).
    update_schema_version: str
    #: (events_table, snapshots_table, version): adds the bookkeeping row if missing.
    insert_schema_version: str
    #: (events_table,) -> (version,)
    select_schema_version: str
    #: (aggregate_type, aggregate_id, sequence, event_type, event_version, payload,
    #: metadata, recorded_at, event_id)
    insert_event: str
    #: (event_id,) -> one row if an event with that id is stored, else none
    find_event_id: str
    #: (aggregate_type, aggregate_id) -> (max sequence or NULL,)
    max_sequence: str
    #: (aggregate_type, aggregate_id, start_from) -> (sequence, event_type,
    #: event_version, payload, metadata, event_id, global_position, recorded_at) in
    #: sequence order
    select_events: str
    #: (aggregate_type, after_position, limit) -> (aggregate_id, sequence, event_type,
    #: event_version, payload, metadata, event_id, global_position, recorded_at) in
    #: global_position order
    select_all: str
    #: (aggregate_type,) -> (highest global_position of the type, or NULL,)
    select_head: str
    #: (event_id, ...) for ``len(ids)`` ids -> (event_id, global_position, recorded_at);
    #: call :meth:`select_recorded` for the text
    select_recorded_prefix: str
    #: (aggregate_type, aggregate_id, sequence, entity_type, entity_version, payload,
    #: recorded_at): insert or replace the aggregate's snapshot
    upsert_snapshot: str
    #: (aggregate_type, aggregate_id) -> (sequence, entity_type, entity_version,
    #: payload, recorded_at)
    select_snapshot: str
    #: The events table's name as the checkpoint rows key it (lower case, as PostgreSQL
    #: folds unquoted names).
    events_table_key: str
    #: (events_table_key, aggregate_type, name, updated_at): adds the projection's
    #: checkpoint row at position 0 if missing
    insert_checkpoint: str
    #: (events_table_key, aggregate_type, name) -> (position,)
    select_checkpoint: str
    #: (position, updated_at, events_table_key, aggregate_type, name, expected_position):
    #: moves the checkpoint only if it is still at the expected position (1 row or 0)
    advance_checkpoint: str

    def select_recorded(self, placeholder: str, count: int) -> str:
        """``SELECT`` the position and commit time of ``count`` events given by id."""
        return f"{self.select_recorded_prefix}({', '.join([placeholder] * count)})"

    @classmethod
    def build(cls, dialect: Dialect, *, events_table: str, snapshots_table: str) -> Statements:
        """Build the statements; the table names are validated here.

        Raises:
            ValueError: a table name is not a plain identifier, or both are the same.
        """
        events = check_identifier(events_table, "events_table")
        snapshots = check_identifier(snapshots_table, "snapshots_table")
        if events.lower() == snapshots.lower() or {SCHEMA_VERSION_TABLE, CHECKPOINT_TABLE} & {
            events.lower(),
            snapshots.lower(),
        }:
            raise ValueError(
                f"events_table {events!r} and snapshots_table {snapshots!r} must be two "
                f"different tables other than {SCHEMA_VERSION_TABLE!r} and "
                f"{CHECKPOINT_TABLE!r}; rename one"
            )
        p, j, i = dialect.placeholder, dialect.json_parameter, dialect.integer_type
        payload, metadata = (
            dialect.json_result.format("payload"),
            dialect.json_result.format("metadata"),
        )
        event_id_index = _derived_name(events, "event_id")
        create = (
            events_table_ddl(dialect, events, if_not_exists=True),
            # read_all filters by type and walks positions; without this index a store
            # whose type is rare in a shared table would scan everyone else's events.
            f"CREATE INDEX IF NOT EXISTS {_derived_name(events, 'type_position')} "
            f"ON {events} (aggregate_type, global_position)",
            # An index rather than a column constraint, so that a new table and one
            # migrated from version 1 end up alike.
            f"CREATE UNIQUE INDEX IF NOT EXISTS {event_id_index} ON {events} (event_id)",
            f"CREATE TABLE IF NOT EXISTS {snapshots} ("
            "aggregate_type TEXT NOT NULL, "
            "aggregate_id TEXT NOT NULL, "
            f"sequence {i} NOT NULL, "
            "entity_type TEXT NOT NULL, "
            f"entity_version {i} NOT NULL, "
            f"payload {dialect.json_type} NOT NULL, "
            f"recorded_at {dialect.timestamp_type} NOT NULL, "
            "PRIMARY KEY (aggregate_type, aggregate_id))",
            f"CREATE TABLE IF NOT EXISTS {CHECKPOINT_TABLE} ("
            "events_table TEXT NOT NULL, "
            "aggregate_type TEXT NOT NULL, "
            "name TEXT NOT NULL, "
            f"position {i} NOT NULL CHECK (position >= 0), "
            f"updated_at {dialect.timestamp_type} NOT NULL, "
            "PRIMARY KEY (events_table, aggregate_type, name))",
        )
        key_where = f"events_table = {p} AND aggregate_type = {p} AND name = {p}"
        return cls(
            create_schema_version=(
                f"CREATE TABLE IF NOT EXISTS {SCHEMA_VERSION_TABLE} ("
                "events_table TEXT PRIMARY KEY, "
                "snapshots_table TEXT NOT NULL, "
                f"version {i} NOT NULL)"
            ),
            create=create,
            event_id_index=event_id_index,
            update_schema_version=(
                f"UPDATE {SCHEMA_VERSION_TABLE} SET version = {p} WHERE events_table = {p}"
            ),
            insert_schema_version=(
                f"INSERT INTO {SCHEMA_VERSION_TABLE} (events_table, snapshots_table, version) "
                f"VALUES ({p}, {p}, {p}) ON CONFLICT (events_table) DO NOTHING"
            ),
            select_schema_version=(
                f"SELECT version FROM {SCHEMA_VERSION_TABLE} WHERE events_table = {p}"
            ),
            insert_event=(
                f"INSERT INTO {events} (aggregate_type, aggregate_id, sequence, event_type, "
                f"event_version, payload, metadata, recorded_at, event_id) "
                f"VALUES ({p}, {p}, {p}, {p}, {p}, {j}, {j}, {p}, {p})"
            ),
            find_event_id=f"SELECT 1 FROM {events} WHERE event_id = {p}",
            # Not MAX(sequence): with stale statistics (a young table, a cached generic
            # plan) PostgreSQL aggregates over every index entry of the stream, so each
            # commit cost O(stream). ORDER BY ... LIMIT 1 reads one index entry always.
            max_sequence=(
                f"SELECT sequence FROM {events} "
                f"WHERE aggregate_type = {p} AND aggregate_id = {p} "
                "ORDER BY sequence DESC LIMIT 1"
            ),
            select_events=(
                f"SELECT sequence, event_type, event_version, {payload}, {metadata}, event_id, "
                f"global_position, recorded_at "
                f"FROM {events} WHERE aggregate_type = {p} AND aggregate_id = {p} "
                f"AND sequence > {p} ORDER BY sequence"
            ),
            select_all=(
                f"SELECT aggregate_id, sequence, event_type, event_version, "
                f"{payload}, {metadata}, event_id, global_position, recorded_at FROM {events} "
                f"WHERE aggregate_type = {p} AND global_position > {p} "
                f"ORDER BY global_position LIMIT {p}"
            ),
            # ORDER BY ... LIMIT 1 reads one entry of the (type, position) index.
            select_head=(
                f"SELECT global_position FROM {events} WHERE aggregate_type = {p} "
                "ORDER BY global_position DESC LIMIT 1"
            ),
            select_recorded_prefix=(
                f"SELECT event_id, global_position, recorded_at FROM {events} WHERE event_id IN "
            ),
            upsert_snapshot=(
                f"INSERT INTO {snapshots} (aggregate_type, aggregate_id, sequence, "
                f"entity_type, entity_version, payload, recorded_at) "
                f"VALUES ({p}, {p}, {p}, {p}, {p}, {j}, {p}) "
                "ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE SET "
                "sequence = excluded.sequence, entity_type = excluded.entity_type, "
                "entity_version = excluded.entity_version, payload = excluded.payload, "
                "recorded_at = excluded.recorded_at"
            ),
            select_snapshot=(
                f"SELECT sequence, entity_type, entity_version, {payload}, recorded_at "
                f"FROM {snapshots} WHERE aggregate_type = {p} AND aggregate_id = {p}"
            ),
            events_table_key=events.lower(),
            insert_checkpoint=(
                f"INSERT INTO {CHECKPOINT_TABLE} (events_table, aggregate_type, name, "
                f"position, updated_at) VALUES ({p}, {p}, {p}, 0, {p}) "
                "ON CONFLICT (events_table, aggregate_type, name) DO NOTHING"
            ),
            select_checkpoint=f"SELECT position FROM {CHECKPOINT_TABLE} WHERE {key_where}",
            advance_checkpoint=(
                f"UPDATE {CHECKPOINT_TABLE} SET position = {p}, updated_at = {p} "
                f"WHERE {key_where} AND position = {p}"
            ),
        )


@final
@attrs.frozen
class EventRow:
    """An encoded event waiting in a transaction; the store adds type and commit time.

    ``event_id`` is given when the event is staged and never changes, so a commit sent
    twice carries the same ids and the unique index refuses the second copy.
    """

    aggregate_id: str
    sequence: int
    event_type: str
    event_version: int
    payload: str
    metadata: str
    event_id: uuid.UUID

    def parameters(
        self, aggregate_type: str, recorded_at: object, *, text_ids: bool = False
    ) -> tuple[object, ...]:
        """The row's parameters for :attr:`Statements.insert_event`.

        ``recorded_at`` is the commit time as the driver binds it (ISO text for SQLite,
        a datetime for PostgreSQL): one value for every row of a commit. ``text_ids``
        binds the event id as its canonical string (SQLite) instead of a ``UUID``.
        """
        return (
            aggregate_type,
            self.aggregate_id,
            self.sequence,
            self.event_type,
            self.event_version,
            self.payload,
            self.metadata,
            recorded_at,
            str(self.event_id) if text_ids else self.event_id,
        )


@final
@attrs.frozen
class SnapshotRow:
    """An encoded snapshot waiting in a transaction."""

    aggregate_id: str
    sequence: int
    entity_type: str
    entity_version: int
    payload: str
    recorded_at: datetime.datetime

    def parameters(self, aggregate_type: str, recorded_at: object) -> tuple[object, ...]:
        """The row's parameters for :attr:`Statements.upsert_snapshot`.

        ``recorded_at`` is :attr:`recorded_at` as the driver binds it.
        """
        return (
            aggregate_type,
            self.aggregate_id,
            self.sequence,
            self.entity_type,
            self.entity_version,
            self.payload,
            recorded_at,
        )


class Rows(Protocol):
    """What ``execute`` returns in both drivers: rows to fetch."""

    def fetchall(self) -> list[Any]: ...


class Queryable(Protocol):
    """A ``sqlite3.Connection``, a psycopg connection or cursor: runs one statement.

    The shared functions below run in the store's worker thread and take one of these,
    so that they need no driver of their own.
    """

    def execute(self, sql: str, parameters: Sequence[Any], /) -> Rows: ...


def max_sequence(
    connection: Queryable, statements: Statements, aggregate_type: str, aggregate_id: str
) -> int:
    """The aggregate's stored sequence: its highest, or 0 without events."""
    rows = connection.execute(statements.max_sequence, (aggregate_type, aggregate_id)).fetchall()
    return int(rows[0][0] or 0) if rows else 0


def find_conflict(
    expected: Mapping[str, int], actual: Callable[[str], int]
) -> ConcurrencyConflict | None:
    """The conflict for the first aggregate whose ``actual`` sequence is not ``expected``.

    ``actual`` is asked in ``expected``'s order and only until a mismatch, so a store may
    query the database lazily from it.
    """
    for aggregate_id, sequence in expected.items():
        found = actual(aggregate_id)
        if found != sequence:
            return ConcurrencyConflict(
                aggregate_id=aggregate_id, expected_sequence=sequence, actual_sequence=found
            )
    return None


def check_columns(table: str, found: Sequence[str], expected: Sequence[str], where: str) -> None:
    """Refuse an existing ``table`` whose columns are not ``expected`` (in any order).

    Args:
        where: where the table lives, for the message, e.g. ``"in '/data/app.db'"``.

    Raises:
        EventStoreError: the columns differ; the message lists the ones found.
    """
    if sorted(found) != sorted(expected):
        raise EventStoreError(
            f"table {table!r} {where} is not a trio_es table (its columns are "
            f"{', '.join(found)}); choose another table name"
        )


def check_version_to_open(events_table: str, version: object, where: str) -> None:
    """Refuse tables that this release can neither read nor migrate, before touching them.

    ``version`` is the bookkeeping row's, or ``None`` when there is none yet (new tables).

    Raises:
        EventStoreError: ``version`` is newer than :data:`SCHEMA_VERSION`, or not a layout
            version at all.
    """
    if version is not None and version not in range(1, SCHEMA_VERSION + 1):
        raise EventStoreError(
            f"table {events_table!r} {where} has schema version {version}, this trio_es "
            f"reads versions up to {SCHEMA_VERSION}; use the trio_es release that wrote it"
        )


def check_existing_tables(
    events_table: str,
    events_found: Sequence[str],
    snapshots_table: str,
    snapshots_found: Sequence[str],
    where: str,
) -> bool:
    """Check the columns of tables that already exist; True when the events table needs
    the migration from layout version 1 (no ``event_id``).

    Run before any DDL: an index on a foreign table would fail with a message about a
    missing column instead of this one.

    Raises:
        EventStoreError: a table exists with columns of neither layout.
    """
    migrate = sorted(events_found) == sorted(EVENT_COLUMNS_V1)
    if events_found and not migrate:
        check_columns(events_table, events_found, EVENT_COLUMNS, where)
    if snapshots_found:
        check_columns(snapshots_table, snapshots_found, SNAPSHOT_COLUMNS, where)
    return migrate


def check_schema_version(events_table: str, version: object, where: str) -> None:
    """Refuse tables whose bookkeeping row names another layout than :data:`SCHEMA_VERSION`.

    Args:
        where: where the tables live, for the message, e.g. ``"at db:5432/app"``.

    Raises:
        EventStoreError: ``version`` is not this release's layout.
    """
    if version != SCHEMA_VERSION:
        raise EventStoreError(
            f"table {events_table!r} {where} has schema version {version}, this trio_es "
            f"reads version {SCHEMA_VERSION}; use the trio_es release that wrote it"
        )


def decode_event_row(
    transcoder: Transcoder,
    aggregate_type: str,
    aggregate_id: str,
    row: Sequence[Any],
) -> SerializedEventEnvelope[Any]:
    """Decode a ``(sequence, event_type, event_version, payload, metadata, event_id,
    global_position, recorded_at)`` row.

    Raises:
        EventStoreError: the payload or metadata cannot be decoded; the message names
            the aggregate, sequence, type and version.
    """
    (
        sequence,
        event_type,
        event_version,
        payload,
        metadata,
        event_id,
        global_position,
        recorded_at,
    ) = row
    return SerializedEventEnvelope(
        aggregate_id,
        sequence,
        transcoder.decode_event(
            event_type, event_version, payload, aggregate_id=aggregate_id, sequence=sequence
        ),
        transcoder.decode_metadata(metadata, aggregate_id=aggregate_id, sequence=sequence),
        event_type,
        event_version,
        aggregate_type,
        event_id=event_id if isinstance(event_id, uuid.UUID) else _parse_event_id(event_id),
        global_position=global_position,
        recorded_at=parse_utc(recorded_at),
    )


def _parse_event_id(value: object) -> uuid.UUID:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise EventStoreError(f"stored event_id {value!r:.80} is not a UUID") from None


def decode_snapshot_row(
    transcoder: Transcoder, aggregate_id: str, row: Sequence[Any]
) -> Snapshot[Any] | None:
    """Decode a ``(sequence, entity_type, entity_version, payload, recorded_at)`` row.

    Returns ``None`` (logged by the transcoder) when the entity cannot be decoded.
    """
    sequence, entity_type, entity_version, payload, recorded_at = row
    try:
        timestamp = parse_utc(recorded_at)
    except (TypeError, ValueError):
        logger.warning(
            "ignoring the snapshot of aggregate %r: its recorded_at %r is not a timestamp",
            aggregate_id[:80],
            recorded_at,
        )
        return None
    entity = transcoder.decode_entity(
        entity_type, entity_version, payload, aggregate_id=aggregate_id
    )
    if entity is None:
        return None
    return Snapshot(aggregate_id, entity, sequence, timestamp)


# -- the Trio side: transactions and reads, the same in every SQL store ------------------

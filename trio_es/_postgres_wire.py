"""PostgreSQL from the Trio thread: libpq's non-blocking calls, with no thread hop.

psycopg has no Trio support, but its documented ``psycopg.pq`` layer exposes libpq's
non-blocking calls and the connection's socket. :func:`exchange` sends a list of
statements as one pipeline (one round trip), waiting for the socket with
``trio.lowlevel.wait_readable`` / ``wait_writable``, so a commit costs its round trip
and no hand-off to a worker thread (about 170 µs each, more than the round trip itself
on a local server). Parameters are adapted by psycopg's own dumpers (text format, so
the server casts them by the statement's types), and a statement run again is prepared
once per session, as psycopg does after a few runs.

Semantics the store relies on:

* The statements run in order, in one pipeline ending with a sync: after the first
  statement that fails, the server skips the rest (a COMMIT among them included), and
  :func:`exchange` raises that statement's error as psycopg would, with its SQLSTATE and
  diagnostics. The connection is then idle, or in a failed transaction that the caller
  rolls back.
* Anything else that interrupts an exchange (cancellation, a lost connection, a protocol
  surprise) leaves the session in an unknown state: the caller must give the connection
  up (see ``PooledConnection.exchange``). Whether a COMMIT sent in it landed is then
  unknown, exactly as with a lost connection.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, final

import attrs
import psycopg
import psycopg.errors
import trio
from psycopg import pq
from psycopg.abc import Transformer as Adapting
from psycopg.adapt import PyFormat, Transformer

__all__ = ["BEGIN", "COMMIT", "ROLLBACK", "Query", "Session", "exchange", "finish"]

_EXECUTED: Final = (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK)


@final
@attrs.frozen
class Query:
    """One statement with ``$n`` placeholders, and whether to prepare it once per session.

    Build them with :meth:`of` from psycopg-style ``%s`` SQL.
    """

    sql: bytes
    #: The prepared statement's name, or ``None`` to parse it each time (BEGIN, COMMIT).
    name: bytes | None = None

    @classmethod
    def of(cls, sql: str, *, prepare: bool = True) -> Query:
        """The query for ``sql`` written with ``%s`` placeholders (and no literal ``%``)."""
        if "%%" in sql:
            raise ValueError(f"a wire query cannot hold a literal % (got {sql!r:.80})")
        counter = iter(range(1, sql.count("%s") + 1))
        numbered = re.sub(r"%s", lambda _: f"${next(counter)}", sql).encode()
        if not prepare:
            return cls(numbered)
        # Named by content, so that one session never holds two plans under one name.
        return cls(
            numbered, b"trio_es_" + hashlib.blake2b(numbered, digest_size=10).hexdigest().encode()
        )


BEGIN: Final = Query.of("BEGIN", prepare=False)
COMMIT: Final = Query.of("COMMIT", prepare=False)
ROLLBACK: Final = Query.of("ROLLBACK", prepare=False)


@final
@attrs.define(eq=False)
class Session:
    """What :func:`exchange` keeps per connection: its adapters and prepared statements."""

    raw: psycopg.Connection[tuple[object, ...]]
    transformer: Adapting = attrs.field(init=False)
    prepared: set[bytes] = attrs.field(init=False, factory=set)
    #: Whether an exchange was interrupted: the session's state is unknown, give it up.
    broken: bool = attrs.field(init=False, default=False)
    #: Whether ``prepared`` may be wrong (the server said a statement was missing or
    #: already there): the next exchange deallocates everything and starts afresh.
    resync: bool = attrs.field(init=False, default=False)
    #: The exchange under way: which results are prepares (by index), and the results
    #: read so far. Kept here, not in the exchange's frame, so that :func:`finish` can
    #: still record what an interrupted exchange prepared on the server.
    preparing: dict[int, bytes] = attrs.field(init=False, factory=dict)
    received: list[pq.abc.PGresult] = attrs.field(init=False, factory=list)

    def __attrs_post_init__(self) -> None:
        self.transformer = Transformer(self.raw)


async def exchange(
    session: Session, statements: Sequence[tuple[Query, Sequence[object]]]
) -> list[pq.abc.PGresult]:
    """Run ``statements`` (each a query and its parameters) in one pipeline; their results.

    Returns one result per statement, in order. Rows are in text format; read them with
    ``session.transformer`` (``set_pgresult``, ``load_rows``) or ``get_value``.

    Raises:
        psycopg.Error: the first statement that failed, as psycopg raises it; the
            statements after it did not run. The connection is idle or in a failed
            transaction, and can be used again.
        psycopg.OperationalError: the connection failed; give it up.
        trio.Cancelled: the session is mid-exchange; give the connection up.
    """
    # A checkpoint as Trio's own primitives make one: a cancel point before anything is
    # sent, and a scheduling point at the end unless the exchange waited on the socket.
    await trio.lowlevel.checkpoint_if_cancelled()
    pgconn = session.raw.pgconn
    dump = session.transformer.dump_sequence
    preparing = session.preparing = {}  # result index -> name being prepared
    received = session.received = []
    # A resync's DEALLOCATE ALL goes first; its result is no statement's answer.
    position = first = 1 if session.resync else 0
    pgconn.enter_pipeline_mode()
    try:
        if first:
            pgconn.send_query_params(b"DEALLOCATE ALL", None)
            session.prepared.clear()
            session.resync = False
        for query, parameters in statements:
            values = dump(parameters, [PyFormat.TEXT] * len(parameters)) if parameters else None
            name = query.name
            if name is None:
                pgconn.send_query_params(query.sql, values)
            else:
                if name not in session.prepared and name not in preparing.values():
                    pgconn.send_prepare(name, query.sql)
                    preparing[position] = name
                    position += 1
                pgconn.send_query_prepared(name, values)
            position += 1
        pgconn.pipeline_sync()
        waited = await _flush(pgconn)
        received_late = await _receive(pgconn, received, sent_only=not waited)
    except BaseException:
        session.broken = True
        raise
    finally:
        if pgconn.pipeline_status != pq.PipelineStatus.OFF and not pgconn.is_busy():
            # Only possible once every result was read; otherwise the caller gives the
            # connection up (see the module docstring).
            with contextlib.suppress(psycopg.OperationalError):
                pgconn.exit_pipeline_mode()
    _record_prepared(session)
    answers: list[pq.abc.PGresult] = []
    error: psycopg.Error | None = None
    for index, result in enumerate(received):
        if error is None and result.status not in _EXECUTED:
            if result.status == pq.ExecStatus.PIPELINE_ABORTED:
                continue
            error = psycopg.errors.error_from_result(result, encoding=session.raw.info.encoding)
        if index < first or index in preparing:
            continue
        answers.append(result)
    if not (waited or received_late):
        await trio.lowlevel.cancel_shielded_checkpoint()
    if error is not None:
        if error.sqlstate in _OUT_OF_STEP:
            # The server holds other statements than the session thinks (someone ran
            # DEALLOCATE, say): deallocate them all before the next exchange.
            session.resync = True
        raise error
    return answers


#: SQLSTATEs of a session whose prepared statements are not the ones it thinks: a
#: statement missing (invalid_sql_statement_name) or already there (duplicate_prepared_statement).
_OUT_OF_STEP: Final = frozenset({"26000", "42P05"})


def _record_prepared(session: Session) -> None:
    """Note the statements the exchange just read to its end prepared on the server."""
    received = session.received
    for index, name in session.preparing.items():
        if index < len(received) and received[index].status == pq.ExecStatus.COMMAND_OK:
            session.prepared.add(name)
    session.preparing = {}


async def finish(session: Session) -> None:
    """Read an interrupted :func:`exchange` to its end (its sync) and leave pipeline mode.

    The results are dropped; the transaction may still be open (failed or not), for the
    caller to roll back. Call it only after an exchange raised a ``BaseException`` that
    is not an ``Exception`` (a cancellation): a failed connection cannot finish.
    """
    pgconn = session.raw.pgconn
    if pgconn.pipeline_status == pq.PipelineStatus.OFF:
        return
    await _flush(pgconn)
    await _receive(pgconn, session.received)
    # Statements it prepared exist on the server now: preparing them again would fail.
    _record_prepared(session)
    pgconn.exit_pipeline_mode()
    session.broken = False


async def _flush(pgconn: pq.abc.PGconn) -> bool:
    """Send libpq's output buffer, reading meanwhile so that the server never stalls.

    Returns whether it had to wait for the socket.
    """
    waited = False
    while pgconn.flush():
        waited = True
        # The buffer outgrew the socket: the server may be blocked writing results we
        # have not read, so wait for either direction (libpq reads when it cannot write).
        async with trio.open_nursery() as nursery:

            async def wait(waiter: Callable[[int], Awaitable[None]]) -> None:
                await waiter(pgconn.socket)
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait, trio.lowlevel.wait_writable)
            nursery.start_soon(wait, trio.lowlevel.wait_readable)
        pgconn.consume_input()
    return waited


async def _receive(
    pgconn: pq.abc.PGconn, results: list[pq.abc.PGresult], *, sent_only: bool = False
) -> bool:
    """Append every result up to the pipeline's sync to ``results``, in order (one per
    statement); return whether it had to wait for the socket.

    ``sent_only``: the exchange only sent so far (it read nothing while flushing), so
    there is nothing to read until the socket says so: reading at once would be a system
    call that finds nothing, on every exchange.
    """
    waited = False
    if sent_only:
        await trio.lowlevel.wait_readable(pgconn.socket)
        waited = True
    while True:
        pgconn.consume_input()
        while not pgconn.is_busy():
            result = pgconn.get_result()
            if result is None:
                continue  # the end of one statement's results
            if result.status == pq.ExecStatus.PIPELINE_SYNC:
                return waited
            results.append(result)
        await trio.lowlevel.wait_readable(pgconn.socket)
        waited = True

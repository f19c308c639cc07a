"""A worker process for the multi-process projection tests (run with sys.executable).

Usage::

    python projection_worker.py CONFIG

CONFIG is a JSON object (see :class:`Config`). Its ``target`` is a PostgreSQL DSN (a
``postgres[ql]://`` URL or ``key=value`` pairs with a ``dbname``), or else a SQLite file.

Mode ``project`` runs ``open_eventsourcing`` on the bank domain with the projections
the config names, all of them on every worker (one process is active for each, the
others are standbys):

* ``plain``: non-transactional; its handler sleeps ``delay`` seconds per batch.
* ``tx``: transactional; its handler inserts one row per event into ``proj_applied``
  (``global_position`` is its primary key, so applying an event twice fails), folds the
  batch into ``proj_balances`` and sleeps ``delay`` seconds, inside the transaction
  that moves the checkpoint. The tables are made by the test beforehand.

Each handler appends one JSON line to the shared file ``DIR/handled.jsonl`` when it
starts (``"ev": "start"``, with the batch's positions and event ids) and one when it
ends (``"ev": "end"``; ``"cancelled": true`` when it did not finish: cancelled, e.g.
by a clean shutdown, or failed). The calls are numbered per worker and projection.
Each line is a single ``write`` with ``O_APPEND``, and carries the worker number, its
pid and ``time.monotonic()`` (system-wide on Linux, so comparable across processes).
A SIGKILL leaves a ``start`` without an ``end``. A ``tx`` handler that
finds a row of its batch already applied appends a ``"ev": "double"`` line before it
fails.

Then ``tasks`` tasks each run ``commands`` random commands (deposits, withdrawals and
account openings) over ``accounts``, the worker touches ``DIR/done-N`` and runs on
(projecting) until ``DIR/stop-N`` or ``DIR/stop-all`` exists, or until the ``plain``
handler returned from its ``stop_after``-th call, and exits cleanly.

Mode ``subscribe`` runs ``trio_es.subscribe(store)`` from position 0, touches
``DIR/ready-N`` once subscribed, and appends ``{"ev": "batch", "pos": [...]}`` lines
for every batch until it is told to stop.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import trio

from trio_es import Projection, RuntimeOptions, open_eventsourcing, subscribe

# Run as a script with tests/ on sys.path, the helpers are top-level modules; mypy checks
# tests/ as the `tests` package.
if TYPE_CHECKING:
    from tests import _bank
    from tests.multiprocess_worker import execute_until_acknowledged
else:
    import _bank
    from multiprocess_worker import execute_until_acknowledged

#: How often the worker looks for its stop file.
_STOP_POLL = 0.02


@attrs.frozen
class Config:
    """What one worker does (the JSON object on its command line)."""

    mode: str
    target: str
    dir: str
    worker: int
    seed: int = 0
    projections: tuple[str, ...] = ("plain", "tx")
    batch_size: int = 10
    #: Seconds each handler call sleeps (a slow read model: kills land mid-batch).
    delay: float = 0.0
    tasks: int = 0
    commands: int = 0
    accounts: tuple[str, ...] = ()
    #: Leave (cleanly) as soon as the ``plain`` handler returned from this many calls.
    stop_after: int | None = None
    #: None: the store's default.
    poll_interval: float | None = None
    takeover_interval: float | None = None


def is_postgres(target: str) -> bool:
    """Whether ``target`` is a PostgreSQL DSN (else it is a SQLite file)."""
    return target.startswith(("postgresql://", "postgres://")) or "dbname=" in target


@asynccontextmanager
async def open_store(config: Config) -> AsyncIterator[Any]:
    """The bank store at ``config.target`` with the config's intervals."""
    options: dict[str, Any] = {}
    if config.poll_interval is not None:
        options["poll_interval"] = config.poll_interval
    if config.takeover_interval is not None:
        options["takeover_interval"] = config.takeover_interval
    if is_postgres(config.target):
        from trio_es.postgres_store import PostgresStore

        async with PostgresStore.open(
            config.target, transcoder=_bank.bank_transcoder(), pool_size=2, **options
        ) as store:
            yield store
    else:
        from trio_es.sqlite_store import SqliteStore

        async with SqliteStore.open(
            config.target, transcoder=_bank.bank_transcoder(), **options
        ) as store:
            yield store


class Journal:
    """The shared append-only file of handler calls: one ``write`` per JSON line."""

    def __init__(self, directory: Path, worker: int) -> None:
        self._fd = os.open(
            directory / "handled.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644
        )
        self.worker = worker
        #: Calls so far per projection (each projection's calls come one at a time; the
        #: transactional one's in worker threads, so the counters are kept apart).
        self._calls: dict[str, int] = {}

    def write(self, projection: str, event: str, **fields: Any) -> None:
        """Append one line for ``projection`` (``event``: start, end, double or batch)."""
        line = {
            "w": self.worker,
            "pid": os.getpid(),
            "p": projection,
            "ev": event,
            "t": time.monotonic(),
            **fields,
        }
        os.write(self._fd, (json.dumps(line) + "\n").encode())

    def start(self, projection: str, batch: list[Any]) -> int:
        """Record that a handler call on ``batch`` starts; return its number."""
        number = self._calls.get(projection, 0) + 1
        self._calls[projection] = number
        self.write(
            projection,
            "start",
            b=number,
            pos=[e.global_position for e in batch],
            ids=[str(e.event_id) for e in batch],
        )
        return number

    def end(self, projection: str, number: int, *, cancelled: bool) -> None:
        """Record that handler call ``number`` ended (or was cancelled)."""
        self.write(projection, "end", b=number, cancelled=cancelled)


def _signed_amount(payload: Any) -> int:
    if isinstance(payload, _bank.MoneyDeposited):
        return payload.amount
    if isinstance(payload, _bank.MoneyWithdrawn):
        return -payload.amount
    return 0


def plain_handler(
    journal: Journal, delay: float, returned: Callable[[int], None]
) -> Callable[[list[Any]], Any]:
    """The non-transactional projection's handler: journal the batch, sleep ``delay``.

    ``returned(n)`` is called as the n-th call returns.
    """
    calls = 0

    async def handle(batch: list[Any]) -> None:
        nonlocal calls
        number = journal.start("plain", batch)
        cancelled = True
        try:
            await trio.sleep(delay)
            cancelled = False
        finally:
            journal.end("plain", number, cancelled=cancelled)
        calls += 1
        returned(calls)

    return handle


def tx_handler(journal: Journal, delay: float, postgres: bool) -> Callable[[Any, list[Any]], None]:
    """The transactional projection's handler: apply the batch to the tables, sleep."""
    mark = "%s" if postgres else "?"
    insert = (
        f"INSERT INTO proj_applied (global_position, event_id, worker) VALUES ({mark}, {mark}, "
        f"{mark})"
    )
    upsert = (
        "INSERT INTO proj_balances (aggregate_id, events, net, last_position) "
        f"VALUES ({mark}, 1, {mark}, {mark}) ON CONFLICT (aggregate_id) DO UPDATE SET "
        "events = proj_balances.events + 1, net = proj_balances.net + excluded.net, "
        "last_position = excluded.last_position"
    )
    worker = journal.worker

    def handle(connection: Any, batch: list[Any]) -> None:
        number = journal.start("tx", batch)
        cancelled = True
        try:
            cursor = connection.cursor()
            for envelope in batch:
                position = envelope.global_position
                try:
                    cursor.execute(insert, (position, str(envelope.event_id), worker))
                except Exception as error:
                    if "unique" in str(error).lower() or "duplicate" in str(error).lower():
                        journal.write("tx", "double", pos=position, error=str(error)[:200])
                    raise
                cursor.execute(
                    upsert, (envelope.aggregate_id, _signed_amount(envelope.payload), position)
                )
            time.sleep(delay)
            cancelled = False
        finally:
            journal.end("tx", number, cancelled=cancelled)

    return handle


async def wait_for_stop(directory: Path, worker: int) -> None:
    """Return once the test asked this worker (or every worker) to stop."""
    own, everyone = directory / f"stop-{worker}", directory / "stop-all"
    # Polling files another process writes: no Trio event can signal it.
    while not (own.exists() or everyone.exists()):  # noqa: ASYNC110
        await trio.sleep(_STOP_POLL)


async def run_commands(es: Any, rng: random.Random, commands: int, accounts: list[str]) -> None:
    """Random commands over ``accounts``: mostly deposits and withdrawals."""
    for _ in range(commands):
        account = rng.choice(accounts)
        roll = rng.random()
        command: Any
        if roll < 0.1:
            command = _bank.OpenAccount("w")
        elif roll < 0.65:
            command = _bank.Deposit(rng.randint(1, 100))
        else:
            command = _bank.Withdraw(rng.randint(1, 150))
        await execute_until_acknowledged(es, rng, account, command, "-")


async def project(config: Config) -> None:
    """Mode ``project`` (see the module docstring)."""
    directory = Path(config.dir)
    journal = Journal(directory, config.worker)
    postgres = is_postgres(config.target)
    stopping = trio.Event()

    def returned(calls: int) -> None:
        if calls == config.stop_after:
            stopping.set()

    makers: dict[str, Callable[[], Projection[Any]]] = {
        "plain": lambda: Projection(
            "plain", plain_handler(journal, config.delay, returned), batch_size=config.batch_size
        ),
        "tx": lambda: Projection(
            "tx",
            tx_handler(journal, config.delay, postgres),
            transactional=True,
            batch_size=config.batch_size,
        ),
    }
    rng = random.Random(config.seed)
    async with (
        open_store(config) as store,
        open_eventsourcing(
            eventstore=store,
            handle=_bank.handle,
            apply=_bank.apply,
            empty_state=_bank.Account(),
            projections=[makers[name]() for name in config.projections],
            options=RuntimeOptions(transaction_retries=100, projection_backoff=0.5),
        ) as es,
    ):
        accounts = list(config.accounts)
        for account in accounts:
            await execute_until_acknowledged(es, rng, account, _bank.OpenAccount("w"), "-")
        async with trio.open_nursery() as nursery:
            for _ in range(config.tasks):
                task_rng = random.Random(rng.random())
                nursery.start_soon(run_commands, es, task_rng, config.commands, accounts)
        (directory / f"done-{config.worker}").touch()
        async with trio.open_nursery() as nursery:

            async def asked() -> None:
                await wait_for_stop(directory, config.worker)
                stopping.set()

            nursery.start_soon(asked)
            await stopping.wait()
            nursery.cancel_scope.cancel()


async def follow(config: Config) -> None:
    """Mode ``subscribe`` (see the module docstring)."""
    directory = Path(config.dir)
    journal = Journal(directory, config.worker)
    async with open_store(config) as store, trio.open_nursery() as nursery:

        async def stop() -> None:
            await wait_for_stop(directory, config.worker)
            nursery.cancel_scope.cancel()

        nursery.start_soon(stop)
        async with subscribe(store, after=0, batch_size=config.batch_size) as batches:
            (directory / f"ready-{config.worker}").touch()
            async for batch in batches:
                journal.write("sub", "batch", pos=[e.global_position for e in batch])


def main(argv: list[str]) -> None:
    """Parse the config and run its mode."""
    (raw,) = argv
    fields = json.loads(raw)
    for name in ("projections", "accounts"):
        if name in fields:
            fields[name] = tuple(fields[name])
    config = Config(**fields)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if config.mode == "project":
        trio.run(project, config)
    elif config.mode == "subscribe":
        trio.run(follow, config)
    else:
        raise SystemExit(f"unknown mode {config.mode!r}: use project or subscribe")


if __name__ == "__main__":
    main(sys.argv[1:])

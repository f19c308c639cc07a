"""The bank account's balances as a durable read model: a transactional projection on SQLite.

Run it with ``python examples/bank_balances.py [DB] [--rebuild]``. It reuses the domain of
``examples/bank_account.py`` and keeps everything in one SQLite file: the events, and a
``balances`` table that the ``balances`` projection maintains. The projection is
transactional: its ``handle(connection, batch)`` updates the table inside the same database
transaction that moves its checkpoint, so every event is counted exactly once, however the
program stops. Run it twice on the same file: the second run starts after the first run's
checkpoint and counts only the new events (the balances add up, none twice).

It also shows read-your-writes: ``result = await es.execute(...)``, then
``await es.wait_for_projection("balances", result.global_position)``, then read the table:
the command's events are in it. ``--rebuild`` empties the table and replays every event.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sqlite3
from typing import Any

import trio

# The domain is examples/bank_account.py's (run as a script, this file's directory is on
# sys.path, so its neighbour imports as a top-level module).
from bank_account import (
    EMPTY,
    AccountOpened,
    CantWithdrawMoreThanCurrentBalance,
    CustomerDepositedCash,
    CustomerWithdrewCash,
    DepositMoney,
    OpenAccount,
    WithDrawMoney,
    apply,
    handle,
    transcoder,
)

import trio_es
from trio_es.sqlite_store import SqliteStore

# The read model's table, beside the store's tables in the same file. ``events`` counts the
# events applied to each row: a replayed event would show up there (and in the balance).
SCHEMA = """
CREATE TABLE IF NOT EXISTS balances (
    account_id TEXT PRIMARY KEY,
    balance INTEGER NOT NULL,
    events INTEGER NOT NULL
)
"""
UPSERT = """
INSERT INTO balances (account_id, balance, events) VALUES (?, ?, 1)
ON CONFLICT (account_id) DO UPDATE SET
    balance = balance + excluded.balance, events = events + 1
"""


def project_balances(
    connection: sqlite3.Connection, batch: list[trio_es.EventEnvelope[Any]]
) -> None:
    """Apply a batch of events to the ``balances`` table (in the checkpoint's transaction).

    Amounts are added, not copied from the event's ``balance``: that is what makes
    exactly-once matter, and what would show a double count. It must not commit: the
    projection commits the table's changes and the checkpoint together.
    """
    for envelope in batch:
        match envelope.payload:
            case AccountOpened():
                change = 0
            case CustomerDepositedCash(amount=amount):
                change = amount
            case CustomerWithdrewCash(amount=amount):
                change = -amount
            case _:
                continue
        connection.execute(UPSERT, (envelope.aggregate_id, change))


def reset_balances(connection: sqlite3.Connection) -> None:
    """Empty the read model before a rebuild (in the transaction that resets the checkpoint)."""
    connection.execute("DELETE FROM balances")


BALANCES: trio_es.Projection[Any] = trio_es.Projection(
    "balances", project_balances, transactional=True, reset=reset_balances
)


# Blocking reads of the file, run in worker threads (never block Trio's thread).


def _connect(path: str) -> contextlib.closing[sqlite3.Connection]:
    return contextlib.closing(sqlite3.connect(path, timeout=5.0))


def _create_table(path: str) -> None:
    with _connect(path) as connection, connection:
        connection.execute(SCHEMA)


def _read_balances(path: str) -> dict[str, tuple[int, int]]:
    with _connect(path) as connection:
        rows = connection.execute("SELECT account_id, balance, events FROM balances ORDER BY 1")
        return {account: (balance, events) for account, balance, events in rows}


def _read_checkpoint(path: str) -> int:
    with _connect(path) as connection:
        row = connection.execute(
            "SELECT position FROM trio_es_checkpoints WHERE name = ?", (BALANCES.name,)
        ).fetchone()
        return 0 if row is None else int(row[0])


async def run(path: str, *, rebuild: bool = False) -> None:
    """Move some money, read a write back from the table, and show the read model."""
    async with SqliteStore.open(path, transcoder=transcoder()) as store:
        await trio.to_thread.run_sync(_create_table, path)
        checkpoint = await trio.to_thread.run_sync(_read_checkpoint, path)
        print(f"balances in {path!r}: the projection starts after checkpoint {checkpoint}")
        async with trio_es.open_eventsourcing(
            eventstore=store,
            handle=handle,
            apply=apply,
            empty_state=EMPTY,
            projections=[BALANCES],
        ) as es:
            await es.execute("alice", OpenAccount("alice"))  # a no-op once alice is open
            await es.execute("bob", OpenAccount("bob"))
            await es.execute("alice", DepositMoney(100))
            await es.execute("bob", DepositMoney(40))
            try:
                await es.execute("bob", WithDrawMoney(1_000))
            except CantWithdrawMoreThanCurrentBalance:
                print("bob tried to withdraw 1000: rejected, nothing stored")

            # Read your own write: execute, wait for the projection, read the table.
            result = await es.execute("alice", WithDrawMoney(30))
            await es.wait_for_projection(BALANCES.name, result.global_position)
            balances = await trio.to_thread.run_sync(_read_balances, path)
            print(
                f"alice withdrew 30 (event {result.global_position}); "
                f"the balances table says alice has {balances['alice'][0]}"
            )

            if rebuild:
                head = await es.rebuild_projection(BALANCES.name)
                print(f"rebuilt the balances from scratch, replaying events 1 to {head}")
                balances = await trio.to_thread.run_sync(_read_balances, path)

            stats = (await es.projection_stats())[BALANCES.name]
            print(
                f"projection {stats.name!r}: position {stats.position}, head {stats.head}, "
                f"lag {stats.lag}, {stats.status}"
            )
            for account_id, (balance, events) in balances.items():
                account = await es.load_aggregate(account_id)
                agrees = "agrees" if balance == account.entity.balance else "DISAGREES"
                print(
                    f"  {account_id}: {balance} from {events} events in the read model, "
                    f"{agrees} with the account ({account.entity.balance})"
                )
        # The system is closed: the checkpoint covers every batch the projection finished.
        checkpoint = await trio.to_thread.run_sync(_read_checkpoint, path)
        print(f"closed; the stored checkpoint is {checkpoint}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="the bank account's balances as a transactional projection on SQLite"
    )
    parser.add_argument("db", nargs="?", default="bank_balances.db", help="the SQLite file")
    parser.add_argument(
        "--rebuild", action="store_true", help="empty the read model and replay every event"
    )
    args = parser.parse_args(argv)
    trio.run(functools.partial(run, os.fspath(args.db), rebuild=args.rebuild))


if __name__ == "__main__":
    main()

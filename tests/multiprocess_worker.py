"""A worker process for the multi-process and crash tests (run with sys.executable).

Usage::

    python multiprocess_worker.py MODE TARGET LOG WORKER SEED COMMANDS ACCOUNT...

TARGET is a PostgreSQL DSN (a ``postgres[ql]://`` URL or ``key=value`` pairs with a
``dbname``), or else a SQLite file.

MODE ``runtime`` tries to open every account (one worker wins each), then runs random
deposits and withdrawals through ``trio_es.open_eventsourcing``.
MODE ``transfer`` moves money between two accounts in one store transaction per command
(a withdrawal on one aggregate and a deposit on another: both written or neither).
``transfer:N`` runs N such tasks concurrently in the process, so that their commits are
batched (group commit); each task makes COMMANDS transfers.
MODE ``hammer:N`` runs N concurrent callers in the process, all depositing into the first
ACCOUNT (opened beforehand), COMMANDS deposits each, through ``open_eventsourcing`` with
the default ``RuntimeOptions`` and no retry of its own: any error reaching a caller makes
the process fail.

Every command carries the metadata ``("command_id", "<worker>-<n>")``. Once a command is
acknowledged (its commit returned, or the domain refused it) the worker appends one JSON
line ``{"id": ..., "account": ..., "result": "ok" | "refused"}`` to LOG with a single
``write``, so a line in the log means "acknowledged", even if the process is killed a
moment later.
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from trio_es import (
    Aggregate,
    ConcurrencyConflict,
    RuntimeOptions,
    SnapshotConfig,
    TransactionFailed,
    frequency,
    open_eventsourcing,
)

# Run as a script with tests/ on sys.path, the domain is the top-level module `_bank`;
# mypy checks tests/ as the `tests` package.
if TYPE_CHECKING:
    from tests import _bank
else:
    import _bank


class AckLog:
    """An append-only log of acknowledged commands: one ``write`` per line."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def ack(self, command_id: str, account: str, result: str) -> None:
        """Record that ``command_id`` on ``account`` was acknowledged with ``result``."""
        line = json.dumps({"id": command_id, "account": account, "result": result}) + "\n"
        os.write(self._fd, line.encode())


@asynccontextmanager
async def open_store(target: str) -> AsyncIterator[Any]:
    """The store at ``target``: a PostgreSQL DSN or a SQLite file."""
    if target.startswith(("postgresql://", "postgres://")) or "dbname=" in target:
        from trio_es.postgres_store import PostgresStore

        async with PostgresStore.open(
            target, transcoder=_bank.bank_transcoder(), pool_size=2
        ) as store:
            yield store
    else:
        from trio_es.sqlite_store import SqliteStore

        async with SqliteStore.open(target, transcoder=_bank.bank_transcoder()) as store:
            yield store


async def execute_until_acknowledged(
    es: Any, rng: random.Random, account: str, command: Any, command_id: str
) -> str:
    """Run ``command`` until it is acknowledged: "ok" or "refused".

    ``TransactionFailed`` means nothing was written, so sending the command again is safe.
    """
    while True:
        try:
            await es.execute(account, command, [("command_id", command_id)])
        except _bank.Refused:
            return "refused"
        except TransactionFailed:
            await trio.sleep(rng.uniform(0, 0.01))
            continue
        return "ok"


async def run_commands(
    target: str, log: AckLog, worker: int, rng: random.Random, commands: int, accounts: list[str]
) -> None:
    """Random deposits and withdrawals through the runtime."""
    async with (
        open_store(target) as store,
        open_eventsourcing(
            eventstore=store,
            handle=_bank.handle,
            apply=_bank.apply,
            empty_state=_bank.Account(),
            snapshot_config=SnapshotConfig(frequency(4)),
            options=RuntimeOptions(transaction_retries=50),
        ) as es,
    ):
        for account in accounts:
            command_id = f"{worker}-open-{account}"
            command: Any = _bank.OpenAccount(f"w{worker}")
            result = await execute_until_acknowledged(es, rng, account, command, command_id)
            log.ack(command_id, account, result)
        for number in range(commands):
            account = rng.choice(accounts)
            command = (
                _bank.Deposit(rng.randint(1, 100))
                if rng.random() < 0.55
                else _bank.Withdraw(rng.randint(1, 150))
            )
            command_id = f"{worker}-{number}"
            result = await execute_until_acknowledged(es, rng, account, command, command_id)
            log.ack(command_id, account, result)


async def transfer(
    store: Any, log: AckLog, prefix: str, rng: random.Random, commands: int, accounts: list[str]
) -> None:
    """Transfers between two accounts, each one store transaction over both aggregates."""
    cache: dict[str, tuple[_bank.Account, int]] = {}

    async def refresh(tx: Any, account: str) -> tuple[_bank.Account, int]:
        entity, sequence = cache.get(account, (_bank.Account(), 0))
        for envelope in await store.load_events(tx, account, sequence):
            entity, sequence = _bank.apply(entity, envelope.payload), envelope.sequence
        cache[account] = (entity, sequence)
        return entity, sequence

    for number in range(commands):
        source, target = rng.sample(accounts, 2)
        amount = rng.randint(1, 300)
        command_id = f"{prefix}-{number}"
        metadata = (("command_id", command_id),)
        while True:
            try:
                async with store.transaction() as tx:
                    src, src_sequence = await refresh(tx, source)
                    dst, dst_sequence = await refresh(tx, target)
                    if not (src.opened and dst.opened) or src.balance < amount:
                        result = "refused"
                    else:
                        result = "ok"
                        await store.commit_events(
                            tx,
                            Aggregate(source, src, src_sequence),
                            [_bank.MoneyWithdrawn(amount, src.balance - amount)],
                            metadata,
                        )
                        await store.commit_events(
                            tx,
                            Aggregate(target, dst, dst_sequence),
                            [_bank.MoneyDeposited(amount, dst.balance + amount)],
                            metadata,
                        )
            except (ConcurrencyConflict, TransactionFailed):
                continue
            break
        # The cache stays at the sequences read; the next refresh reads this commit's
        # events back like anyone else's.
        log.ack(command_id, source, result)


async def run_transfers(
    target: str,
    log: AckLog,
    worker: int,
    rng: random.Random,
    commands: int,
    accounts: list[str],
    tasks: int = 1,
) -> None:
    """``tasks`` concurrent transfer loops on one store (their commits share batches)."""
    async with open_store(target) as store:
        if tasks == 1:
            await transfer(store, log, str(worker), rng, commands, accounts)
            return
        async with trio.open_nursery() as nursery:
            for task in range(tasks):
                task_rng = random.Random(rng.random())
                prefix = f"{worker}.{task}"
                nursery.start_soon(transfer, store, log, prefix, task_rng, commands, accounts)


async def run_hammer(
    target: str, log: AckLog, worker: int, commands: int, account: str, callers: int
) -> None:
    """``callers`` tasks deposit into one account; the runtime's own retries must suffice."""
    async with (
        open_store(target) as store,
        open_eventsourcing(
            eventstore=store, handle=_bank.handle, apply=_bank.apply, empty_state=_bank.Account()
        ) as es,
    ):

        async def caller(number: int) -> None:
            for n in range(commands):
                command_id = f"{worker}.{number}-{n}"
                await es.execute(account, _bank.Deposit(1), [("command_id", command_id)])
                log.ack(command_id, account, "ok")

        async with trio.open_nursery() as nursery:
            for number in range(callers):
                nursery.start_soon(caller, number)


def main(argv: list[str]) -> None:
    """Parse the command line and run the chosen mode."""
    mode, target, log_path, worker, seed, commands, *accounts = argv
    rng = random.Random(int(seed))
    log = AckLog(log_path)
    if mode == "runtime":
        trio.run(run_commands, target, log, int(worker), rng, int(commands), accounts)
    elif mode.startswith("hammer:"):
        callers = int(mode.partition(":")[2])
        trio.run(run_hammer, target, log, int(worker), int(commands), accounts[0], callers)
    else:
        name, _, tasks = mode.partition(":")
        if name != "transfer":
            raise SystemExit(
                f"unknown mode {mode!r}: use runtime, transfer, transfer:N or hammer:N"
            )
        trio.run(
            run_transfers, target, log, int(worker), rng, int(commands), accounts, int(tasks or 1)
        )


if __name__ == "__main__":
    main(sys.argv[1:])

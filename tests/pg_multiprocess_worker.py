"""A worker process for the PostgreSQL multi-process and crash tests (run with sys.executable).

Usage::

    python pg_multiprocess_worker.py MODE DSN LOG WORKER SEED COMMANDS ACCOUNT...

MODE ``runtime`` tries to open every account (one worker wins each), then runs random
deposits and withdrawals through ``trio_es.open_eventsourcing`` on a PostgresStore.
MODE ``transfer`` moves money between two accounts in one store transaction per command
(a withdrawal on one aggregate and a deposit on another: both written or neither).

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
from typing import Any

import _bank
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
from trio_es.postgres_store import PostgresStore


class AckLog:
    """An append-only log of acknowledged commands: one ``write`` per line."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def ack(self, command_id: str, account: str, result: str) -> None:
        """Record that ``command_id`` on ``account`` was acknowledged with ``result``."""
        line = json.dumps({"id": command_id, "account": account, "result": result}) + "\n"
        os.write(self._fd, line.encode())


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
    dsn: str, log: AckLog, worker: int, rng: random.Random, commands: int, accounts: list[str]
) -> None:
    """Random deposits and withdrawals through the runtime."""
    async with (
        PostgresStore.open(dsn, transcoder=_bank.bank_transcoder(), pool_size=2) as store,
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
            command = _bank.OpenAccount(f"w{worker}")
            log.ack(
                command_id,
                account,
                await execute_until_acknowledged(es, rng, account, command, command_id),
            )
        for number in range(commands):
            account = rng.choice(accounts)
            command = (
                _bank.Deposit(rng.randint(1, 100))
                if rng.random() < 0.55
                else _bank.Withdraw(rng.randint(1, 150))
            )
            command_id = f"{worker}-{number}"
            log.ack(
                command_id,
                account,
                await execute_until_acknowledged(es, rng, account, command, command_id),
            )


async def run_transfers(
    dsn: str, log: AckLog, worker: int, rng: random.Random, commands: int, accounts: list[str]
) -> None:
    """Transfers between two accounts, each one store transaction over both aggregates."""
    async with PostgresStore.open(dsn, transcoder=_bank.bank_transcoder(), pool_size=2) as store:
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
            command_id = f"{worker}-{number}"
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
            log.ack(command_id, source, result)


def main(argv: list[str]) -> None:
    """Parse the command line and run the chosen mode."""
    mode, dsn, log_path, worker, seed, commands, *accounts = argv
    rng = random.Random(int(seed))
    run = {"runtime": run_commands, "transfer": run_transfers}[mode]
    trio.run(run, dsn, AckLog(log_path), int(worker), rng, int(commands), accounts)


if __name__ == "__main__":
    main(sys.argv[1:])

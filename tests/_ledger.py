"""Bank-ledger checks shared by the SQLite and PostgreSQL store tests.

The multi-process and crash tests run ``multiprocess_worker.py`` against a store, then read
the whole store back and check it against the workers' acknowledgement logs.
"""

from __future__ import annotations

import collections
import json
import random
import sys
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import trio

from trio_es import Aggregate, SnapshotConfig, frequency, open_eventsourcing
from trio_es._sql import StoredEvent

from . import _bank

WORKER = Path(__file__).with_name("multiprocess_worker.py")
ACCOUNTS = ["acc-a", "acc-b", "acc-c"]
SEED_BALANCE = 1000


def acks(logs: list[Path]) -> list[dict[str, str]]:
    """The acknowledgements the workers wrote to ``logs`` (missing logs hold none)."""
    return [
        json.loads(line) for path in logs if path.exists() for line in path.read_text().splitlines()
    ]


async def read_everything(store: Any) -> list[StoredEvent[Any]]:
    """Every event in ``store``, paging read_all to the end."""
    stored: list[StoredEvent[Any]] = []
    while page := await store.read_all(stored[-1].global_position if stored else 0, 500):
        stored.extend(page)
    return stored


def check_ledger(stored: list[StoredEvent[Any]]) -> dict[str, list[Any]]:
    """Check every account's stream (contiguous, balance equals replay, never negative).

    Returns the events grouped by their ``command_id`` metadata, which every event must have.
    """
    streams: dict[str, list[Any]] = collections.defaultdict(list)
    by_command: dict[str, list[Any]] = collections.defaultdict(list)
    for item in stored:
        metadata = dict(item.envelope.metadata)
        assert "command_id" in metadata, (item.envelope.aggregate_id, item.envelope.sequence)
        streams[item.envelope.aggregate_id].append(item.envelope)
        by_command[metadata["command_id"]].append(item.envelope)
    for account, stream in streams.items():
        assert [e.sequence for e in stream] == list(range(1, len(stream) + 1)), account
        entity = _bank.Account()
        for envelope in stream:
            entity = _bank.apply(entity, envelope.payload)
            if not isinstance(envelope.payload, _bank.AccountOpened):
                # Each event records the balance its command was decided on: equal to the
                # replay means no command ever acted on stale state.
                assert envelope.payload.balance == entity.balance, (account, envelope.sequence)
            assert entity.balance >= 0, (account, envelope.sequence)
    return by_command


def check_acknowledged(
    stored: list[StoredEvent[Any]],
    logs: list[Path],
    accounts: list[str],
    *,
    two_event_prefix: str | None = None,
) -> list[dict[str, str]]:
    """Exactly the acknowledged commands are stored, once each, and every account was opened.

    A command makes one event, or two when its id starts with ``two_event_prefix`` (a
    transfer). Returns the acknowledgements.
    """
    by_command = check_ledger(stored)
    acknowledged = acks(logs)
    done = {ack["id"] for ack in acknowledged if ack["result"] == "ok"}
    assert set(by_command) == done
    for command_id, envelopes in by_command.items():
        transfer = two_event_prefix is not None and command_id.startswith(two_event_prefix)
        assert len(envelopes) == (2 if transfer else 1), command_id
    opened = [a["account"] for a in acknowledged if "-open-" in a["id"] and a["result"] == "ok"]
    assert sorted(opened) == sorted(accounts)
    return acknowledged


async def check_snapshots(store: Any, accounts: list[str], *, required: bool) -> None:
    """Each account's snapshot (which must exist if ``required``) equals the replay up to it."""
    for account in accounts:
        async with store.transaction() as tx:
            snapshot = await store.load_snapshot(tx, account)
            events = await store.load_events(tx, account, 0)
        if snapshot is None:
            assert not required, account
            continue
        entity = _bank.Account()
        for envelope in events[: snapshot.sequence]:
            entity = _bank.apply(entity, envelope.payload)
        assert snapshot.entity == entity, account


def check_transfers(
    stored: list[StoredEvent[Any]], logs: list[Path], accounts: list[str], *, seed_prefix: str
) -> tuple[dict[str, list[Any]], set[str]]:
    """Acked transfers are all stored, each a withdrawal and an equal deposit; money is conserved.

    Returns the stored transfers by command id and the ids of the acknowledged ones.
    """
    by_command = check_ledger(stored)
    seeds = [e for k, events in by_command.items() if k.startswith(seed_prefix) for e in events]
    # Only the seeding (an opening and a deposit per account) is left out of the checks below.
    assert sorted(e.aggregate_id for e in seeds) == sorted(accounts * 2)
    transfers = {k: v for k, v in by_command.items() if not k.startswith(seed_prefix)}
    done = {ack["id"] for ack in acks(logs) if ack["result"] == "ok"}
    assert done <= set(transfers), sorted(done - set(transfers))[:5]
    for command_id, envelopes in transfers.items():
        assert len(envelopes) == 2, command_id
        deposited, withdrawn = sorted(envelopes, key=lambda e: type(e.payload).__name__)
        assert isinstance(withdrawn.payload, _bank.MoneyWithdrawn), command_id
        assert isinstance(deposited.payload, _bank.MoneyDeposited), command_id
        assert withdrawn.payload.amount == deposited.payload.amount
        assert withdrawn.aggregate_id != deposited.aggregate_id
    # Atomic transfers conserve money.
    balances: dict[str, _bank.Account] = collections.defaultdict(_bank.Account)
    for item in stored:
        account = item.envelope.aggregate_id
        balances[account] = _bank.apply(balances[account], item.envelope.payload)
    assert sum(a.balance for a in balances.values()) == SEED_BALANCE * len(accounts)
    return transfers, done


async def seed_accounts(store: Any, accounts: list[str], *, seed_id: Callable[[str], str]) -> None:
    """Open each account and deposit SEED_BALANCE, with command id ``seed_id(account)``."""
    for account in accounts:
        async with store.transaction() as tx:
            await store.commit_events(
                tx,
                Aggregate(account, _bank.Account(), 0),
                [_bank.AccountOpened("bank"), _bank.MoneyDeposited(SEED_BALANCE, SEED_BALANCE)],
                (("command_id", seed_id(account)),),
            )


def worker_command(
    mode: str, target: str, log: Path, worker: int, seed: int, commands: int, accounts: list[str]
) -> list[str]:
    """The command line running ``multiprocess_worker.py`` on ``target`` (file or DSN)."""
    return [
        sys.executable,
        str(WORKER),
        mode,
        target,
        str(log),
        str(worker),
        str(seed),
        str(commands),
        *accounts,
    ]


async def run_workers(commands: list[list[str]], *, env: Mapping[str, str] | None = None) -> None:
    """Run the worker command lines concurrently; every one must exit with status 0."""
    results: list[Any] = []

    async def run(command: list[str]) -> None:
        results.append(await trio.run_process(command, check=False, capture_stderr=True, env=env))

    async with trio.open_nursery() as nursery:
        for command in commands:
            nursery.start_soon(run, command)
    assert [r.returncode for r in results] == [0] * len(commands), [
        r.stderr.decode()[-3000:] for r in results
    ]


async def kill_workers_at_random(
    commands: list[list[str]],
    logs: list[Path],
    rng: random.Random,
    *,
    delays: tuple[float, float],
    env: Mapping[str, str] | None = None,
) -> None:
    """Start the workers, let each acknowledge something, then SIGKILL them at random moments."""
    processes: list[trio.Process] = []
    try:
        for command in commands:
            processes.append(await trio.lowlevel.open_process(command, env=env))
        with trio.fail_after(20):
            # Polling files another process writes: no Trio event can signal it.
            while not all(log.exists() and log.stat().st_size for log in logs):  # noqa: ASYNC110
                await trio.sleep(0.02)
        for process in processes:
            await trio.sleep(rng.uniform(*delays))
            process.kill()
    finally:
        for process in processes:
            process.kill()
            with trio.move_on_after(10, shield=True):
                await process.wait()
    assert [p.returncode for p in processes] == [-9] * len(commands)


async def run_bank_twice(
    open_store: Callable[[], AbstractAsyncContextManager[Any]],
) -> tuple[Any, Any]:
    """Open, deposit 50, withdraw 20; reopen, deposit 5: the reopened aggregate and snapshot."""

    async def run(commands: list[Any]) -> tuple[Any, Any]:
        async with (
            open_store() as store,
            open_eventsourcing(
                eventstore=store,
                handle=_bank.handle,
                apply=_bank.apply,
                empty_state=_bank.Account(),
                snapshot_config=SnapshotConfig(frequency(3)),
            ) as es,
        ):
            for command in commands:
                await es.execute("acc", command, [("by", "test")])
            return await es.load_aggregate("acc"), await es.latest_snapshot("acc")

    await run([_bank.OpenAccount("ann"), _bank.Deposit(50), _bank.Withdraw(20)])
    return await run([_bank.Deposit(5)])

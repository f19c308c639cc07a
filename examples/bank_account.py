"""The seed's bank account, on trio_es: commands, events, domain errors and a balance query.

Run it with ``trio-es demo`` (or ``python examples/bank_account.py [DB]``): it keeps the
accounts in a SQLite file, so a second run finds the first run's accounts.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any, TypeAlias

import attrs

import trio_es
from trio_es.serialization import Transcoder

# Commands


@attrs.frozen
class OpenAccount:
    account_id: str


@attrs.frozen
class DepositMoney:
    amount: int


@attrs.frozen
class WithDrawMoney:
    amount: int


BankAccountCommand: TypeAlias = OpenAccount | DepositMoney | WithDrawMoney

# Events


@attrs.frozen
class AccountOpened:
    account_id: str


@attrs.frozen
class CustomerDepositedCash:
    amount: int
    balance: int


@attrs.frozen
class CustomerWithdrewCash:
    amount: int
    balance: int


BankAccountEvent: TypeAlias = AccountOpened | CustomerDepositedCash | CustomerWithdrewCash

# The entity (amounts are whole cents: money is never a float)


@attrs.frozen
class BankAccount:
    opened: bool = False
    balance: int = 0


EMPTY = BankAccount()

# Domain errors: rejections, not crashes


class BankAccountError(trio_es.DomainError):
    """Base of the bank account's rejections."""


class CantDepositNegativeAmount(BankAccountError):
    """A deposit must be positive."""


class CantOperateOnUnopenedAccount(BankAccountError):
    """Open the account first."""


class CantWithdrawMoreThanCurrentBalance(BankAccountError):
    """The balance may never go negative."""


def handle(account: BankAccount, command: BankAccountCommand) -> list[BankAccountEvent]:
    """Decide which events a command causes, or reject it with a domain error."""
    match command:
        case OpenAccount(account_id):
            return [] if account.opened else [AccountOpened(account_id)]
        case _ if not account.opened:
            raise CantOperateOnUnopenedAccount()
        case DepositMoney(amount) if amount <= 0:
            raise CantDepositNegativeAmount(amount)
        case DepositMoney(amount):
            return [CustomerDepositedCash(amount, account.balance + amount)]
        case WithDrawMoney(amount) if amount <= 0:
            raise CantDepositNegativeAmount(amount)
        case WithDrawMoney(amount) if amount > account.balance:
            raise CantWithdrawMoreThanCurrentBalance(amount)
        case WithDrawMoney(amount):
            return [CustomerWithdrewCash(amount, account.balance - amount)]
    raise TypeError(f"not a bank account command: {command!r}")


def apply(account: BankAccount, event: BankAccountEvent) -> BankAccount:
    """Fold one event into the account."""
    match event:
        case AccountOpened():
            return BankAccount(opened=True, balance=0)
        case CustomerDepositedCash(_, balance) | CustomerWithdrewCash(_, balance):
            return attrs.evolve(account, balance=balance)
    raise TypeError(f"not a bank account event: {event!r}")


def transcoder() -> Transcoder:
    """How the bank account's events and snapshots are stored: JSON, by name and version."""
    codec = Transcoder()
    for event in (AccountOpened, CustomerDepositedCash, CustomerWithdrewCash):
        codec.register_event(event)
    codec.register_entity(BankAccount)
    return codec


@attrs.define
class Balances:
    """A read model: every account's balance, fed from committed events."""

    by_account: dict[str, int] = attrs.Factory(dict)

    def __call__(self, aggregate_id: str, events: Sequence[trio_es.EventEnvelope[Any]]) -> None:
        for envelope in events:
            payload = envelope.payload
            if isinstance(payload, AccountOpened):
                self.by_account[aggregate_id] = 0
            elif isinstance(payload, CustomerDepositedCash | CustomerWithdrewCash):
                self.by_account[aggregate_id] = payload.balance


async def demo(store: trio_es.EventStore[Any, Any, Any], out: Any = sys.stdout) -> Balances:
    """Open two accounts, move money, show a rejection, the events, a snapshot and the stats."""

    def say(text: str) -> None:
        print(text, file=out)

    balances = Balances()
    async with trio_es.open_eventsourcing(
        eventstore=store,
        handle=handle,
        apply=apply,
        empty_state=EMPTY,
        queries=[(trio_es.new_name("balances"), balances)],
        snapshot_config=trio_es.SnapshotConfig(trio_es.frequency(5)),
    ) as es:
        before = await es.aggregate_stats("alice")
        if before.current_sequence:
            account = await es.load_aggregate("alice")
            balance = account.entity.balance
            say(f"alice exists from an earlier run: sequence {account.sequence}, balance {balance}")
        await es.execute("alice", OpenAccount("alice"), metadata=[("by", "demo")])
        await es.execute("alice", DepositMoney(100))
        await es.execute("bob", OpenAccount("bob"))
        await es.execute("bob", DepositMoney(40))
        await es.execute("alice", WithDrawMoney(30))
        say("opened alice and bob (a no-op for an open account); alice +100 -30, bob +40")
        try:
            await es.execute("bob", WithDrawMoney(1_000))
        except CantWithdrawMoreThanCurrentBalance as rejected:
            say(f"bob tried to withdraw 1000: rejected with {trio_es.describe_error(rejected)}")
        alice = await es.load_aggregate("alice")
        say(f"alice's balance: {alice.entity.balance} after {alice.sequence} events")
        for envelope in await es.load_events("alice", start_from=max(alice.sequence - 3, 0)):
            say(f"  #{envelope.sequence} {envelope.payload!r} {dict(envelope.metadata)}")
        snapshot = await es.latest_snapshot("alice")
        if snapshot is not None:
            say(f"alice's latest snapshot: sequence {snapshot.sequence}")
        say(f"balances read model: {balances.by_account}")
        stats = await es.system_stats()
        say(
            f"system: {stats.total_commands_processed} commands processed, "
            f"{stats.query_actors_count} query running"
        )
    return balances


async def demo_on_sqlite(path: str | os.PathLike[str], out: Any = sys.stdout) -> None:
    """Run :func:`demo` on a SQLite file, then reopen the file to show the state survived."""
    from trio_es.sqlite_store import SqliteStore

    print(f"bank accounts in {os.fspath(path)!r} (SQLite, synchronous=FULL)", file=out)
    async with SqliteStore.open(path, transcoder=transcoder()) as store:
        await demo(store, out)
    print("closed the store; reopening it as a restarted program would:", file=out)
    async with (
        SqliteStore.open(path, transcoder=transcoder()) as store,
        trio_es.open_eventsourcing(
            eventstore=store, handle=handle, apply=apply, empty_state=EMPTY
        ) as es,
    ):
        for account_id in ("alice", "bob"):
            account = await es.load_aggregate(account_id)
            print(
                f"  {account_id}: balance {account.entity.balance}, "
                f"{account.sequence} events, reloaded from disk",
                file=out,
            )


if __name__ == "__main__":
    import trio

    trio.run(demo_on_sqlite, sys.argv[1] if len(sys.argv) > 1 else "bank_account.db")

"""A small bank-account domain shared by the store tests and the multi-process worker.

Commands: open, deposit, withdraw (refused when the balance would go negative). The
events carry the balance after them, so a replay can check that it never went negative.
"""

from __future__ import annotations

import attrs

from trio_es import DomainError
from trio_es.serialization import Transcoder


@attrs.frozen
class OpenAccount:
    """Command: open the account (refused if it is open)."""

    owner: str


@attrs.frozen
class Deposit:
    """Command: add a positive ``amount``."""

    amount: int


@attrs.frozen
class Withdraw:
    """Command: take ``amount`` out, refused when the balance would go negative."""

    amount: int


Command = OpenAccount | Deposit | Withdraw


@attrs.frozen
class AccountOpened:
    """Event: the account was opened."""

    owner: str


@attrs.frozen
class MoneyDeposited:
    """Event: ``amount`` was added; ``balance`` is the balance after it."""

    amount: int
    balance: int


@attrs.frozen
class MoneyWithdrawn:
    """Event: ``amount`` was taken out; ``balance`` is the balance after it."""

    amount: int
    balance: int


Event = AccountOpened | MoneyDeposited | MoneyWithdrawn


@attrs.frozen
class Account:
    """The entity: whether it is open, its owner and balance."""

    opened: bool = False
    owner: str = ""
    balance: int = 0


class Refused(DomainError):
    """The domain refused a command (closed account, overdraft, non-positive amount)."""


def handle(account: Account, command: Command) -> list[Event]:
    """Decide the events of ``command``; raise :class:`Refused` to reject it."""
    match command:
        case OpenAccount(owner):
            if account.opened:
                raise Refused("already open")
            return [AccountOpened(owner)]
        case Deposit(amount):
            if not account.opened or amount <= 0:
                raise Refused("cannot deposit")
            return [MoneyDeposited(amount, account.balance + amount)]
        case Withdraw(amount):
            if not account.opened or amount <= 0 or amount > account.balance:
                raise Refused("cannot withdraw")
            return [MoneyWithdrawn(amount, account.balance - amount)]
    raise TypeError(f"unknown command {command!r}")


def apply(account: Account, event: Event) -> Account:
    """Return the account after ``event``."""
    match event:
        case AccountOpened(owner):
            return Account(True, owner, 0)
        case MoneyDeposited(amount, _):
            return attrs.evolve(account, balance=account.balance + amount)
        case MoneyWithdrawn(amount, _):
            return attrs.evolve(account, balance=account.balance - amount)
    raise TypeError(f"unknown event {event!r}")


def bank_transcoder() -> Transcoder:
    """A transcoder with the bank events and entity registered."""
    transcoder = Transcoder()
    transcoder.register_event(AccountOpened)
    transcoder.register_event(MoneyDeposited)
    transcoder.register_event(MoneyWithdrawn)
    transcoder.register_entity(Account)
    return transcoder

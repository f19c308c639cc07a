"""The workloads, as plans of commands that both libraries run with the same semantics.

The domain is the bank account of ``examples/bank_account.py``: ``OpenAccount`` opens
an account (event ``AccountOpened``), ``DepositMoney(amount)`` adds to its balance
(event ``CustomerDepositedCash(amount, balance)``); one event per command. The peer's
version of the same domain is in :mod:`bench.peer`.

- **W1, one long stream**: one account is opened (not timed), then ``w1_commands``
  deposits are awaited one after the other; the throughput of every slice of
  ``w1_slice`` commands shows whether a command's cost grows with the stream.
- **W2, many streams, one caller**: ``w2_aggregates`` accounts, visited round-robin
  ``w2_commands_per_aggregate`` times (the first visit opens the account), each
  command awaited before the next is sent. All commands are timed.
- **W3, many streams, many callers**: ``w3_aggregates`` accounts are opened (not
  timed), then ``w3_callers`` concurrent callers each await their share of
  ``w3_commands`` deposits; accounts are drawn with a Zipf-like skew (rank k has weight
  1/k^s) from a fixed seed. Reports throughput and per-command latency percentiles.
- **R1, cold load**: one account with ``r1_events`` events (written in batches, not
  timed); a fresh system (trio_es) or application (peer) loads it, and the time to that
  first load is reported, without and with snapshots.
- **C1, catch-up**: ``c1_events`` events already in the store (``c1_accounts``
  accounts opened, then deposits dealt round-robin; written in big transactions, not
  timed); a projection folding them into a balance read model (account -> balance)
  starts from the beginning, and the rate at which it reaches the head is reported.

Each plan knows the balance every account must end with, so each run is checked.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections import Counter
from collections.abc import Iterator

from .settings import Sizes

__all__ = ["OPEN", "CatchUp", "Plan", "c1_catch_up", "r1_account", "w1_plan", "w2_plan", "w3_plan"]

#: The amount that stands for ``OpenAccount`` in a plan; every other amount is a deposit.
OPEN = 0

#: A command: (account name, amount); amount ``OPEN`` opens the account.
Command = tuple[str, int]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one workload run does.

    Attributes:
        name: the workload (``W1`` ...).
        setup: accounts opened before the clock starts.
        callers: one command sequence per concurrent caller, each awaited in order.
        balances: every account's balance once the plan has run.
        events: every account's event count once the plan has run.
    """

    name: str
    setup: tuple[str, ...]
    callers: tuple[tuple[Command, ...], ...]
    balances: dict[str, int]
    events: dict[str, int]

    @property
    def commands(self) -> int:
        """The timed commands (all callers)."""
        return sum(len(commands) for commands in self.callers)

    @classmethod
    def build(cls, name: str, setup: tuple[str, ...], callers: list[list[Command]]) -> Plan:
        """A plan; balances and event counts follow from the commands."""
        balances: Counter[str] = Counter({account: 0 for account in setup})
        events: Counter[str] = Counter({account: 1 for account in setup})
        for account, amount in itertools.chain.from_iterable(callers):
            balances[account] += amount  # OPEN is 0: it adds nothing
            events[account] += 1
        return cls(name, setup, tuple(map(tuple, callers)), dict(balances), dict(events))


def w1_plan(sizes: Sizes) -> Plan:
    """W1: one account, opened in setup, then ``w1_commands`` deposits of 1."""
    account = "w1-account"
    return Plan.build("W1", (account,), [[(account, 1)] * sizes.w1_commands])


def w2_plan(sizes: Sizes) -> Plan:
    """W2: round-robin over ``w2_aggregates`` accounts; the first round opens them."""
    accounts = [f"w2-{i:05d}" for i in range(sizes.w2_aggregates)]
    commands: list[Command] = []
    for visit in range(sizes.w2_commands_per_aggregate):
        for i, account in enumerate(accounts):
            commands.append((account, OPEN if visit == 0 else (i + visit) % 9 + 1))
    return Plan.build("W2", (), [commands])


def w3_plan(sizes: Sizes, seed: int) -> Plan:
    """W3: Zipf-like choice of accounts (fixed seed), dealt round-robin to the callers."""
    rng = random.Random(seed)
    accounts = [f"w3-{i:05d}" for i in range(sizes.w3_aggregates)]
    weights = [1 / (rank**sizes.w3_zipf_s) for rank in range(1, len(accounts) + 1)]
    # Which account is hot is itself random, so the hot ones are not all "first".
    ranked = accounts[:]
    rng.shuffle(ranked)
    chosen = rng.choices(ranked, weights=weights, k=sizes.w3_commands)
    callers: list[list[Command]] = [[] for _ in range(sizes.w3_callers)]
    for i, account in enumerate(chosen):
        callers[i % sizes.w3_callers].append((account, rng.randint(1, 100)))
    return Plan.build("W3", tuple(accounts), callers)


def r1_account() -> str:
    """The name of R1's long account."""
    return "r1-account"


@dataclasses.dataclass(frozen=True)
class CatchUp:
    """C1: the events in the store before a projection starts, and what it must end with.

    Event ``i`` (from 0) opens account ``i`` for the first ``len(accounts)`` events; every
    later one deposits ``i % 9 + 1`` into account ``i % len(accounts)``. So every account
    is opened before its first deposit, in any store, whatever the fill batch.

    Attributes:
        name: the workload (``C1``).
        accounts: every account, in the order they are opened.
        events: how many events the store holds.
        fill_batch: events per transaction when the store is filled.
        batch: the most events one projection batch holds (trio_es's ``batch_size``).
        balances: every account's balance once all events are folded.
    """

    name: str
    accounts: tuple[str, ...]
    events: int
    fill_batch: int
    batch: int
    balances: dict[str, int]

    def event(self, i: int) -> Command:
        """Event ``i`` as (account, amount); amount ``OPEN`` opens the account."""
        accounts = len(self.accounts)
        if i < accounts:
            return self.accounts[i], OPEN
        return self.accounts[i % accounts], i % 9 + 1

    def batches(self) -> Iterator[list[Command]]:
        """The events in store order, ``fill_batch`` at a time (one transaction each)."""
        for start in range(0, self.events, self.fill_batch):
            yield [self.event(i) for i in range(start, min(start + self.fill_batch, self.events))]


def c1_catch_up(sizes: Sizes) -> CatchUp:
    """C1: ``c1_events`` events over ``c1_accounts`` accounts, with the balances they imply."""
    if sizes.c1_events < sizes.c1_accounts:
        raise ValueError(
            f"c1_events must be at least c1_accounts (got {sizes.c1_events} < "
            f"{sizes.c1_accounts}); every account is opened by one event"
        )
    accounts = tuple(f"c1-{i:05d}" for i in range(sizes.c1_accounts))
    plan = CatchUp("C1", accounts, sizes.c1_events, sizes.c1_fill_batch, sizes.c1_batch, {})
    balances: Counter[str] = Counter()
    for i in range(sizes.c1_events):
        account, amount = plan.event(i)
        balances[account] += amount
    return dataclasses.replace(plan, balances=dict(balances))

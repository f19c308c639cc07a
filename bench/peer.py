"""The peer's side of each workload: the bank account on ``eventsourcing`` 9.5.

The domain is written the way the peer's documentation writes aggregates: a subclass
of ``eventsourcing.domain.Aggregate`` whose ``@event``-decorated methods define the
events (``Opened``, ``Deposited(amount, balance)``) and whose command methods validate
before they trigger an event, inside an ``Application`` whose command methods get the
aggregate from the repository, call it and ``save`` it. IDs are UUIDs derived from the
account name (``create_id``), as in the peer's docs on namespaced IDs.

The peer runs in its fastest documented configuration:

- ``AGGREGATE_CACHE_MAXSIZE=0``: an unbounded aggregate cache, so no command replays
  a stream.
- One caller (W1, W2, R1): ``AGGREGATE_CACHE_FASTFORWARD=n``, documented as the bigger
  win when one application instance is the only writer (no query for newer events on
  each get), and ``DEEPCOPY_FROM_AGGREGATE_CACHE=n``: skipping the copy is safe with one
  caller because every command validates before it triggers its event, so a rejected
  command never leaves a half-changed aggregate in the cache.
- 64 threads (W3): the deep copy stays on, or threads would mutate the same cached
  object. Fast-forwarding stays on (the default) on memory and PostgreSQL and is off
  on SQLite, whichever was faster on this machine (3 runs of W3 each, 6,400
  deposits): with it, a thread that lost a race catches up under the aggregate's lock
  instead of retrying on the same stale cached state (memory: ~6,400 vs ~5,500 cmd/s;
  PostgreSQL: ~1,000-1,700 vs ~270 cmd/s, 20-60x fewer conflicts), but on SQLite the
  extra query per get cost more than the conflicts it saved (~1,100 vs ~1,550 cmd/s).
- Snapshots (R1 only): ``snapshotting_intervals`` on the application class.
- PostgreSQL: ``POSTGRES_ENABLE_DB_FUNCTIONS=y`` (one round trip per insert, as in the
  peer's own speed runs); the connection pool at its defaults.

W3 runs the peer's natural concurrent form: one thread per caller
(``ThreadPoolExecutor``); a command that loses an optimistic-concurrency race
(``RecordConflictError``) is retried from a fresh get, and the retries are counted.

C1 (catch-up) runs the peer's ``ProjectionRunner`` (``eventsourcing.projection``): it
constructs the application, subscribes to its recorder after the view's tracking
position, and calls the projection's ``process_event`` for every event on its own
thread. The projection is written the way the peer's documentation writes one: a
``Projection`` whose ``@singledispatchmethod`` ``process_event`` calls the view, a
tracking recorder that updates its state and records the event's ``Tracking`` under one
lock. The view is the peer's in-memory (``POPOTrackingRecorder``) kind, picked with the
projection's own ``BALANCES_PERSISTENCE_MODULE=eventsourcing.popo``, like trio_es's
read model in C1 (the peer's durable views commit a database transaction per event).
The peer's SQLite recorder has no ``subscribe()`` (the runner raises
``NotImplementedError``), so on SQLite the application uses :class:`SqlitePullRecorder`,
which adds one returning the peer's own ``ListenNotifySubscription``: the pull its
memory and PostgreSQL subscriptions run (pages of 500 from ``select_notifications`` on a
thread of its own), without a wake-up for later commits, which catching up needs none of.
"""

from __future__ import annotations

import gc
import importlib
import importlib.metadata
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Final
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.application import Application, Repository
from eventsourcing.dispatch import singledispatchmethod
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import (
    ApplicationRecorder,
    ListenNotifySubscription,
    RecordConflictError,
    Subscription,
    Tracking,
)
from eventsourcing.popo import POPOTrackingRecorder
from eventsourcing.projection import ApplicationSubscription, Projection, ProjectionRunner
from eventsourcing.sqlite import SQLiteApplicationRecorder

from .results import Timed, Verdict
from .stores import Location
from .workloads import OPEN, CatchUp, Plan

__all__ = [
    "Account",
    "Bank",
    "BalanceView",
    "Balances",
    "SqlitePullRecorder",
    "c1_project",
    "c1_setup",
    "c1_subscribe",
    "describe",
    "env_for",
    "r1_load",
    "r1_setup",
    "run_plan",
    "store_available",
    "version",
]

#: Give up on a command after this many optimistic-concurrency conflicts in a row.
MAX_RETRIES: Final = 1_000
#: R1 saves its stream in batches of this many events.
R1_BATCH: Final = 1_000
#: C1 gives up on a catch-up that has not reached the head after this many seconds.
C1_TIMEOUT_S: Final = 3_600.0


def version() -> str:
    """The installed peer's version."""
    return importlib.metadata.version("eventsourcing")


class CantDepositNegativeAmount(Exception):
    """A deposit must be positive (the peer's version of the domain error)."""


class Account(Aggregate):
    """The bank account, in the peer's declarative style."""

    @staticmethod
    def create_id(account_id: str) -> UUID:
        """The account's UUID, derived from its name."""
        return uuid5(NAMESPACE_URL, f"/bench/accounts/{account_id}")

    @event("Opened")
    def __init__(self, account_id: str) -> None:
        self.account_id = account_id
        self.balance = 0

    def deposit(self, amount: int) -> None:
        """Validate, then trigger ``Deposited`` with the new balance."""
        if amount <= 0:
            raise CantDepositNegativeAmount(amount)
        self._deposited(amount, self.balance + amount)

    @event("Deposited")
    def _deposited(self, amount: int, balance: int) -> None:
        self.balance = balance


class Bank(Application[UUID]):
    """The application: command methods get, call and save the aggregate."""

    def open_account(self, account_id: str) -> UUID:
        """Open the account; the peer refuses a second opening with a conflict."""
        account = Account(account_id)
        self.save(account)
        return account.id

    def deposit(self, account_id: UUID, amount: int) -> None:
        """Deposit ``amount`` into the account."""
        account: Account = self.repository.get(account_id)
        account.deposit(amount)
        self.save(account)

    def balance(self, account_id: UUID) -> tuple[int, int]:
        """The account's balance and version (its event count)."""
        account: Account = self.repository.get(account_id)
        return account.balance, account.version


def _bank_class(snapshot_every: int | None) -> type[Bank]:
    if snapshot_every is None:
        return Bank
    interval: int = snapshot_every

    class SnapshottingBank(Bank):
        snapshotting_intervals: ClassVar[dict[type[Any], int]] = {Account: interval}

    return SnapshottingBank


def env_for(
    location: Location, *, concurrent: int, postgres: dict[str, str] | None = None
) -> dict[str, str]:
    """The peer's environment for ``location``; ``concurrent`` is the number of callers."""
    # See the module docstring: with one caller both switches are off; with threads the
    # copy is needed, and fast-forwarding is kept where it was faster (not on SQLite).
    fastforward = concurrent > 1 and location.kind != "sqlite"
    env = {
        "AGGREGATE_CACHE_MAXSIZE": "0",
        "AGGREGATE_CACHE_FASTFORWARD": "y" if fastforward else "n",
        "DEEPCOPY_FROM_AGGREGATE_CACHE": "y" if concurrent > 1 else "n",
    }
    if location.kind == "memory":
        env["PERSISTENCE_MODULE"] = "eventsourcing.popo"
    elif location.kind == "sqlite":
        assert location.sqlite_path is not None
        env["PERSISTENCE_MODULE"] = "eventsourcing.sqlite"
        env["SQLITE_DBNAME"] = location.sqlite_path
    elif location.kind == "postgres":
        assert postgres is not None
        env["PERSISTENCE_MODULE"] = "eventsourcing.postgres"
        env.update(postgres)
        env["POSTGRES_ENABLE_DB_FUNCTIONS"] = "y"
    else:
        raise ValueError(f"unknown store {location.kind!r}")
    return env


def store_available(kind: str) -> str | None:
    """``None`` when the peer's persistence module for ``kind`` imports, else why not."""
    module = {"memory": "popo", "sqlite": "sqlite", "postgres": "postgres"}[kind]
    try:
        importlib.import_module(f"eventsourcing.{module}")
    except ImportError as error:
        return (
            f"the peer's {kind} module does not import ({error}): peer {kind} rows are "
            "skipped; install `eventsourcing[postgres]`"
        )
    return None


def describe() -> str:
    """The peer's configuration, for the report's notes (see :func:`env_for`)."""
    return (
        f"peer `eventsourcing` {version()}: Aggregate + @event, UUID ids; "
        "AGGREGATE_CACHE_MAXSIZE=0 (unbounded cache) everywhere; one caller (W1, W2, R1): "
        "AGGREGATE_CACHE_FASTFORWARD=n, DEEPCOPY_FROM_AGGREGATE_CACHE=n; W3 (one thread per "
        "caller, conflicts retried): DEEPCOPY_FROM_AGGREGATE_CACHE=y, "
        "AGGREGATE_CACHE_FASTFORWARD=y on memory and PostgreSQL, n on SQLite (whichever was "
        "faster); PostgreSQL: POSTGRES_ENABLE_DB_FUNCTIONS=y; R1 with snapshots: "
        "snapshotting_intervals at the same interval as trio_es; C1: ProjectionRunner with "
        "an in-memory view (POPOTrackingRecorder, BALANCES_PERSISTENCE_MODULE=eventsourcing."
        "popo; the peer's durable views commit a transaction per event); on SQLite, whose "
        "recorder has no subscribe(), the application recorder adds one returning the "
        "peer's own ListenNotifySubscription (the same paged pull, 500 per page)"
    )


def _command(app: Bank, account: str, account_id: UUID, amount: int) -> Callable[[], object]:
    if amount == OPEN:
        return lambda: app.open_account(account)
    return lambda: app.deposit(account_id, amount)


def _caller(
    commands: list[Callable[[], object]],
    latencies: list[float],
    marks: list[float] | None,
    retries: list[int],
    barrier: threading.Barrier | None,
) -> None:
    clock = time.perf_counter
    if barrier is not None:
        barrier.wait()
    for command in commands:
        started = clock()
        conflicts = 0
        while True:
            try:
                command()
                break
            except RecordConflictError:
                conflicts += 1
                if conflicts > MAX_RETRIES:
                    raise
        done = clock()
        latencies.append(done - started)
        if marks is not None:
            marks.append(done)
        retries[0] += conflicts


def _verify(app: Bank, plan: Plan) -> Verdict:
    wrong: list[str] = []
    for account, balance in plan.balances.items():
        got = app.balance(Account.create_id(account))
        want = (balance, plan.events[account])
        if got != want:
            wrong.append(f"{account}: (balance, events) {got} != {want}")
    return Verdict.of(wrong, f"{len(plan.balances)} balances and event counts checked")


def run_plan(env: dict[str, str], plan: Plan) -> tuple[Timed, Verdict]:
    """Run ``plan`` on a fresh application: setup, then the callers (timed).

    One caller runs on this thread; several run on a thread each and start together.
    """
    app = Bank(env=env)
    try:
        for account in plan.setup:
            app.open_account(account)
        ids = {account: Account.create_id(account) for account in plan.balances}
        callers = [
            [_command(app, account, ids[account], amount) for account, amount in commands]
            for commands in plan.callers
        ]
        latencies: list[list[float]] = [[] for _ in callers]
        marks: list[float] = []
        retries = [[0] for _ in callers]
        gc.collect()
        if len(callers) == 1:
            started = time.perf_counter()
            _caller(callers[0], latencies[0], marks, retries[0], None)
        else:
            barrier = threading.Barrier(len(callers) + 1)
            with ThreadPoolExecutor(max_workers=len(callers)) as pool:
                futures = [
                    pool.submit(
                        _caller,
                        commands,
                        latencies[i],
                        marks if i == 0 else None,
                        retries[i],
                        barrier,
                    )
                    for i, commands in enumerate(callers)
                ]
                barrier.wait()
                started = time.perf_counter()
                for future in futures:
                    future.result()
        elapsed = time.perf_counter() - started
        verdict = _verify(app, plan)
    finally:
        app.close()
    timed = Timed.of(started, elapsed, latencies, marks, sum(r[0] for r in retries))
    return timed, verdict


def r1_setup(
    env: dict[str, str], location: Location, account: str, events: int, snapshot_every: int | None
) -> None:
    """Write R1's stream: open, then deposits of 1 saved ``R1_BATCH`` at a time.

    With snapshots, the application's ``snapshotting_intervals`` take one at every
    multiple of ``snapshot_every``. The memory store lives in the application, so for
    ``memory`` the application is kept in the location for the loads.
    """
    app = _bank_class(snapshot_every)(env=env)
    account_id = app.open_account(account)
    written = 1
    while written < events:
        aggregate: Account = app.repository.get(account_id)
        for _ in range(min(R1_BATCH, events - written)):
            aggregate.deposit(1)
        written = aggregate.version
        app.save(aggregate)
    if location.kind == "memory":
        location.shared["peer"] = app
    else:
        app.close()


def r1_load(
    env: dict[str, str], location: Location, account: str, events: int, snapshot_every: int | None
) -> tuple[float, Verdict]:
    """Time the first ``repository.get`` of R1's account by a fresh application.

    For ``memory``, whose events live inside the application that wrote them, a fresh
    ``Repository`` over that application's event and snapshot stores stands in for the
    fresh application.
    """
    account_id = Account.create_id(account)
    if location.kind == "memory":
        writer: Bank = location.shared["peer"]
        repository: Repository[UUID] = Repository(writer.events, snapshot_store=writer.snapshots)
        gc.collect()
        started = time.perf_counter()
        aggregate: Account = repository.get(account_id)
        elapsed = time.perf_counter() - started
    else:
        app = _bank_class(snapshot_every)(env=env)
        try:
            gc.collect()
            started = time.perf_counter()
            aggregate = app.repository.get(account_id)
            elapsed = time.perf_counter() - started
        finally:
            app.close()
    got = (aggregate.balance, aggregate.version)
    want = (events - 1, events)
    problems = [] if got == want else [f"(balance, events) {got} != {want}"]
    return elapsed, Verdict.of(problems, f"{events} events loaded")


# -- C1: catch-up ------------------------------------------------------------------


class SqlitePullRecorder(SQLiteApplicationRecorder):
    """The peer's SQLite application recorder, with the ``subscribe()`` it lacks.

    ``subscribe`` returns the peer's own ``ListenNotifySubscription``, which pulls pages
    of 500 notifications with ``select_notifications`` on a thread, exactly as the
    peer's memory and PostgreSQL subscriptions do. Nothing wakes it for later commits
    (SQLite has no notifications), which a catch-up over events already stored needs
    none of. Picked with ``APPLICATION_RECORDER_TOPIC`` (see :func:`c1_env`).
    """

    def subscribe(
        self, gt: int | None = None, topics: Sequence[str] = ()
    ) -> Subscription[ApplicationRecorder]:
        """A pull subscription after notification ``gt``."""
        return ListenNotifySubscription(recorder=self, gt=gt, topics=topics)


class BalanceView(POPOTrackingRecorder):
    """The balance read model (account id -> balance), in memory with its tracking.

    Each update records the event's ``Tracking`` under the recorder's lock, as the
    peer's in-memory views do. :meth:`wait_for` is the harness's precise stand-in for
    ``ProjectionRunner.wait`` (which polls with back-off up to 0.8 s).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.balances: dict[UUID, int] = {}
        self.events = 0
        self._target: int | None = None
        self._reached = threading.Event()

    def _track(self, tracking: Tracking) -> None:
        self._assert_tracking_uniqueness(tracking)
        self._insert_tracking(tracking)
        self.events += 1
        if self._target is not None and tracking.notification_id >= self._target:
            self._reached.set()

    def opened(self, account_id: UUID, tracking: Tracking) -> None:
        """Account ``account_id`` was opened: its balance is 0."""
        with self._database_lock:
            self.balances[account_id] = 0
            self._track(tracking)

    def deposited(self, account_id: UUID, amount: int, tracking: Tracking) -> None:
        """``amount`` was deposited into account ``account_id``."""
        with self._database_lock:
            self.balances[account_id] += amount
            self._track(tracking)

    def wait_for(self, application_name: str, notification_id: int, timeout: float) -> bool:
        """Wait until the tracking position reaches ``notification_id``; False on timeout."""
        with self._database_lock:
            self._target = notification_id
            current = self._max_tracking_ids[application_name]
            if current is not None and current >= notification_id:
                self._reached.set()
        return self._reached.wait(timeout)


class Balances(Projection[BalanceView]):
    """The balance projection: each account event updates the view."""

    name = "Balances"

    @singledispatchmethod
    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        """Events of other kinds only move the tracking position."""
        self.view.insert_tracking(tracking)

    @process_event.register(Account.Opened)  # type: ignore[attr-defined]
    def _opened(self, domain_event: Any, tracking: Tracking) -> None:
        self.view.opened(domain_event.originator_id, tracking)

    @process_event.register(Account.Deposited)  # type: ignore[attr-defined]
    def _deposited(self, domain_event: Any, tracking: Tracking) -> None:
        self.view.deposited(domain_event.originator_id, domain_event.amount, tracking)


def c1_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` (from :func:`env_for`) with C1's in-memory view and SQLite subscriptions."""
    env = dict(env, BALANCES_PERSISTENCE_MODULE="eventsourcing.popo")
    if env.get("PERSISTENCE_MODULE") == "eventsourcing.sqlite":
        env["APPLICATION_RECORDER_TOPIC"] = f"{__name__}:SqlitePullRecorder"
    return env


def _reader_class(location: Location) -> type[Bank]:
    """The application class C1 reads with: for memory, one over the writer's recorder."""
    if location.kind != "memory":
        return Bank
    recorder = location.shared["peer"].recorder

    class MemoryBank(Bank):
        name = "Bank"

        def construct_recorder(self) -> ApplicationRecorder:
            return recorder  # type: ignore[no-any-return]

    return MemoryBank


def c1_setup(env: dict[str, str], location: Location, catch_up: CatchUp) -> int:
    """Save C1's events, ``fill_batch`` per ``save`` (one transaction); return the head.

    For ``memory``, whose events live inside the application, the writer is kept in the
    location for the readers.
    """
    app = Bank(env=c1_env(env))
    try:
        accounts: dict[str, Account] = {}
        for batch in catch_up.batches():
            touched: dict[str, Account] = {}
            for account, amount in batch:
                if amount == OPEN:
                    aggregate = accounts[account] = Account(account)
                else:
                    aggregate = accounts[account]
                    aggregate.deposit(amount)
                touched[account] = aggregate
            app.save(*touched.values())
        head: int = app.recorder.max_notification_id() or 0
    finally:
        if location.kind == "memory":
            location.shared["peer"] = app
        else:
            app.close()
    return head


def _verify_balances(
    catch_up: CatchUp, balances: dict[UUID, int], events: int, position: int | None, head: int
) -> Verdict:
    wrong: list[str] = []
    if position != head:
        wrong.append(f"tracking position {position} != head {head}")
    if events != catch_up.events:
        wrong.append(f"{events} events processed != {catch_up.events}")
    for account, balance in catch_up.balances.items():
        got = balances.get(Account.create_id(account))
        if got != balance:
            wrong.append(f"{account}: balance {got} != {balance}")
    if len(balances) != len(catch_up.balances):
        wrong.append(f"{len(balances)} accounts in the view != {len(catch_up.balances)}")
    return Verdict.of(wrong, f"{len(catch_up.balances)} balances, event count and position checked")


def c1_project(
    env: dict[str, str], location: Location, catch_up: CatchUp, head: int
) -> tuple[float, Verdict]:
    """Time a ``ProjectionRunner`` from its start until its view has tracked the head."""
    gc.collect()
    started = time.perf_counter()
    with ProjectionRunner(
        application_class=_reader_class(location),
        projection_class=Balances,
        view_class=BalanceView,
        env=c1_env(env),
    ) as runner:
        deadline = started + C1_TIMEOUT_S
        while not runner.view.wait_for(runner.app_name, head, 0.05):
            if runner.is_interrupted.is_set():
                runner.run_forever(0)  # re-raises the processing thread's error
                raise RuntimeError("the projection runner stopped before the head")
            if time.perf_counter() > deadline:
                raise TimeoutError(f"the projection did not reach {head} in {C1_TIMEOUT_S} s")
        elapsed = time.perf_counter() - started
        view = runner.view
        verdict = _verify_balances(
            catch_up, view.balances, view.events, view.max_tracking_id(runner.app_name), head
        )
    return elapsed, verdict


def c1_subscribe(
    env: dict[str, str], location: Location, catch_up: CatchUp, head: int
) -> tuple[float, Verdict]:
    """Time an ``ApplicationSubscription`` read from the start to the head, folded inline."""
    app = _reader_class(location)(env=c1_env(env))
    opened, deposited = Account.Opened, Account.Deposited  # type: ignore[attr-defined]
    balances: dict[UUID, int] = {}
    events = 0
    position: int | None = None
    try:
        gc.collect()
        started = time.perf_counter()
        with ApplicationSubscription(app, gt=None) as subscription:
            for domain_event, tracking in subscription:
                kind = type(domain_event)
                if kind is deposited:
                    balances[domain_event.originator_id] += domain_event.amount  # type: ignore[attr-defined]
                elif kind is opened:
                    balances[domain_event.originator_id] = 0
                events += 1
                position = tracking.notification_id
                if position >= head:
                    break
        elapsed = time.perf_counter() - started
    finally:
        if location.kind != "memory":
            app.close()
    return elapsed, _verify_balances(catch_up, balances, events, position, head)

"""Projections across processes: one active instance, takeover after SIGKILL, nothing lost.

Every test runs worker processes (``projection_worker.py``) on one real database, a
SQLite file or a PostgreSQL database of the test's own, each running the same
projections: ``plain`` (non-transactional: at least once) and ``tx`` (transactional:
exactly once, its read model in the database). The handlers journal every call (start
and end, with ``time.monotonic()``, which is system-wide on Linux) to a shared file; the
checks compare the journal and the read model with ``read_all``:

* the transactional read model equals a sequential fold of ``read_all``, applied once
  (``proj_applied`` has ``global_position`` as its primary key);
* the non-transactional projection delivered every event, in order and without a gap
  within each process, again only where a process died (or was stopped) mid-batch;
* the checkpoints end at the head;
* no two processes ever ran a projection's handler at once.

The sizes are small so that the file stays quick; ``HYPOTHESIS_PROFILE=thorough`` or
``TRIO_ES_PROCESS_SOAK=1`` runs bigger, longer versions (more workers, commands and
kills). The random choices come from a seed printed by each test (set
``TRIO_ES_PROCESS_SEED`` to replay one).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from trio_es import RuntimeOptions, open_eventsourcing
from trio_es._types import StoredEvent

from . import _bank, _ledger, _pg

WORKER = Path(__file__).with_name("projection_worker.py")

#: Bigger and longer runs: more workers, commands and kills.
THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough" or os.environ.get(
    "TRIO_ES_PROCESS_SOAK", ""
) not in ("", "0")
#: The takeover bound the issue promises after the active process dies.
TAKEOVER_BOUND = 10.0
#: How soon another process's commit must reach a live subscriber.
DELIVERY_BOUND = 5.0
#: The intervals the workers use where a test does not need the defaults.
FAST = {"poll_interval": 0.2, "takeover_interval": 0.2}

SCHEMA = (
    "CREATE TABLE proj_applied (global_position BIGINT PRIMARY KEY, event_id TEXT NOT NULL, "
    "worker INTEGER NOT NULL)",
    "CREATE TABLE proj_balances (aggregate_id TEXT PRIMARY KEY, events INTEGER NOT NULL, "
    "net BIGINT NOT NULL, last_position BIGINT NOT NULL)",
)


# -- the database ------------------------------------------------------------------------


@attrs.frozen
class Target:
    """The database the processes share: a SQLite file or a PostgreSQL DSN."""

    address: str
    postgres: bool

    @contextlib.contextmanager
    def connect(self) -> Iterator[Any]:
        """A plain autocommit connection (sync: use it in a worker thread)."""
        if self.postgres:
            with _pg.connect(self.address) as connection:
                yield connection
        else:
            lite = sqlite3.connect(
                self.address, isolation_level=None, timeout=30, check_same_thread=False
            )
            try:
                yield lite
            finally:
                lite.close()

    def run(self, *statements: str) -> None:
        """Execute ``statements`` (sync: for setup, or in a worker thread)."""
        with self.connect() as connection:
            for statement in statements:
                connection.execute(statement)

    async def rows(self, query: str) -> list[tuple[Any, ...]]:
        """The rows ``query`` returns."""

        def rows() -> list[tuple[Any, ...]]:
            with self.connect() as connection:
                return [tuple(row) for row in connection.execute(query).fetchall()]

        return await trio.to_thread.run_sync(rows)

    @asynccontextmanager
    async def open(self) -> AsyncIterator[Any]:
        """The bank store on the database (this process's own)."""
        if self.postgres:
            from trio_es.postgres_store import PostgresStore

            async with PostgresStore.open(
                self.address, transcoder=_bank.bank_transcoder(), pool_size=2
            ) as store:
                yield store
        else:
            from trio_es.sqlite_store import SqliteStore

            async with SqliteStore.open(self.address, transcoder=_bank.bank_transcoder()) as store:
                yield store


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    """A fresh SQLite file or PostgreSQL database, with the transactional read model's tables."""
    if request.param == "postgres":
        made = Target(request.getfixturevalue("postgres_dsn"), postgres=True)
    else:
        made = Target(str(tmp_path / "bank.db"), postgres=False)
    made.run(*SCHEMA)
    return made


@pytest.fixture
def seed() -> int:
    """The seed of the test's random choices (printed: a failure shows it)."""
    chosen = int(os.environ.get("TRIO_ES_PROCESS_SEED") or random.randrange(2**32))
    print(f"TRIO_ES_PROCESS_SEED={chosen}")
    return chosen


# -- the worker processes ----------------------------------------------------------------


@attrs.define
class Call:
    """One handler call of a projection, as journalled by its worker."""

    worker: int
    number: int
    start: float
    positions: list[int]
    ids: list[str]
    end: float | None = None
    completed: bool = False


@attrs.define
class Journal:
    """The workers' shared journal of handler calls, read as it grows."""

    path: Path
    lines: list[dict[str, Any]] = attrs.Factory(list)
    _offset: int = 0
    _partial: bytes = b""

    def read(self) -> list[dict[str, Any]]:
        """Every complete line so far (a line being written is left for the next read)."""
        if self.path.exists():
            with self.path.open("rb") as file:
                file.seek(self._offset)
                data = file.read()
            self._offset += len(data)
            *complete, self._partial = (self._partial + data).split(b"\n")
            self.lines.extend(json.loads(line) for line in complete)
        return self.lines

    def calls(self, projection: str) -> list[Call]:
        """``projection``'s handler calls, in journal order, with their ends."""
        calls: dict[tuple[int, int], Call] = {}
        for line in self.read():
            if line["p"] != projection:
                continue
            key = (line["w"], line.get("b", 0))
            if line["ev"] == "start":
                calls[key] = Call(line["w"], line["b"], line["t"], line["pos"], line["ids"])
            elif line["ev"] == "end":
                calls[key].end = line["t"]
                calls[key].completed = not line["cancelled"]
        return list(calls.values())


@attrs.define
class Cluster:
    """Worker processes on one database, started, stopped and killed by the test."""

    target: Target
    directory: Path
    seed: int
    #: Config every worker gets (a worker's own config adds to it).
    base: dict[str, Any] = attrs.Factory(dict)
    processes: dict[int, trio.Process] = attrs.Factory(dict)
    #: Worker -> ``time.monotonic()`` right after its SIGKILL was sent.
    killed: dict[int, float] = attrs.Factory(dict)
    journal: Journal = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.journal = Journal(self.directory / "handled.jsonl")

    async def start(self, **config: Any) -> int:
        """Start a worker with ``config`` (over ``base``); return its number."""
        worker = len(self.processes)
        full = {
            "mode": "project",
            "target": self.target.address,
            "dir": str(self.directory),
            "worker": worker,
            "seed": self.seed + worker,
            **self.base,
            **config,
        }
        with (self.directory / f"worker-{worker}.err").open("wb") as stderr:
            self.processes[worker] = await trio.lowlevel.open_process(
                [sys.executable, str(WORKER), json.dumps(full)], stderr=stderr
            )
        return worker

    def alive(self) -> list[int]:
        """The workers that have not exited (or been killed)."""
        return [w for w, p in self.processes.items() if p.returncode is None]

    async def wait_for_files(self, prefix: str, workers: list[int], seconds: float) -> None:
        """Wait until ``DIR/{prefix}-{worker}`` exists for every one of ``workers``."""
        with trio.move_on_after(seconds):
            while not all((self.directory / f"{prefix}-{w}").exists() for w in workers):
                for worker in workers:
                    assert self.processes[worker].poll() is None, self.why(
                        f"worker {worker} exited before {prefix}"
                    )
                await trio.sleep(0.05)
            return
        pytest.fail(self.why(f"no {prefix} file from every worker within {seconds} s"))

    async def stop(self, *workers: int) -> None:
        """Ask ``workers`` (all live ones if none) to exit cleanly; each must exit with 0."""
        chosen = list(workers) or self.alive()
        for worker in chosen:
            (self.directory / f"stop-{worker}").touch()
        for worker in chosen:
            with trio.move_on_after(30):
                await self.processes[worker].wait()
            assert self.processes[worker].returncode == 0, self.why(
                f"worker {worker} did not exit cleanly when asked "
                f"(status {self.processes[worker].returncode})"
            )

    def kill(self, worker: int) -> None:
        """SIGKILL ``worker``, noting the time (before its real death: a lower bound)."""
        self.processes[worker].kill()
        self.killed[worker] = time.monotonic()

    async def close(self) -> None:
        """Kill whatever still runs and reap everything."""
        for process in self.processes.values():
            if process.returncode is None:
                process.kill()
            with trio.move_on_after(10, shield=True):
                await process.wait()

    def why(self, message: str) -> str:
        """``message`` with the seed and the end of every worker's stderr."""
        tails = []
        for worker in self.processes:
            err = self.directory / f"worker-{worker}.err"
            text = err.read_text(errors="replace")[-1500:] if err.exists() else ""
            if text.strip():
                tails.append(f"--- worker {worker} stderr ---\n{text}")
        return "\n".join([f"{message} (TRIO_ES_PROCESS_SEED={self.seed})", *tails])


@asynccontextmanager
async def cluster(target: Target, tmp_path: Path, seed: int, **base: Any) -> AsyncIterator[Cluster]:
    """A :class:`Cluster` whose leftover processes are killed at the end."""
    directory = tmp_path / "run"
    directory.mkdir()
    made = Cluster(target, directory, seed, base)
    try:
        yield made
    finally:
        await made.close()


@asynccontextmanager
async def bank(target: Target) -> AsyncIterator[tuple[Any, Any]]:
    """This process's store and bank system on the shared database."""
    async with (
        target.open() as store,
        open_eventsourcing(
            eventstore=store,
            handle=_bank.handle,
            apply=_bank.apply,
            empty_state=_bank.Account(),
            options=RuntimeOptions(transaction_retries=100),
        ) as es,
    ):
        yield store, es


async def seed_events(es: Any, accounts: list[str], deposits: int) -> None:
    """Open ``accounts`` and make ``deposits`` deposits spread over them."""
    for account in accounts:
        await es.execute(account, _bank.OpenAccount("test"))

    async def deposit(account: str, count: int) -> None:
        for n in range(count):
            await es.execute(account, _bank.Deposit(n + 1))

    async with trio.open_nursery() as nursery:
        for number, account in enumerate(accounts):
            count = deposits // len(accounts) + (number < deposits % len(accounts))
            nursery.start_soon(deposit, account, count)


async def keep_writing(es: Any, accounts: list[str], interval: float, rng: random.Random) -> None:
    """Deposit into a random account every ``interval`` seconds, until cancelled."""
    while True:
        await es.execute(rng.choice(accounts), _bank.Deposit(rng.randint(1, 9)))
        await trio.sleep(interval)


async def wait_caught_up(store: Any, names: list[str], seconds: float, why: Any) -> int:
    """Wait until every projection in ``names`` has its stored checkpoint at the head."""
    positions: dict[str, int] = {}
    head = -1
    with trio.move_on_after(seconds):
        while True:
            head = int(await store.head_position())
            positions = {name: await store.checkpoint_position(name) for name in names}
            if all(p == head for p in positions.values()):
                return head
            await trio.sleep(0.05)
    pytest.fail(why(f"checkpoints {positions} did not reach the head {head} in {seconds} s"))


# -- the checks --------------------------------------------------------------------------


def check_no_overlap(calls: list[Call], killed: dict[int, float], projection: str) -> None:
    """No two workers' handler calls of ``projection`` overlap in time.

    A call cut short by SIGKILL ends (for this check) when the kill was sent: earlier
    than the process really died, so a genuine overlap is never explained away.
    """
    intervals: list[tuple[float, float, Call]] = []
    for call in calls:
        end = call.end
        if end is None:
            assert call.worker in killed, (
                f"{projection}: worker {call.worker}'s handler call {call.number} never ended, "
                "though the worker was not killed"
            )
            end = killed[call.worker]
        intervals.append((call.start, end, call))
    intervals.sort(key=lambda interval: interval[0])
    for index, (_, end, call) in enumerate(intervals):
        for start, _, other in intervals[index + 1 :]:
            if start >= end:
                break
            assert other.worker == call.worker, (
                f"{projection}: two live instances processed at once: worker {call.worker}'s "
                f"call {call.number} (positions {call.positions}) ran until {end:.6f}, worker "
                f"{other.worker}'s call {other.number} (positions {other.positions}) started "
                f"at {start:.6f}"
            )


def check_deliveries(
    calls: list[Call], stored: list[StoredEvent[Any]], killed: dict[int, float]
) -> None:
    """The non-transactional projection got every event at least once, in order per process.

    Within a process the deliveries follow ``read_all`` without a gap or a repeat. An
    event is delivered again only after the batch that first delivered it was its
    process's last, cut short: killed, or cancelled by a clean shutdown.
    """
    order = [item.global_position for item in stored]
    place = {position: index for index, position in enumerate(order)}
    ids = {item.global_position: str(item.envelope.event_id) for item in stored}
    by_worker: dict[int, list[Call]] = collections.defaultdict(list)
    deliveries: dict[int, list[Call]] = collections.defaultdict(list)
    for call in calls:
        by_worker[call.worker].append(call)
        for position, event_id in zip(call.positions, call.ids, strict=True):
            assert ids.get(position) == event_id, (
                f"worker {call.worker} was handed event {event_id} at position {position}, "
                f"but read_all has {ids.get(position)} there"
            )
            deliveries[position].append(call)
    for worker, own in by_worker.items():
        places = [place[p] for call in own for p in call.positions]
        assert places == list(range(places[0], places[0] + len(places))), (
            f"worker {worker}'s deliveries are not read_all's order without gaps: "
            f"{[p for call in own for p in call.positions]}"
        )
    missing = sorted(set(order) - set(deliveries))
    assert not missing, f"events never delivered to the projection: positions {missing[:20]}"
    for position, first_to_last in deliveries.items():
        first_to_last.sort(key=lambda call: call.start)
        for call in first_to_last[:-1]:
            last = by_worker[call.worker][-1]
            cut_short = call.worker in killed or not call.completed
            assert call is last, (
                f"position {position} was delivered again after worker {call.worker}'s call "
                f"{call.number}, which was not that worker's last: a repeat without a crash"
            )
            assert cut_short, (
                f"position {position} was delivered again after worker {call.worker}'s call "
                f"{call.number} had delivered it and its handler had returned, and the worker "
                "was stopped cleanly (not killed): the clean close did not store the "
                "checkpoint of a batch it had finished, a repeat without a failure or a crash"
            )


async def check_transactional(target: Target, stored: list[StoredEvent[Any]]) -> None:
    """The transactional read model is the fold of ``read_all``, each event applied once."""
    applied = await target.rows("SELECT global_position, event_id FROM proj_applied")
    expected = {item.global_position: str(item.envelope.event_id) for item in stored}
    assert len(applied) == len(expected)
    assert dict(applied) == expected, "the applied events are not read_all's"
    fold: dict[str, tuple[int, int, int]] = {}
    for item in stored:
        envelope = item.envelope
        events, net, _ = fold.get(envelope.aggregate_id, (0, 0, 0))
        payload = envelope.payload
        amount = (
            payload.amount
            if isinstance(payload, _bank.MoneyDeposited)
            else -payload.amount
            if isinstance(payload, _bank.MoneyWithdrawn)
            else 0
        )
        fold[envelope.aggregate_id] = (events + 1, net + amount, item.global_position)
    rows = await target.rows("SELECT aggregate_id, events, net, last_position FROM proj_balances")
    assert {row[0]: tuple(row[1:]) for row in rows} == fold


def check_no_double_apply(journal: Journal) -> None:
    """No transactional handler found one of its events applied already."""
    doubles = [line for line in journal.read() if line["ev"] == "double"]
    assert not doubles, f"events applied twice by the transactional projection: {doubles[:5]}"


async def check_everything(
    run: Cluster, store: Any, projections: list[str], *, mid_batch_kills: int = 0
) -> list[StoredEvent[Any]]:
    """All the checks of the module docstring, on a stopped cluster; returns read_all."""
    stored = await _ledger.read_everything(store)
    head = await store.head_position()
    assert stored
    assert head == stored[-1].global_position
    for name in projections:
        assert await store.checkpoint_position(name) == head, run.why(f"{name}'s checkpoint")
        check_no_overlap(run.journal.calls(name), run.killed, name)
    if "plain" in projections:
        check_deliveries(run.journal.calls("plain"), stored, run.killed)
    if "tx" in projections:
        check_no_double_apply(run.journal)
        await check_transactional(run.target, stored)
    return stored


# -- the tests ---------------------------------------------------------------------------


async def test_processes_end_with_read_models_equal_to_a_fold_of_read_all(
    target: Target, tmp_path: Path, seed: int
) -> None:
    """Random commands from tasks in several processes: projections end equal to read_all's fold."""
    rng = random.Random(seed)
    workers, tasks, commands = (5, 4, 60) if THOROUGH else (3, 3, 12)
    accounts = [f"acc-{n}" for n in range(12 if THOROUGH else 8)]
    async with cluster(target, tmp_path, seed, **FAST) as run:
        started = [
            await run.start(
                tasks=tasks,
                commands=commands,
                accounts=rng.sample(accounts, rng.randint(2, len(accounts))),
                batch_size=rng.randint(1, 7),
                delay=rng.choice([0.0, 0.002, 0.01]),
            )
            for _ in range(workers)
        ]
        await run.wait_for_files("done", started, 120 if THOROUGH else 60)
        async with target.open() as store:
            # The others leave one by one (clean closes hand the leases over), then the
            # last one catches up alone.
            for worker in started[:-1]:
                await trio.sleep(rng.uniform(0, 0.3))
                await run.stop(worker)
            await wait_caught_up(store, ["plain", "tx"], 60, run.why)
            await run.stop()
            stored = await check_everything(run, store, ["plain", "tx"])
    # The premise: the commands did make events (a few are refused by the domain).
    assert len(stored) > workers * tasks * commands // 3


async def test_sigkill_mid_batch_again_and_again_loses_and_repeats_nothing(
    target: Target, tmp_path: Path, seed: int
) -> None:
    """SIGKILLs of the active process mid-batch: tx applies once, plain misses nothing."""
    rng = random.Random(seed)
    kills = 25 if THOROUGH else 5
    delay = 0.1
    accounts = [f"acc-{n}" for n in range(6)]
    async with (
        bank(target) as (store, es),
        cluster(target, tmp_path, seed, batch_size=5, delay=delay, **FAST) as run,
    ):
        await seed_events(es, accounts, 60)
        for _ in range(3):
            await run.start()
        takeovers: list[float] = []
        mid_batch: collections.Counter[str] = collections.Counter()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_writing, es, accounts, 0.1, rng)
            for kill in range(kills):
                projection = ("plain", "tx")[kill % 2]
                victim, number = await _next_call(run, projection, exclude=None)
                await trio.sleep(rng.uniform(0, delay / 3))
                seen = len(run.journal.read())
                run.kill(victim)
                killed_at = trio.current_time()
                await run.start()
                taker, _ = await _next_call(
                    run, projection, exclude=victim, after=seen, seconds=TAKEOVER_BOUND + 5
                )
                takeovers.append(trio.current_time() - killed_at)
                assert takeovers[-1] < TAKEOVER_BOUND, run.why(
                    f"{projection}: worker {taker} took over {takeovers[-1]:.1f} s after the kill"
                )
                ended = [
                    c
                    for c in run.journal.calls(projection)
                    if (c.worker, c.number) == (victim, number)
                ]
                mid_batch[projection] += ended[0].end is None
            nursery.cancel_scope.cancel()
        await wait_caught_up(store, ["plain", "tx"], 60, run.why)
        await run.stop()
        await check_everything(run, store, ["plain", "tx"])
    print(f"takeovers after SIGKILL (s): {[round(t, 2) for t in takeovers]}")
    # The premise: most kills cut a batch short (its handler was still running), the
    # transactional one's included (a transaction was open).
    assert sum(mid_batch.values()) * 2 >= kills, f"too few kills landed mid-batch: {mid_batch}"
    assert mid_batch["tx"] >= 1, f"no kill landed inside a transactional batch: {mid_batch}"


async def _next_call(
    run: Cluster,
    projection: str,
    *,
    exclude: int | None,
    after: int | None = None,
    seconds: float = 30.0,
) -> tuple[int, int]:
    """The worker and number of the next handler call of ``projection`` that starts.

    "Next": journalled after line ``after`` (default: now), by a worker other than
    ``exclude``, and (when ``after`` is not given) still running when found.
    """
    journal = run.journal
    begin = len(journal.read()) if after is None else after
    with trio.move_on_after(seconds):
        while True:
            lines = journal.read()
            starts = [
                line
                for line in lines[begin:]
                if line["p"] == projection and line["ev"] == "start" and line["w"] != exclude
            ]
            for line in starts:
                key = (line["w"], line["b"])
                running = not any(
                    other["p"] == projection
                    and other["ev"] == "end"
                    and (other["w"], other["b"]) == key
                    for other in lines[begin:]
                )
                if after is not None or running:
                    return key
            begin = begin if after is not None or not starts else len(lines)
            await trio.sleep(0.01)
    pytest.fail(run.why(f"{projection}: no handler call started within {seconds} s"))


async def test_a_standby_takes_over_within_ten_seconds_of_a_sigkill_with_default_intervals(
    target: Target, tmp_path: Path, seed: int
) -> None:
    """With the default intervals, a standby processes within 10 s of the active one's SIGKILL."""
    accounts = ["acc-a", "acc-b"]
    async with (
        bank(target) as (store, es),
        cluster(target, tmp_path, seed, projections=["plain"], batch_size=5, delay=0.2) as run,
    ):
        first = await run.start()
        await run.wait_for_files("done", [first], 30)
        second = await run.start()
        await run.wait_for_files("done", [second], 30)
        # The events come once both run: the first is active, the second its standby.
        await seed_events(es, accounts, 30)
        victim, _ = await _next_call(run, "plain", exclude=None)
        seen = len(run.journal.read())
        run.kill(victim)
        killed_at = trio.current_time()
        taker, _ = await _next_call(
            run, "plain", exclude=victim, after=seen, seconds=TAKEOVER_BOUND + 5
        )
        took = trio.current_time() - killed_at
        assert took < TAKEOVER_BOUND, run.why(f"the standby took over after {took:.1f} s")
        assert taker == ({first, second} - {victim}).pop()
        await wait_caught_up(store, ["plain"], 30, run.why)
        await run.stop()
        await check_everything(run, store, ["plain"])
    print(f"takeover after SIGKILL: {took:.2f} s")


async def test_two_live_instances_never_process_at_once(
    target: Target, tmp_path: Path, seed: int
) -> None:
    """While active instances leave and new ones join, no two run a projection's handler at once."""
    rng = random.Random(seed)
    rounds = 20 if THOROUGH else 4
    accounts = [f"acc-{n}" for n in range(4)]
    async with (
        bank(target) as (store, es),
        cluster(target, tmp_path, seed, batch_size=3, delay=0.03, **FAST) as run,
    ):
        await seed_events(es, accounts, 40)
        for _ in range(3):
            await run.start()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_writing, es, accounts, 0.03, rng)
            for turn in range(rounds):
                await trio.sleep(rng.uniform(0.3, 0.6))
                # Stop the instance active now (handing the lease over mid-stream), or
                # now and then a standby; start a newcomer either way.
                projection = rng.choice(["plain", "tx"])
                active, _ = await _next_call(run, projection, exclude=None)
                leaving = active if turn % 3 != 2 else rng.choice(run.alive())
                await run.stop(leaving)
                await run.start()
            nursery.cancel_scope.cancel()
        await wait_caught_up(store, ["plain", "tx"], 60, run.why)
        await run.stop()
        await check_everything(run, store, ["plain", "tx"])
    for projection in ("plain", "tx"):
        workers = {call.worker for call in run.journal.calls(projection)}
        # The premise: the projection did change hands while it had work to do.
        assert len(workers) >= 2, f"{projection} ran in one worker only: {workers}"


async def test_a_clean_stop_as_a_batch_returns_hands_over_without_a_repeat(
    target: Target, tmp_path: Path, seed: int
) -> None:
    """A process stopped cleanly while storing a finished batch's checkpoint stores it."""
    accounts = ["acc-a", "acc-b"]
    async with (
        bank(target) as (store, es),
        cluster(target, tmp_path, seed, projections=["plain"], batch_size=5, **FAST) as run,
    ):
        await seed_events(es, accounts, 18)
        # The first worker is the active one; it stops as soon as its second batch
        # returned, while the test holds the checkpoint table (a busy database), so the
        # stop comes while the checkpoint write waits. The lock goes after a moment,
        # well within any reasonable shutdown grace.
        first = await run.start(stop_after=2, delay=0.5)
        await run.wait_for_files("done", [first], 30)
        await run.start()
        with contextlib.ExitStack() as stack:
            blocker = await trio.to_thread.run_sync(stack.enter_context, target.connect())
            (_, number) = await _nth_start(run, "plain", first, 2)
            await trio.to_thread.run_sync(_lock_checkpoints, target, blocker)
            try:
                second_call = [c for c in run.journal.calls("plain") if c.worker == first][1]
                # The premise: the lock was in place before the batch returned.
                assert second_call.end is None, "the test took the lock too late"
                with trio.move_on_after(15):
                    await _ended(run, "plain", first, number)
                    with trio.move_on_after(0.5):
                        await run.processes[first].wait()
            finally:
                with trio.move_on_after(10, shield=True):
                    await trio.to_thread.run_sync(stack.close)
        with trio.fail_after(30):
            await run.processes[first].wait()
        assert run.processes[first].returncode == 0, run.why("the first worker's exit")
        await wait_caught_up(store, ["plain"], 30, run.why)
        await run.stop()
        await check_everything(run, store, ["plain"])
    handed = [call.positions for call in run.journal.calls("plain")]
    assert handed[:2] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]


def _lock_checkpoints(target: Target, connection: Any) -> None:
    """Start a transaction on ``connection`` that blocks every checkpoint write."""
    if target.postgres:
        connection.autocommit = False
        connection.execute("LOCK TABLE trio_es_checkpoints IN EXCLUSIVE MODE")
    else:
        connection.execute("BEGIN IMMEDIATE")


async def _nth_start(run: Cluster, projection: str, worker: int, nth: int) -> tuple[int, int]:
    """Wait until ``worker`` started its ``nth`` call of ``projection``; (worker, number)."""
    with trio.move_on_after(30):
        while True:
            own = [c for c in run.journal.calls(projection) if c.worker == worker]
            if len(own) >= nth:
                return worker, own[nth - 1].number
            await trio.sleep(0.01)
    pytest.fail(run.why(f"worker {worker} never started call {nth} of {projection}"))


async def _ended(run: Cluster, projection: str, worker: int, number: int) -> None:
    """Wait until ``worker``'s call ``number`` of ``projection`` ended."""
    while True:
        calls = run.journal.calls(projection)
        if any((c.worker, c.number, c.end is not None) == (worker, number, True) for c in calls):
            return
        await trio.sleep(0.01)


@pytest.mark.postgres
async def test_a_subscriber_survives_its_listen_connection_being_killed(
    postgres_dsn: str, tmp_path: Path, seed: int
) -> None:
    """LISTEN sessions terminated: another process's later commits still arrive, none missed."""
    target = Target(postgres_dsn, postgres=True)
    rounds = 5 if THOROUGH else 2
    accounts = ["acc-a", "acc-b"]
    async with (
        bank(target) as (store, es),
        # A poll interval that never fires in the test: only LISTEN (or its reconnection)
        # can explain a prompt delivery.
        cluster(target, tmp_path, seed, mode="subscribe", poll_interval=600.0) as run,
    ):
        worker = await run.start()
        await run.wait_for_files("ready", [worker], 30)
        for account in accounts:
            await es.execute(account, _bank.OpenAccount("test"))
        await _delivered_within(run, store, DELIVERY_BOUND)
        for turn in range(rounds):
            listeners = await target.rows(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND query ILIKE 'LISTEN%'"
            )
            assert listeners, run.why("no session of the test database is LISTENing")
            for (pid,) in listeners:
                ended = await target.rows(f"SELECT pg_terminate_backend({int(pid)}, 5000)")
                assert ended == [(True,)], f"could not terminate LISTEN session {pid}: {ended}"
            # Committed at once (likely before the listener is back), then again later
            # (on the new LISTEN connection).
            for n in range(3):
                await es.execute(accounts[n % 2], _bank.Deposit(turn * 10 + n + 1))
            took = await _delivered_within(run, store, DELIVERY_BOUND)
            print(f"round {turn}: delivered {took:.2f} s after the commits that followed the kill")
            await trio.sleep(0.5)
            await es.execute(accounts[turn % 2], _bank.Deposit(100 + turn))
            await _delivered_within(run, store, DELIVERY_BOUND)
        await run.stop()
        stored = await _ledger.read_everything(store)
    delivered = [p for line in run.journal.read() if line["ev"] == "batch" for p in line["pos"]]
    assert delivered == [item.global_position for item in stored]


async def _delivered_within(run: Cluster, store: Any, seconds: float) -> float:
    """Wait until the subscriber delivered up to the head; return how long it took."""
    head = await store.head_position()
    began = trio.current_time()
    with trio.move_on_after(seconds):
        while True:
            lines = [line for line in run.journal.read() if line["ev"] == "batch"]
            if lines and lines[-1]["pos"][-1] >= head:
                return trio.current_time() - began
            await trio.sleep(0.02)
    pytest.fail(run.why(f"the subscriber did not get up to position {head} within {seconds} s"))

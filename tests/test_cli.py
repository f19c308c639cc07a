"""The ``trio-es`` command: the demo, and the inspector commands run on real stores."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

import trio_es
from trio_es._inspect import Inspector
from trio_es.postgres_store import PostgresStore
from trio_es.sqlite_store import SqliteStore

from . import _bank


def run_demo(*args: str, cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-W", "error", "-m", "trio_es", "demo", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_demo_keeps_accounts_in_sqlite_across_runs(tmp_path: Path) -> None:
    """The demo stores accounts in a SQLite file; a second run finds the first run's accounts."""
    first = run_demo(cwd=tmp_path)
    assert "rejected with CantWithdrawMoreThanCurrentBalance" in first
    assert "alice: balance 70, 3 events, reloaded from disk" in first
    assert (tmp_path / "trio_es_demo.db").exists()
    second = run_demo(cwd=tmp_path)
    assert "alice exists from an earlier run: sequence 3, balance 70" in second
    assert "alice: balance 140, 5 events, reloaded from disk" in second
    assert "alice's latest snapshot: sequence 5" in second


def test_demo_takes_a_database_path(tmp_path: Path) -> None:
    """--db chooses the SQLite file."""
    run_demo("--db", str(tmp_path / "bank.db"), cwd=tmp_path)
    assert (tmp_path / "bank.db").exists()


def test_demo_runs_in_memory(tmp_path: Path) -> None:
    """--memory runs the same story without a file."""
    out = run_demo("--memory", cwd=tmp_path)
    assert "balances read model: {'alice': 70, 'bob': 40}" in out
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("place", [[], ["--memory"]], ids=["sqlite", "memory"])
def test_ctrl_c_stops_a_running_demo_quietly_with_status_130(
    place: list[str], tmp_path: Path
) -> None:
    """SIGINT while the demo writes: it stops at once, exits 130, prints no traceback."""
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with out.open("w") as stdout, err.open("w") as stderr:
        # --loop (hidden) repeats the demo until interrupted, so the signal lands mid-work.
        process = subprocess.Popen(
            [sys.executable, "-W", "error", "-m", "trio_es", "demo", "--loop", *place],
            cwd=tmp_path,
            stdout=stdout,
            stderr=stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            deadline = time.monotonic() + 30
            # Wait until one round is done, so that the next one is under way.
            while out.read_text().count("balances read model") < 2:
                assert process.poll() is None, err.read_text()
                assert time.monotonic() < deadline, "the demo did not get going"
                time.sleep(0.02)
            process.send_signal(signal.SIGINT)
            returncode = process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert "Traceback" not in err.read_text()
    assert err.read_text() == ""
    assert returncode == 130
    if not place:
        # The interrupted file is intact: the next run opens it and goes on.
        assert "alice exists from an earlier run" in run_demo(cwd=tmp_path)


# The inspector commands. Stores are written through trio_es itself, with the small bank
# domain of tests/_bank.py; the command runs without it (it reads the raw tables).

OpenStore = Callable[[], AbstractAsyncContextManager[Any]]
CLI = (sys.executable, "-W", "error", "-m", "trio_es")


async def populate(open_store: OpenStore) -> None:
    """alice: 3 events (snapshot at 2), bob: 1 event with metadata; snapshot every 2."""
    async with (
        open_store() as store,
        trio_es.open_eventsourcing(
            eventstore=store,
            handle=_bank.handle,
            apply=_bank.apply,
            empty_state=_bank.Account(),
            snapshot_config=trio_es.SnapshotConfig(trio_es.frequency(2)),
        ) as es,
    ):
        await es.execute("alice", _bank.OpenAccount("Alice"))
        await es.execute("alice", _bank.Deposit(100))
        await es.execute("alice", _bank.Withdraw(30))
        await es.execute("bob", _bank.OpenAccount("Bob"), metadata=[("by", "cli-test")])


async def add_deposit(open_store: OpenStore, account: str, amount: int) -> None:
    async with (
        open_store() as store,
        trio_es.open_eventsourcing(
            eventstore=store, handle=_bank.handle, apply=_bank.apply, empty_state=_bank.Account()
        ) as es,
    ):
        await es.execute(account, _bank.Deposit(amount))


def sqlite_opener(path: Path) -> OpenStore:
    return lambda: SqliteStore.open(path, transcoder=_bank.bank_transcoder())


def postgres_opener(dsn: str) -> OpenStore:
    return lambda: PostgresStore.open(dsn, transcoder=_bank.bank_transcoder(), pool_size=1)


def as_url(dsn: str) -> str:
    """The fixtures' key=value DSN as the postgresql:// URL the command takes."""
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    return (
        f"postgresql://{info.get('user', 'postgres')}@{info.get('host', '127.0.0.1')}:"
        f"{info.get('port', 5432)}/{info['dbname']}"
    )


def trio_es_cli(*args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == expect, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result


@pytest.fixture(scope="module")
def bank_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite store holding the two accounts of :func:`populate`."""
    path = tmp_path_factory.mktemp("inspect") / "bank.db"
    trio.run(populate, sqlite_opener(path))
    return path


@pytest.fixture
def bank_url(postgres_dsn: str) -> str:
    """A PostgreSQL store holding the two accounts of :func:`populate`, as a URL."""
    trio.run(populate, postgres_opener(postgres_dsn))
    return as_url(postgres_dsn)


def table_rows(output: str) -> list[list[str]]:
    """The table's data rows, split into cells on runs of two or more spaces."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    rule = next(i for i, line in enumerate(lines) if set(line) == {"─"})
    return [
        [cell.strip() for cell in line.split("  ") if cell.strip()] for line in lines[rule + 1 :]
    ]


def test_streams_prints_an_aligned_table(bank_db: Path) -> None:
    """streams: one row per stream, with counts, last sequence, snapshot and last commit."""
    out = trio_es_cli("streams", str(bank_db)).stdout
    header = next(line for line in out.splitlines() if "last sequence" in line)
    assert header.split() == [
        "type",
        "id",
        "events",
        "last",
        "sequence",
        "snapshot",
        "last",
        "recorded_at",
    ]
    rows = table_rows(out)
    assert [row[:5] for row in rows] == [
        ["default", "alice", "3", "3", "yes (sequence 2)"],
        ["default", "bob", "1", "1", "no"],
    ]
    # Aligned: every row's id column starts where the header's does.
    lines = out.splitlines()
    start = header.index(" id ") + 1
    assert all(line[start:].startswith(("alice", "bob")) for line in lines if "default" in line)


def test_streams_json(bank_db: Path) -> None:
    """streams --json: a list of objects a script can read."""
    streams = json.loads(trio_es_cli("streams", str(bank_db), "--json").stdout)
    assert [
        (s["aggregate_id"], s["events"], s["last_sequence"], s["snapshot_sequence"])
        for s in streams
    ] == [("alice", 3, 3, 2), ("bob", 1, 1, None)]
    assert all(s["last_recorded_at"].endswith("+00:00") for s in streams)


def test_events_prints_the_stream_with_payloads_as_stored_json(bank_db: Path) -> None:
    """events: sequence, type, version, recorded_at, metadata and the payload's JSON."""
    out = trio_es_cli("events", str(bank_db), "alice").stdout
    assert "aggregate 'alice' (type 'default'): 3 events" in out
    rows = table_rows(out)
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("1", "AccountOpened", "1"),
        ("2", "MoneyDeposited", "1"),
        ("3", "MoneyWithdrawn", "1"),
    ]
    assert json.loads(rows[1][-1]) == {"amount": 100, "balance": 100}
    from_two = table_rows(trio_es_cli("events", str(bank_db), "alice", "--from", "3").stdout)
    assert [r[0] for r in from_two] == ["3"]


def test_events_json_has_metadata_payload_and_event_id(bank_db: Path) -> None:
    """events --json: payload and metadata as JSON values, plus position and event id."""
    result = json.loads(trio_es_cli("events", str(bank_db), "bob", "--json").stdout)
    [event] = result["events"]
    assert result["aggregate_id"] == "bob"
    assert event["payload"] == {"owner": "Bob"}
    assert event["metadata"] == [["by", "cli-test"]]
    assert (event["sequence"], event["event_type"]) == (1, "AccountOpened")
    assert len(event["event_id"]) == 36


def test_events_of_an_unknown_aggregate_exits_6(bank_db: Path) -> None:
    """events for an id with no events: one line on stderr naming it, status 6."""
    result = trio_es_cli("events", str(bank_db), "carol", expect=6)
    assert result.stderr.count("\n") == 1
    assert "no aggregate 'carol'" in result.stderr
    assert result.stdout == ""


def test_an_id_under_two_aggregate_types_needs_type(tmp_path: Path) -> None:
    """Two systems share the tables and an id: events exits 2 unless --type picks one."""
    path = tmp_path / "shared.db"
    trio.run(populate, sqlite_opener(path))
    trio.run(
        populate,
        lambda: SqliteStore.open(
            path, transcoder=_bank.bank_transcoder(), aggregate_type="savings"
        ),
    )
    result = trio_es_cli("events", str(path), "alice", expect=2)
    assert "several types (default, savings); choose one with --type" in result.stderr
    chosen = json.loads(
        trio_es_cli("events", str(path), "alice", "--type", "savings", "--json").stdout
    )
    assert chosen["aggregate_type"] == "savings"
    assert len(chosen["events"]) == 3
    trio_es_cli("events", str(path), "alice", "--type", "cheque", expect=6)


def test_a_closed_stdout_ends_quietly(bank_db: Path) -> None:
    """A reader that goes away (a pipe into head): status 1, nothing on stderr."""
    process = subprocess.Popen(
        [*CLI, "events", str(bank_db), "alice", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None
    assert process.stderr is not None
    process.stdout.close()
    with process.stderr:
        assert process.stderr.read() == b""
    assert process.wait(timeout=30) == 1


def test_named_tables_use_the_snapshots_table_their_store_recorded(tmp_path: Path) -> None:
    """--events-table alone reads the snapshots recorded beside it, never another store's."""
    path = tmp_path / "two-stores.db"
    trio.run(populate, sqlite_opener(path))  # events/snapshots: alice's snapshot at 2

    async def populate_named() -> None:
        async with (
            SqliteStore.open(
                path,
                transcoder=_bank.bank_transcoder(),
                events_table="bank_events",
                snapshots_table="bank_snapshots",
            ) as store,
            trio_es.open_eventsourcing(
                eventstore=store,
                handle=_bank.handle,
                apply=_bank.apply,
                empty_state=_bank.Account(),
                snapshot_config=trio_es.SnapshotConfig(trio_es.frequency(3)),
            ) as es,
        ):
            await es.execute("alice", _bank.OpenAccount("Alice"))
            await es.execute("alice", _bank.Deposit(100))
            await es.execute("alice", _bank.Deposit(5))

    trio.run(populate_named)
    streams = json.loads(
        trio_es_cli("streams", str(path), "--events-table", "bank_events", "--json").stdout
    )
    assert [(s["aggregate_id"], s["snapshot_sequence"]) for s in streams] == [("alice", 3)]


def test_stats_totals(bank_db: Path) -> None:
    """stats: events, streams, snapshots, event type counts, first and last commit times."""
    stats = json.loads(trio_es_cli("stats", str(bank_db), "--json").stdout)
    assert (stats["events"], stats["streams"], stats["snapshots"]) == (4, 2, 1)
    assert stats["event_types"] == {"AccountOpened": 2, "MoneyDeposited": 1, "MoneyWithdrawn": 1}
    assert stats["first_recorded_at"] <= stats["last_recorded_at"]
    assert stats["schema_version"] == 2
    out = trio_es_cli("stats", str(bank_db)).stdout
    assert ["events", "4"] in table_rows(out)
    assert "AccountOpened" in out


def test_a_missing_path_exits_3_and_creates_nothing(tmp_path: Path) -> None:
    """A path that does not exist: status 3, one line, and no database file is made."""
    missing = tmp_path / "missing.db"
    result = trio_es_cli("streams", str(missing), expect=3)
    assert (
        result.stderr == f"trio-es: error: no such file: {str(missing)!r}; give the path of a "
        "trio_es SQLite store or a postgresql:// URL\n"
    )
    assert list(tmp_path.iterdir()) == []


def test_files_that_are_not_stores_exit_4(tmp_path: Path) -> None:
    """A text file, or a SQLite file without trio_es tables: status 4, left unchanged."""
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n")
    assert "not a trio_es store" in trio_es_cli("stats", str(text), expect=4).stderr
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE t (x)")
    connection.close()
    before = other.read_bytes()
    result = trio_es_cli("streams", str(other), expect=4)
    assert "is not a trio_es store (no such table: trio_es_schema_version)" in result.stderr
    assert result.stderr.count("\n") == 1
    assert other.read_bytes() == before


def test_a_wrong_table_name_exits_4(bank_db: Path) -> None:
    """--events-table naming a table the store does not have: status 4, naming the option."""
    result = trio_es_cli("streams", str(bank_db), "--events-table", "ledger", expect=4)
    assert "--events-table" in result.stderr


@pytest.mark.parametrize(
    "url",
    ["postgresql://me:hunter2@127.0.0.1:1/app", "postgresql://me@127.0.0.1:1/app?password=hunter2"],
    ids=["password-in-user-part", "password-in-query"],
)
def test_an_unreachable_server_exits_5(url: str) -> None:
    """A PostgreSQL URL nobody answers at: status 5, one line, the password masked."""
    result = trio_es_cli("streams", url, expect=5)
    assert result.stderr.startswith("trio-es: error: cannot connect to PostgreSQL at ")
    assert "hunter2" not in result.stderr
    assert result.stderr.count("\n") == 1


def tail_picks_up_a_new_event_then_stops_on_ctrl_c(
    store: str, open_store: OpenStore, tmp_path: Path
) -> None:
    out, err = tmp_path / "tail.out", tmp_path / "tail.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        process = subprocess.Popen(
            [*CLI, "tail", store, "--json", "--interval", "0.05"],
            stdout=stdout,
            stderr=stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            # The tail starts after the last stored event: let it start and poll, then write.
            time.sleep(1.0)
            assert process.poll() is None, err.read_text()
            assert out.read_text() == ""
            trio.run(add_deposit, open_store, "bob", 5)
            deadline = time.monotonic() + 15
            while "MoneyDeposited" not in out.read_text():
                assert process.poll() is None, err.read_text()
                assert time.monotonic() < deadline, "tail did not print the new event"
                time.sleep(0.02)
            process.send_signal(signal.SIGINT)
            returncode = process.wait(timeout=15)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    [line] = out.read_text().splitlines()
    event = json.loads(line)
    assert (event["aggregate_id"], event["sequence"]) == ("bob", 2)
    assert event["payload"] == {"amount": 5, "balance": 5}
    assert err.read_text() == ""
    assert returncode == 130


def test_tail_follows_new_events_and_exits_130_on_ctrl_c(tmp_path: Path) -> None:
    """tail prints an event committed after it started; SIGINT ends it with 130, quietly."""
    path = tmp_path / "bank.db"
    trio.run(populate, sqlite_opener(path))
    tail_picks_up_a_new_event_then_stops_on_ctrl_c(str(path), sqlite_opener(path), tmp_path)


async def test_streams_pages_through_a_big_store_and_reports_progress(tmp_path: Path) -> None:
    """streams reads page by page (keyset on the stream key) and reports each page's progress."""
    path = tmp_path / "many.db"
    async with (
        SqliteStore.open(path, transcoder=_bank.bank_transcoder()) as store,
        trio_es.open_eventsourcing(
            eventstore=store, handle=_bank.handle, apply=_bank.apply, empty_state=_bank.Account()
        ) as es,
    ):
        for n in range(7):
            await es.execute(f"account-{n}", _bank.OpenAccount(f"owner {n}"))
    reported: list[int] = []
    async with Inspector.open(str(path)) as inspector:
        assert await inspector.count_streams() == 7
        streams = await inspector.streams(page_size=3, progress=reported.append)
    assert [s.aggregate_id for s in streams] == [f"account-{n}" for n in range(7)]
    assert reported == [3, 6, 7]


@pytest.mark.postgres
def test_postgres_streams_events_and_stats(bank_url: str) -> None:
    """On a PostgreSQL store the commands print the same tables and JSON as on SQLite."""
    rows = table_rows(trio_es_cli("streams", bank_url).stdout)
    assert [row[:5] for row in rows] == [
        ["default", "alice", "3", "3", "yes (sequence 2)"],
        ["default", "bob", "1", "1", "no"],
    ]
    result = json.loads(trio_es_cli("events", bank_url, "alice", "--from", "2", "--json").stdout)
    assert [(e["sequence"], e["payload"]) for e in result["events"]] == [
        (2, {"amount": 100, "balance": 100}),
        (3, {"amount": 30, "balance": 70}),
    ]
    assert all(e["recorded_at"].endswith("+00:00") for e in result["events"])
    stats = json.loads(trio_es_cli("stats", bank_url, "--json").stdout)
    assert (stats["events"], stats["streams"], stats["snapshots"]) == (4, 2, 1)
    trio_es_cli("events", bank_url, "carol", expect=6)


@pytest.mark.postgres
def test_postgres_without_a_store_exits_4(postgres_dsn: str) -> None:
    """A reachable database with no trio_es tables: status 4, one line."""
    result = trio_es_cli("streams", as_url(postgres_dsn), expect=4)
    assert "holds no trio_es store" in result.stderr


@pytest.mark.postgres
def test_postgres_tail_follows_new_events(bank_url: str, postgres_dsn: str, tmp_path: Path) -> None:
    """tail on PostgreSQL prints a later commit, and SIGINT ends it with 130."""
    tail_picks_up_a_new_event_then_stops_on_ctrl_c(
        bank_url, postgres_opener(postgres_dsn), tmp_path
    )


def test_streams_on_a_terminal_shows_progress_then_the_table(bank_db: Path, tmp_path: Path) -> None:
    """On a terminal, streams draws rich's progress bar (transient) and then the table."""
    import pty

    err = tmp_path / "err.txt"
    leader, follower = pty.openpty()
    try:
        with err.open("w") as stderr:
            process = subprocess.Popen(
                [*CLI, "streams", str(bank_db)],
                stdout=follower,
                stderr=stderr,
                env={**os.environ, "COLUMNS": "120", "LINES": "40", "TERM": "xterm"},
            )
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the command closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert process.wait(timeout=30) == 0
    finally:
        os.close(leader)
    shown = b"".join(chunks).decode()
    assert "reading streams" in shown
    assert "yes (sequence 2)" in shown
    assert err.read_text() == ""


# `projections`: checkpoints written by real projections run through open_eventsourcing.


async def project(open_store: OpenStore, *names: str) -> None:
    """Open account 'carol', run projections ``names`` up to it, then close (checkpointing)."""

    async def ignore(batch: list[trio_es.EventEnvelope[Any]]) -> None:
        pass

    async with (
        open_store() as store,
        trio_es.open_eventsourcing(
            eventstore=store,
            handle=_bank.handle,
            apply=_bank.apply,
            empty_state=_bank.Account(),
            projections=[trio_es.Projection(name, ignore) for name in names],
        ) as es,
    ):
        result = await es.execute("carol", _bank.OpenAccount("Carol"))
        for name in names:
            await es.wait_for_projection(name, result.global_position)


def savings_opener(path: Path) -> OpenStore:
    """The same tables as :func:`sqlite_opener`, under aggregate type 'savings'."""
    return lambda: SqliteStore.open(
        path, transcoder=_bank.bank_transcoder(), aggregate_type="savings"
    )


@pytest.fixture(scope="module")
def projected_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two aggregate types in one pair of tables, with projections a little behind or not.

    'default': events 1-5, projections 'audit' and 'balances' at 5, then one more event
    (head 6). 'savings': events 7-11, projection 'balances' at 11 (its head).
    """
    path = tmp_path_factory.mktemp("projections") / "bank.db"
    trio.run(populate, sqlite_opener(path))
    trio.run(project, sqlite_opener(path), "balances", "audit")
    trio.run(add_deposit, sqlite_opener(path), "bob", 5)
    trio.run(populate, savings_opener(path))
    trio.run(project, savings_opener(path), "balances")
    return path


def test_projections_prints_checkpoint_head_and_lag_per_aggregate_type(projected_db: Path) -> None:
    """projections: one row per projection, its lag measured against its own type's head."""
    out = trio_es_cli("projections", str(projected_db)).stdout
    header = next(line for line in out.splitlines() if "updated_at" in line)
    assert header.split() == ["type", "name", "position", "head", "lag", "updated_at"]
    rows = table_rows(out)
    assert [row[:5] for row in rows] == [
        ["default", "audit", "5", "6", "1"],
        ["default", "balances", "5", "6", "1"],
        ["savings", "balances", "11", "11", "0"],
    ]
    assert all(row[5].endswith("+00:00") for row in rows)


def test_projections_json_and_type(projected_db: Path) -> None:
    """projections --json: a list of objects; --type keeps that aggregate type's ones."""
    projections = json.loads(trio_es_cli("projections", str(projected_db), "--json").stdout)
    assert [
        (p["aggregate_type"], p["name"], p["position"], p["head"], p["lag"]) for p in projections
    ] == [
        ("default", "audit", 5, 6, 1),
        ("default", "balances", 5, 6, 1),
        ("savings", "balances", 11, 11, 0),
    ]
    assert all(p["updated_at"].endswith("+00:00") for p in projections)
    savings = json.loads(
        trio_es_cli("projections", str(projected_db), "--type", "savings", "--json").stdout
    )
    assert [(p["name"], p["position"], p["head"]) for p in savings] == [("balances", 11, 11)]
    out = trio_es_cli("projections", str(projected_db), "--type", "cheque").stdout
    assert out == f"no projections of type 'cheque' in {projected_db}\n"


def test_projections_of_a_store_without_any_is_an_empty_list(bank_db: Path) -> None:
    """A store whose projections never ran: an empty list, status 0."""
    assert json.loads(trio_es_cli("projections", str(bank_db), "--json").stdout) == []
    assert trio_es_cli("projections", str(bank_db)).stdout == f"no projections in {bank_db}\n"


def test_projections_of_an_older_store_without_the_checkpoints_table(
    bank_db: Path, tmp_path: Path
) -> None:
    """A store written before projections existed has no checkpoints table: an empty list."""
    path = tmp_path / "older.db"
    path.write_bytes(bank_db.read_bytes())
    with sqlite3.connect(path) as connection:
        connection.execute("DROP TABLE trio_es_checkpoints")
    connection.close()
    before = path.read_bytes()
    assert json.loads(trio_es_cli("projections", str(path), "--json").stdout) == []
    assert trio_es_cli("projections", str(path)).stdout == f"no projections in {path}\n"
    assert path.read_bytes() == before


def test_projections_of_a_named_events_table(tmp_path: Path) -> None:
    """--events-table lists that table's projections only, however its name is cased."""
    path = tmp_path / "two-stores.db"
    trio.run(project, sqlite_opener(path), "balances")

    def named() -> AbstractAsyncContextManager[Any]:
        return SqliteStore.open(
            path,
            transcoder=_bank.bank_transcoder(),
            events_table="Bank_Events",
            snapshots_table="bank_snapshots",
        )

    trio.run(project, named, "ledger")
    trio.run(add_deposit, named, "carol", 10)

    def listed(*options: str) -> list[tuple[str, int, int]]:
        out = trio_es_cli("projections", str(path), "--json", *options).stdout
        return [(p["name"], p["position"], p["head"]) for p in json.loads(out)]

    assert listed() == [("balances", 1, 1)]
    assert listed("--events-table", "Bank_Events") == [("ledger", 1, 2)]


def test_projections_of_a_missing_store_exits_3(tmp_path: Path) -> None:
    """projections takes the other commands' errors: a missing file is status 3."""
    result = trio_es_cli("projections", str(tmp_path / "missing.db"), expect=3)
    assert result.stderr.startswith("trio-es: error: no such file: ")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.postgres
def test_postgres_projections(bank_url: str, postgres_dsn: str) -> None:
    """On PostgreSQL: the projections' checkpoints, the head and the lag, as on SQLite."""
    trio.run(project, postgres_opener(postgres_dsn), "balances", "audit")
    trio.run(add_deposit, postgres_opener(postgres_dsn), "bob", 5)
    projections = json.loads(trio_es_cli("projections", bank_url, "--json").stdout)
    assert [
        (p["aggregate_type"], p["name"], p["position"], p["head"], p["lag"]) for p in projections
    ] == [("default", "audit", 5, 6, 1), ("default", "balances", 5, 6, 1)]
    assert all(p["updated_at"].endswith("+00:00") for p in projections)
    rows = table_rows(trio_es_cli("projections", bank_url).stdout)
    assert [row[:5] for row in rows] == [
        ["default", "audit", "5", "6", "1"],
        ["default", "balances", "5", "6", "1"],
    ]


@pytest.mark.postgres
def test_postgres_projections_without_the_checkpoints_table(
    bank_url: str, postgres_dsn: str
) -> None:
    """A PostgreSQL store from before projections (no checkpoints table): an empty list."""
    assert json.loads(trio_es_cli("projections", bank_url, "--json").stdout) == []
    with psycopg.connect(postgres_dsn, autocommit=True) as connection:
        connection.execute("DROP TABLE trio_es_checkpoints")
    assert json.loads(trio_es_cli("projections", bank_url, "--json").stdout) == []
    out = trio_es_cli("projections", bank_url).stdout
    assert out.startswith("no projections in ")
    assert "postgresql://" not in out

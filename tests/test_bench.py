"""The benchmark harness (``bench/``): a tiny run must produce its tables and correct state.

Timings are never asserted, only that every workload was measured for each store and
library and that every run left exactly the balances and event counts its plan implies.
The peer (``eventsourcing``) may be missing locally, then its rows are skipped and the
report says so; on CI (``CI=true``) it is installed through the ``bench`` extra and its
absence is a failure. PostgreSQL is measured when its server answers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bench
from bench.report import Report
from bench.settings import Sizes
from bench.stats import percentile
from bench.stores import postgres_reachable
from bench.trio_side import _c1_verdict
from bench.workloads import OPEN, c1_catch_up

ROOT = Path(__file__).resolve().parent.parent
ON_CI = os.environ.get("CI") == "true"
PLAN_WORKLOADS = ("W1", "W2", "W3", "R1", "R1s", "C1")
#: The metric that shows a workload was measured.
KEYS = {"R1": "load_ms", "R1s": "load_ms", "C1": "rate"}


def _peer_installed() -> bool:
    try:
        import eventsourcing  # noqa: F401
    except ImportError:
        return False
    return True


def _stores() -> tuple[str, ...]:
    dsn = bench.Settings().postgres_dsn
    return ("memory", "sqlite") + (("postgres",) if postgres_reachable(dsn) is None else ())


def _measured(report: Report, workload: str, store: str, library: str) -> bool:
    return report.median(workload, store, library, KEYS.get(workload, "throughput")) is not None


@pytest.mark.skipif(not ON_CI, reason="only CI (CI=true) requires the peer library")
def test_the_peer_is_installed_on_ci() -> None:
    """On CI the peer library is installed (bench extra), so its rows are never skipped."""
    assert _peer_installed(), "CI=true but `eventsourcing` is missing: install '.[bench]'"


def test_smoke_run_measures_every_workload_with_correct_state(tmp_path: Path) -> None:
    """A smoke run measures every workload on every store, both libraries end in the right state."""
    stores = _stores()
    peer = _peer_installed()
    report = bench.run(
        bench.Settings.for_mode("smoke", stores=stores), out_dir=tmp_path, progress=None
    )

    problems = [
        f"{workload}/{store}: {report.state(workload, store)}"
        for workload in PLAN_WORKLOADS
        for store in stores
        if report.state(workload, store) != "ok"
    ]
    assert not problems, problems
    assert report.all_verified()
    for workload in PLAN_WORKLOADS:
        for store in stores:
            assert _measured(report, workload, store, "trio_es"), (workload, store)
            assert _measured(report, workload, store, "peer") == peer, (
                workload,
                store,
                report.notes,
            )
    for store in stores:
        if store == "memory":
            assert set(report.floor[store]) == {"Trio command round trip (no store)"}
        else:
            from_trio = {
                "sqlite": "1 row/tx from Trio via a worker thread",
                "postgres": "1 row/tx from Trio, non-blocking libpq (no thread)",
            }[store]
            assert set(report.floor[store]) == {"1 row/tx", "64 rows/tx", from_trio}
        assert all(rate > 0 for rates in report.floor[store].values() for rate in rates)
    if "sqlite" in stores:
        [loads] = report.floor_loads["sqlite"].values()
        assert len(loads) == 1
        assert loads[0] > 0
    if not peer:
        assert any("not installed" in note for note in report.notes)

    names = [target.name for target in report.targets()]
    assert any(name.startswith("W3 sqlite: events/s vs raw sqlite3") for name in names)
    assert any(name.startswith("W2 sqlite: commands/s vs raw sqlite3") for name in names)
    assert "R1 sqlite: cold load with snapshots vs the peer" in names
    markdown = (tmp_path / "latest-smoke.md").read_text()
    assert "| W3 many streams, many callers | sqlite | p99 latency (ms) |" in markdown
    assert "| C1 catch-up | sqlite | projection catch-up (events/s) |" in markdown
    for store in stores:
        assert report.median("C1", store, "trio_es", "read_rate") is not None, store
    assert "## Targets" in markdown
    if "sqlite" in stores:
        assert "| sqlite | first load, snapshots, from Trio via a worker thread |" in markdown
    assert "## Machine" in markdown
    data = json.loads((tmp_path / "latest-smoke.json").read_text())
    assert data["all_verified"] is True
    assert {row["workload"] for row in data["rows"]} == {*PLAN_WORKLOADS, "S1"}
    assert "| S1 many live aggregates | memory | runtime RSS per live aggregate (B) |" in markdown
    assert {"S1 memory: warnings logged at shutdown"} <= set(names)


def test_s1_measures_trio_es_against_bare_trio_in_fresh_processes(tmp_path: Path) -> None:
    """S1 at smoke size: every aggregate live, its three targets evaluated, no warning logged."""
    settings = bench.Settings.for_mode("smoke", stores=("memory",), workloads=("S1",))
    report = bench.run(settings, out_dir=None, progress=None)

    assert report.state("S1", "memory") == "ok"
    [trial] = report.trials["S1"]["memory"]["trio_es"]
    metrics = trial.metrics
    assert metrics["aggregates"] == 2_000
    # One task per live aggregate, no wrapper task.
    assert metrics["tasks_per_aggregate"] == 1
    for key in ("rss_per_aggregate", "rss_bare", "visits", "bare_visits"):
        assert metrics[key] > 0, key
    assert metrics["warnings"] == 0
    s1 = [target for target in report.targets() if target.name.startswith("S1 ")]
    assert len(s1) == 4
    assert all(target.status != "n/a" for target in s1)
    assert "S1 memory: warnings logged at shutdown" in [target.name for target in s1]


def test_without_the_peer_only_its_rows_are_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `eventsourcing` not importable, trio_es is still measured and the report says why."""
    monkeypatch.setitem(sys.modules, "eventsourcing", None)  # makes `import eventsourcing` fail
    settings = bench.Settings.for_mode("smoke", stores=("memory",), workloads=("W2", "R1"))
    report = bench.run(settings, out_dir=None, progress=None)

    assert report.all_verified()
    assert _measured(report, "W2", "memory", "trio_es")
    assert not _measured(report, "W2", "memory", "peer")
    assert any("`eventsourcing` is not installed" in note for note in report.notes)
    assert "peer rows are skipped" in report.markdown()


def test_command_line_prints_the_table_and_writes_results(tmp_path: Path) -> None:
    """`python -m bench --smoke` prints the markdown table and writes it under --out."""
    command = [sys.executable, "-m", "bench", "--smoke", "--stores", "memory"]
    command += ["--workloads", "W1,W2", "--out", str(tmp_path), "--quiet"]
    completed = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "| W1 one long stream | memory | throughput (cmd/s) |" in completed.stdout
    assert (tmp_path / "latest-smoke.md").read_text() == completed.stdout
    assert json.loads((tmp_path / "latest-smoke.json").read_text())["mode"] == "smoke"


def test_catch_up_events_open_each_account_first_and_imply_its_balances() -> None:
    """C1's events open every account before its deposits, and its balances sum the deposits."""
    sizes = dataclasses.replace(
        Sizes.for_mode("smoke"), c1_events=1_003, c1_accounts=10, c1_fill_batch=64
    )
    catch_up = c1_catch_up(sizes)
    events = [event for batch in catch_up.batches() for event in batch]

    assert len(events) == 1_003
    assert all(len(batch) <= 64 for batch in catch_up.batches())
    opened: set[str] = set()
    balances: dict[str, int] = {}
    for account, amount in events:
        if amount == OPEN:
            assert account not in opened
            opened.add(account)
            balances[account] = 0
        else:
            assert account in opened
            assert 1 <= amount <= 9
            balances[account] += amount
    assert balances == catch_up.balances
    with pytest.raises(ValueError, match="c1_events must be at least c1_accounts"):
        c1_catch_up(dataclasses.replace(sizes, c1_events=9))


def test_catch_up_check_names_a_wrong_balance_a_missed_event_and_a_short_checkpoint() -> None:
    """C1's check of a trio_es run reports a wrong balance, a wrong event count and position."""
    catch_up = c1_catch_up(Sizes.for_mode("smoke"))
    balances = dict(catch_up.balances)
    assert _c1_verdict(catch_up, balances, catch_up.events, 2_000, 2_000) == []

    balances["c1-00007"] += 1
    problems = _c1_verdict(catch_up, balances, catch_up.events - 1, 1_999, 2_000)
    assert problems == [
        "checkpoint 1999 != head 2000",
        f"{catch_up.events - 1} events processed != {catch_up.events}",
        f"c1-00007: balance {balances['c1-00007']} != {catch_up.balances['c1-00007']}",
    ]


def test_percentile_interpolates_linearly_between_ranks() -> None:
    """percentile() returns the ends at 0 and 100 and interpolates between closest ranks."""
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 99) == pytest.approx(3.97)
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)

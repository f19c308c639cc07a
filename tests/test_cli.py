"""The ``trio-es demo`` command that README's first command runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


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

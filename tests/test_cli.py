"""The ``trio-es demo`` command that README's first command runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


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

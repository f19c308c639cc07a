"""The programs in examples/ run as their docstrings say (the bank account's runs as the demo,
in test_cli.py)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BANK_BALANCES = ROOT / "examples" / "bank_balances.py"


def run_example(path: Path, *args: str, cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-W", "error", str(path), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_bank_balances_survive_restarts_without_double_counting(tmp_path: Path) -> None:
    """The transactional balances projection resumes from its checkpoint: no event counted twice."""
    db = str(tmp_path / "bank.db")
    first = run_example(BANK_BALANCES, db, cwd=tmp_path).splitlines()
    assert first == [
        f"balances in {db!r}: the projection starts after checkpoint 0",
        "bob tried to withdraw 1000: rejected, nothing stored",
        "alice withdrew 30 (event 5); the balances table says alice has 70",
        "projection 'balances': position 5, head 5, lag 0, running",
        "  alice: 70 from 3 events in the read model, agrees with the account (70)",
        "  bob: 40 from 2 events in the read model, agrees with the account (40)",
        "closed; the stored checkpoint is 5",
    ]
    second = run_example(BANK_BALANCES, db, cwd=tmp_path).splitlines()
    assert second == [
        f"balances in {db!r}: the projection starts after checkpoint 5",
        "bob tried to withdraw 1000: rejected, nothing stored",
        "alice withdrew 30 (event 8); the balances table says alice has 140",
        "projection 'balances': position 8, head 8, lag 0, running",
        "  alice: 140 from 5 events in the read model, agrees with the account (140)",
        "  bob: 80 from 3 events in the read model, agrees with the account (80)",
        "closed; the stored checkpoint is 8",
    ]
    # The read model is a table in the same file as the events.
    with closing(sqlite3.connect(db)) as connection:
        rows = connection.execute("SELECT account_id, balance FROM balances ORDER BY 1")
        assert rows.fetchall() == [("alice", 140), ("bob", 80)]


def test_bank_balances_rebuild_replays_every_event_once(tmp_path: Path) -> None:
    """--rebuild empties the table and replays the whole log: the same balances, not doubled."""
    db = str(tmp_path / "bank.db")
    run_example(BANK_BALANCES, db, cwd=tmp_path)
    out = run_example(BANK_BALANCES, db, "--rebuild", cwd=tmp_path).splitlines()
    assert "rebuilt the balances from scratch, replaying events 1 to 8" in out
    assert "  alice: 140 from 5 events in the read model, agrees with the account (140)" in out
    assert "  bob: 80 from 3 events in the read model, agrees with the account (80)" in out
    assert out[-1] == "closed; the stored checkpoint is 8"


def test_bank_balances_default_database_is_in_the_working_directory(tmp_path: Path) -> None:
    """Without a path the example keeps bank_balances.db in the current directory."""
    out = run_example(BANK_BALANCES, cwd=tmp_path)
    assert "the balances table says alice has 70" in out
    assert (tmp_path / "bank_balances.db").exists()

"""The command line: ``python -m bench [--quick | --full | --smoke] [options]``.

Prints progress to stderr and the markdown report to stdout, and writes the markdown
and the JSON to ``bench/results/`` (or ``--out``). Exits 1 when any run left a wrong
state (a balance or event count that its plan does not imply), 0 otherwise; a missed
performance target does not change the exit status.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from .runner import run
from .settings import STORES, WORKLOADS, Mode, Settings

__all__ = ["RESULTS_DIR", "main"]

#: Where results go by default (gitignored).
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _choices(value: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    chosen = tuple(part.strip() for part in value.split(",") if part.strip())
    unknown = [part for part in chosen if part not in allowed]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(unknown) or repr(value)}; choose from {', '.join(allowed)}"
        )
    return chosen


def parse(argv: Sequence[str] | None = None) -> tuple[Settings, Path, bool]:
    """The settings, output directory and quietness the command line asks for."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Benchmark trio_es against the eventsourcing package on the same bank-account "
            "workloads, alternating the two, on memory, SQLite and PostgreSQL."
        ),
    )
    modes = parser.add_mutually_exclusive_group()
    for name, text in (
        ("smoke", "tiny sizes, one round: checks the harness works (seconds)"),
        ("quick", "the issue's sizes, 3 rounds (a few minutes; the default)"),
        ("full", "more concurrent work, 5 rounds, C1 over 1,000,000 events (~25 minutes)"),
    ):
        modes.add_argument(f"--{name}", dest="mode", action="store_const", const=name, help=text)
    parser.add_argument(
        "--stores",
        type=lambda v: _choices(v, STORES, "store"),
        help=f"comma-separated subset of {','.join(STORES)} (default: all; PostgreSQL "
        "is skipped with a note when its server does not answer, unless named here)",
    )
    parser.add_argument(
        "--workloads",
        type=lambda v: _choices(v, WORKLOADS, "workload"),
        help=f"comma-separated subset of {','.join(WORKLOADS)} (default: all)",
    )
    parser.add_argument("--rounds", type=int, help="rounds per workload (default: by mode)")
    parser.add_argument(
        "--postgres-dsn",
        help="the PostgreSQL server's maintenance database; the benchmark creates and drops "
        "a database of its own there (default: $TRIO_ES_BENCH_POSTGRES_DSN, "
        "$TRIO_ES_TEST_POSTGRES_DSN or postgresql://postgres@127.0.0.1:5432/postgres)",
    )
    parser.add_argument("--no-peer", action="store_true", help="measure trio_es only")
    parser.add_argument(
        "--out", type=Path, default=RESULTS_DIR, help=f"results directory (default: {RESULTS_DIR})"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    mode: Mode = args.mode or "quick"
    changes: dict[str, object] = {"peer": not args.no_peer}
    if args.stores:
        changes["stores"] = args.stores
        changes["postgres_required"] = "postgres" in args.stores
    if args.workloads:
        changes["workloads"] = args.workloads
    if args.postgres_dsn:
        changes["postgres_dsn"] = args.postgres_dsn
    settings = Settings.for_mode(mode, **changes)
    if args.rounds is not None:
        if args.rounds < 1:
            parser.error("--rounds must be at least 1")
        settings = settings.with_rounds(args.rounds)
    return settings, args.out, args.quiet


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark the command line describes; print the markdown report."""
    settings, out_dir, quiet = parse(argv)
    report = run(settings, out_dir=out_dir, **({"progress": None} if quiet else {}))
    print(report.markdown(), end="")
    return 0 if report.all_verified() else 1

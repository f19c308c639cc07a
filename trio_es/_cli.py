"""The ``trio-es`` console command (also ``python -m trio_es``)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import trio

__all__ = ["load_example", "main"]


def load_example() -> ModuleType:
    """Import ``examples/bank_account.py``: shipped in the wheel, or from a source checkout."""
    try:
        return importlib.import_module("trio_es._examples.bank_account")
    except ImportError:
        pass
    path = Path(__file__).resolve().parent.parent / "examples" / "bank_account.py"
    spec = importlib.util.spec_from_file_location("trio_es_examples_bank_account", path)
    if spec is None or spec.loader is None or not path.exists():
        raise SystemExit(f"trio-es: the bank account example is missing (looked for {path})")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the chosen command."""
    parser = argparse.ArgumentParser(prog="trio-es", description="Event sourcing for Trio.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="run the bank account example on a SQLite file and print what happened"
    )
    place = demo.add_mutually_exclusive_group()
    place.add_argument(
        "--db",
        default="trio_es_demo.db",
        help="the SQLite file to keep the accounts in (default: %(default)s); run the "
        "demo twice to see the first run's accounts come back",
    )
    place.add_argument("--memory", action="store_true", help="keep the accounts in memory")
    args = parser.parse_args(argv)
    if args.command == "demo":
        example = load_example()
        if args.memory:
            from .memory_store import MemoryStore

            trio.run(example.demo, MemoryStore())
        else:
            trio.run(example.demo_on_sqlite, args.db)
    return 0

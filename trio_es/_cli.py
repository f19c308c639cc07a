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
    commands.add_parser("demo", help="run the bank account example and print what happened")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .memory_store import MemoryStore

        example = load_example()
        trio.run(example.demo, MemoryStore())
    return 0

"""The ``trio-es`` console command (also ``python -m trio_es``).

Ctrl-C: every command runs under :func:`run_until_interrupted`, which takes SIGINT itself
(``trio.open_signal_receiver``) instead of letting Python raise ``KeyboardInterrupt``. A
``KeyboardInterrupt`` raised where Python swallows it (in a garbage-collection callback,
a ``__del__``) would leave the program running and writing; a received signal cannot be
lost. The command's work is cancelled, its stores close as on any cancellation, and it
exits with status 130 (128 + SIGINT, as a shell reports a Ctrl-C) without a traceback.

Hidden option, for tests: ``trio-es demo --loop`` runs the demo again and again until
interrupted, so that a test can send SIGINT while it is writing.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import ModuleType

import trio

__all__ = ["INTERRUPTED", "load_example", "main", "run_until_interrupted"]

#: The exit status after Ctrl-C: 128 + SIGINT, what a shell reports for a killed program.
INTERRUPTED = 128 + signal.SIGINT


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


async def run_until_interrupted(work: Callable[[], Awaitable[object]]) -> int:
    """Run ``work`` until it returns (status 0) or SIGINT arrives (status 130).

    SIGINT is received, not raised: the first one cancels ``work``, which unwinds as on
    any cancellation (``finally`` blocks, store closing), and this returns
    :data:`INTERRUPTED`. Signals arriving while it unwinds are taken and ignored, so a
    second Ctrl-C cannot interrupt the cleanup halfway. An error raised by ``work``
    propagates as usual.

    Must be called in the main thread (where Python runs signal handlers).
    """
    interrupted = False
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def cancel_on_interrupt() -> None:
                nonlocal interrupted
                async for _ in signals:
                    interrupted = True
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(cancel_on_interrupt)
            await work()
            nursery.cancel_scope.cancel()
    return INTERRUPTED if interrupted else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the chosen command, and return the exit status.

    The status is 0 on success and 130 after Ctrl-C (see :func:`run_until_interrupted`;
    a Ctrl-C that arrives before the command's event loop starts ends it the same way).
    """
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return INTERRUPTED


def _main(argv: Sequence[str] | None) -> int:
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
    # Hidden, for tests: repeat the demo until Ctrl-C, so a signal can land mid-write.
    demo.add_argument("--loop", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.command == "demo":
        example = load_example()
        from .memory_store import MemoryStore

        async def run_demo() -> None:
            while True:
                if args.memory:
                    await example.demo(MemoryStore())
                else:
                    await example.demo_on_sqlite(args.db)
                if not args.loop:
                    return

        return trio.run(run_until_interrupted, run_demo)
    return 0

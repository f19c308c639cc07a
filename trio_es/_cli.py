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
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio
from rich.text import Text

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from ._inspect import EventRow, Inspector

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
    _add_inspector_commands(commands)
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
    return _inspect_main(args)


# The inspector commands: read a store's tables and print them (see docs/cli.md).


def _add_inspector_commands(commands: Any) -> None:
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("store", metavar="STORE", help="a SQLite file or a postgresql:// URL")
    store.add_argument(
        "--events-table", default="events", help="the events table (default: %(default)s)"
    )
    store.add_argument(
        "--snapshots-table",
        default=None,
        help="the snapshots table (default: the one the store recorded beside its events table)",
    )
    store.add_argument("--json", action="store_true", help="print JSON, for scripts")
    commands.add_parser(
        "streams",
        parents=[store],
        help="list every aggregate stream: events, last sequence, snapshot, last commit",
    )
    events = commands.add_parser("events", parents=[store], help="print one stream's events")
    events.add_argument("aggregate_id", metavar="ID", help="the aggregate id")
    events.add_argument(
        "--from",
        dest="start_from",
        type=_positive_int,
        default=1,
        metavar="N",
        help="start at sequence N (default: 1)",
    )
    events.add_argument(
        "--type",
        dest="aggregate_type",
        help="the aggregate type, needed when several types share the id",
    )
    tail = commands.add_parser("tail", parents=[store], help="follow new events live until Ctrl-C")
    tail.add_argument(
        "--interval",
        type=_positive_float,
        default=0.5,
        metavar="SECONDS",
        help="seconds between polls (default: %(default)s)",
    )
    commands.add_parser("stats", parents=[store], help="print totals over the store")
    projections = commands.add_parser(
        "projections",
        parents=[store],
        help="list the projections: checkpoint, head, lag and last checkpoint write",
    )
    projections.add_argument(
        "--type",
        dest="aggregate_type",
        help="only the projections of this aggregate type (default: of every type)",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int (got {text!r})")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds (got {text!r})")
    return value


def _inspect_main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ._inspect import EXIT_USAGE, InspectError

    out = Console(
        highlight=False,
        soft_wrap=False,
        # Piped output is not cut to 80 columns: a script reads whole rows.
        width=None if sys.stdout.isatty() else 100_000,
    )

    failure: InspectError | ValueError | None = None
    broken_pipe = False

    async def work() -> None:
        # Caught here, inside the nursery of run_until_interrupted, so that they arrive
        # as themselves rather than wrapped in an ExceptionGroup.
        nonlocal failure, broken_pipe
        try:
            await _run_inspector(args, out)
        except (InspectError, ValueError) as error:
            # ValueError: a table name that is not a plain identifier.
            failure = error
        except BrokenPipeError:
            # The reader went away (`trio-es events ... | head`): stop quietly.
            broken_pipe = True

    status = trio.run(run_until_interrupted, work)
    if broken_pipe:
        # Python would report the failed flush of stdout at exit; point it elsewhere.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    if failure is not None:
        print(f"trio-es: error: {failure}", file=sys.stderr)
        return failure.exit_code if isinstance(failure, InspectError) else EXIT_USAGE
    return status


async def _run_inspector(args: argparse.Namespace, out: Console) -> None:
    from ._inspect import Inspector

    async with Inspector.open(
        args.store, events_table=args.events_table, snapshots_table=args.snapshots_table
    ) as inspector:
        if args.command == "streams":
            await _streams(inspector, args, out)
        elif args.command == "events":
            await _events(inspector, args, out)
        elif args.command == "tail":
            await _tail(inspector, args, out)
        elif args.command == "stats":
            await _stats(inspector, args, out)
        elif args.command == "projections":
            await _projections(inspector, args, out)


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _table(*columns: str, right: Sequence[str] = ()) -> Table:
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for column in columns:
        table.add_column(column, justify="right" if column in right else "left")
    return table


async def _streams(inspector: Inspector, args: argparse.Namespace, out: Console) -> None:
    if out.is_terminal and not args.json:
        from rich.progress import Progress

        total = await inspector.count_streams()
        with Progress(console=out, transient=True) as progress:
            task = progress.add_task("reading streams", total=total)
            streams = await inspector.streams(
                progress=lambda done: progress.update(task, completed=done)
            )
    else:
        streams = await inspector.streams()
    if args.json:
        _print_json([attrs.asdict(stream) for stream in streams])
        return
    if not streams:
        out.print(Text(f"no streams in {args.store}"))
        return
    table = _table(
        "type",
        "id",
        "events",
        "last sequence",
        "snapshot",
        "last recorded_at",
        right=("events", "last sequence"),
    )
    for s in streams:
        snapshot = "no" if s.snapshot_sequence is None else f"yes (sequence {s.snapshot_sequence})"
        table.add_row(
            *map(
                Text,
                (
                    s.aggregate_type,
                    s.aggregate_id,
                    str(s.events),
                    str(s.last_sequence),
                    snapshot,
                    s.last_recorded_at,
                ),
            )
        )
    out.print(table)


def _json_text(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


async def _events(inspector: Inspector, args: argparse.Namespace, out: Console) -> None:
    from ._inspect import EXIT_UNKNOWN_AGGREGATE, EXIT_USAGE, InspectError

    types = await inspector.aggregate_types_of(args.aggregate_id)
    if args.aggregate_type is not None:
        types = [t for t in types if t == args.aggregate_type]
    if not types:
        of_type = "" if args.aggregate_type is None else f" of type {args.aggregate_type!r}"
        raise InspectError(
            f"no aggregate {args.aggregate_id!r}{of_type} in {args.store}; "
            "`trio-es streams` lists the stored ones",
            EXIT_UNKNOWN_AGGREGATE,
        )
    if len(types) > 1:
        raise InspectError(
            f"aggregate id {args.aggregate_id!r} is stored under several types "
            f"({', '.join(types)}); choose one with --type",
            EXIT_USAGE,
        )
    events = await inspector.events(types[0], args.aggregate_id, start_from=args.start_from)
    if args.json:
        _print_json(
            {
                "aggregate_type": types[0],
                "aggregate_id": args.aggregate_id,
                "events": [_event_json(event) for event in events],
            }
        )
        return
    out.print(
        Text(
            f"aggregate {args.aggregate_id!r} (type {types[0]!r}): {len(events)} events"
            + ("" if args.start_from == 1 else f" from sequence {args.start_from}")
        )
    )
    if not events:
        return
    table = _table(
        "sequence",
        "type",
        "version",
        "recorded_at",
        "metadata",
        "payload",
        right=("sequence", "version"),
    )
    for e in events:
        table.add_row(
            *map(
                Text,
                (
                    str(e.sequence),
                    e.event_type,
                    str(e.event_version),
                    e.recorded_at,
                    _json_text(e.metadata),
                    _json_text(e.payload),
                ),
            )
        )
    out.print(table)


def _event_json(event: EventRow) -> dict[str, object]:
    return attrs.asdict(event)


#: Events ``tail`` reads per query; a full page means more are waiting.
_TAIL_PAGE: Final = 1_000


async def _tail(inspector: Inspector, args: argparse.Namespace, out: Console) -> None:
    from ._trio_util import periodic

    position = await inspector.last_position()
    async for _ in periodic(args.interval):  # ends only with the process (Ctrl-C)
        while True:
            events = await inspector.events_after(position, limit=_TAIL_PAGE)
            for e in events:
                if args.json:
                    print(json.dumps(_event_json(e), ensure_ascii=False), flush=True)
                else:
                    print(
                        f"{e.global_position}  {e.recorded_at}  {e.aggregate_type}/"
                        f"{e.aggregate_id}#{e.sequence}  {e.event_type} v{e.event_version}  "
                        f"{_json_text(e.payload)}  metadata {_json_text(e.metadata)}",
                        flush=True,
                    )
                position = e.global_position
            # A full page means more may be waiting: read on without sleeping.
            if len(events) < _TAIL_PAGE:
                break


async def _stats(inspector: Inspector, args: argparse.Namespace, out: Console) -> None:
    stats = await inspector.stats()
    if args.json:
        value = attrs.asdict(stats)
        value["event_types"] = dict(stats.event_types)
        _print_json(value)
        return
    summary = _table("total", "value", right=("value",))
    for name, count in (
        ("events", stats.events),
        ("streams", stats.streams),
        ("snapshots", stats.snapshots),
        ("event types", len(stats.event_types)),
    ):
        summary.add_row(Text(name), Text(str(count)))
    summary.add_row(Text("first recorded_at"), Text(stats.first_recorded_at or "-"))
    summary.add_row(Text("last recorded_at"), Text(stats.last_recorded_at or "-"))
    summary.add_row(Text("schema version"), Text(str(stats.schema_version)))
    out.print(summary)
    if stats.event_types:
        types = _table("event type", "events", right=("events",))
        for name, count in stats.event_types:
            types.add_row(Text(name), Text(str(count)))
        out.print(types)


async def _projections(inspector: Inspector, args: argparse.Namespace, out: Console) -> None:
    from ._inspect import _redacted, is_postgres_url

    projections = await inspector.projections(args.aggregate_type)
    if args.json:
        _print_json([attrs.asdict(projection) for projection in projections])
        return
    if not projections:
        # Printed on stdout, which may be kept in a log: no password from the URL.
        where = _redacted(args.store) if is_postgres_url(args.store) else args.store
        of_type = "" if args.aggregate_type is None else f" of type {args.aggregate_type!r}"
        out.print(Text(f"no projections{of_type} in {where}"))
        return
    table = _table(
        "type",
        "name",
        "position",
        "head",
        "lag",
        "updated_at",
        right=("position", "head", "lag"),
    )
    for p in projections:
        table.add_row(
            *map(
                Text,
                (p.aggregate_type, p.name, str(p.position), str(p.head), str(p.lag), p.updated_at),
            )
        )
    out.print(table)

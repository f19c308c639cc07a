"""SQLite connections used from Trio: each connection's calls on one long-lived thread."""

from __future__ import annotations

import itertools
import sqlite3
import threading
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from trio_es import _sqlite_connection
from trio_es._sqlite_connection import Connection, Interrupt

_roles = itertools.count()


@pytest.fixture
def connection() -> Iterator[Connection]:
    # The connection starts its thread at once: a test that patches the idle time lists
    # its patching fixture first, so that it is set up before this one.
    raw = sqlite3.connect(":memory:", check_same_thread=False)
    # A role of its own, so that its worker thread's name tells it from other tests'.
    yield Connection(raw, f"test-{next(_roles)}")
    raw.close()


@pytest.fixture
def short_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker threads end after 10 ms without a call."""
    monkeypatch.setattr(_sqlite_connection, "_WORKER_IDLE_S", 0.01)


def _workers(connection: Connection) -> list[threading.Thread]:
    name = f"trio_es sqlite {connection.role}"
    return [t for t in threading.enumerate() if t.name == name]


def _ident(_: sqlite3.Connection, __: Interrupt) -> int:
    return threading.get_ident()


async def test_a_connections_calls_run_on_one_thread_of_its_own(connection: Connection) -> None:
    """Every call of one connection runs on the same worker thread, not the Trio thread."""
    idents = {await connection.run(_ident) for _ in range(20)}
    assert len(idents) == 1
    assert threading.get_ident() not in idents
    assert len(_workers(connection)) == 1


async def test_a_connection_starts_its_thread_when_made() -> None:
    """The thread is there before the first call, so that call does not wait for it."""
    raw = sqlite3.connect(":memory:", check_same_thread=False)
    try:
        connection = Connection(raw, f"test-{next(_roles)}")
        assert len(_workers(connection)) == 1
    finally:
        raw.close()


async def test_an_idle_worker_thread_ends_and_the_next_call_starts_one(
    short_idle: None, connection: Connection
) -> None:
    """A worker idle for its idle time ends; a later call gets a new thread and works."""
    first = await connection.run(_ident)
    with trio.fail_after(5):
        while _workers(connection):  # noqa: ASYNC110 - a thread ending sets no trio.Event
            await trio.sleep(0.01)
    second = await connection.run(_ident)
    assert second != threading.get_ident()
    assert first != threading.get_ident()


async def test_calls_racing_the_idle_end_of_the_thread_all_run(
    monkeypatch: pytest.MonkeyPatch, connection: Connection
) -> None:
    """A call handed in while the thread decides to end is still run (no lost call, no hang)."""
    monkeypatch.setattr(_sqlite_connection, "_WORKER_IDLE_S", 0.00001)
    await connection.run(_ident)  # the first thread waited 10 s: let it see the new value
    await trio.sleep(0.02)
    with trio.fail_after(30):
        for i in range(500):

            def select(raw: sqlite3.Connection, _: Interrupt, i: int = i) -> int:
                return int(raw.execute("SELECT ?", (i,)).fetchone()[0])

            assert await connection.run(select) == i
            if i % 50 == 0:
                await trio.sleep(0.001)


async def test_a_failing_call_reaches_its_caller_and_the_thread_goes_on(
    connection: Connection,
) -> None:
    """An exception in a call is raised to its caller; the next call runs on the same thread."""
    before = await connection.run(_ident)

    def fail(_: sqlite3.Connection, __: Interrupt) -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await connection.run(fail)
    assert await connection.run(_ident) == before


async def test_a_call_on_a_free_connection_is_a_checkpoint(connection: Connection) -> None:
    """A call is a Trio checkpoint (a cancel point and a schedule point) and returns its value."""
    with trio.testing.assert_checkpoints():
        assert await connection.run(lambda _, __: 42) == 42


async def test_a_call_cancelled_while_another_holds_the_connection_never_runs(
    connection: Connection,
) -> None:
    """A call waiting for a busy connection is cancelled at once and never reaches the thread."""
    holding = threading.Event()
    release = threading.Event()
    ran: list[str] = []

    def hold(_: sqlite3.Connection, __: Interrupt) -> str:
        holding.set()
        release.wait(10)
        return "held"

    results: list[str] = []

    async def holder() -> None:
        results.append(await connection.run(hold))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(holder)
        await trio.to_thread.run_sync(holding.wait, 10)
        with trio.CancelScope() as waiting:
            waiting.deadline = trio.current_time() + 0.05
            await connection.run(lambda _, __: ran.append("waiter"))
        assert waiting.cancelled_caught
        assert results == []  # the holder's call is still on the thread, uninterrupted
        release.set()
    assert results == ["held"]
    assert ran == []
    assert await connection.run(lambda _, __: "next") == "next"


async def test_a_cancelled_caller_hands_nothing_to_the_thread(connection: Connection) -> None:
    """A caller cancelled before it calls runs nothing on the connection."""
    ran: list[str] = []
    with trio.CancelScope() as scope:
        scope.cancel()
        await connection.run(lambda _, __: ran.append("ran"))
    assert scope.cancelled_caught
    assert ran == []
    assert await connection.run(lambda _, __: "still usable") == "still usable"

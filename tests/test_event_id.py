"""Event ids: version 4 UUIDs drawn from the OS in batches, never twice."""

from __future__ import annotations

import os
import threading
import uuid

import pytest

from trio_es import _event_id
from trio_es._event_id import new_event_id


def test_ids_are_random_version_4_uuids() -> None:
    """Every id is a version 4, RFC 4122 UUID, and ids do not repeat across refills."""
    ids = [new_event_id() for _ in range(5_000)]
    assert all(i.version == 4 and i.variant == uuid.RFC_4122 for i in ids)
    assert len(set(ids)) == len(ids)


def test_the_os_is_read_once_per_256_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ids come from os.urandom, one read (and one GIL release) per 256 ids, not per id."""
    reads: list[int] = []
    urandom = os.urandom

    def counted(size: int) -> bytes:
        reads.append(size)
        return urandom(size)

    monkeypatch.setattr(os, "urandom", counted)
    monkeypatch.setattr(_event_id, "_pool", _event_id._Pool())
    for _ in range(1_000):
        new_event_id()
    assert reads == [16 * 256] * 4


def test_threads_never_share_an_id() -> None:
    """Threads drawing at once each get ids of their own (one pool per thread)."""
    drawn: list[list[uuid.UUID]] = [[] for _ in range(4)]
    start = threading.Barrier(len(drawn))

    def draw(into: list[uuid.UUID]) -> None:
        start.wait()
        into.extend(new_event_id() for _ in range(2_000))

    threads = [threading.Thread(target=draw, args=(ids,)) for ids in drawn]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [i for ids in drawn for i in ids]
    assert len(set(everything)) == len(everything) == 8_000


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_does_not_repeat_the_parents_next_ids() -> None:
    """A forked child forgets the parent's unused random bytes instead of reusing them."""
    new_event_id()  # the pool now holds unused bytes, which fork copies
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child process
        try:
            os.write(write, b"".join(new_event_id().bytes for _ in range(8)))
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = pipe.read()
    os.waitpid(pid, 0)
    parent = b"".join(new_event_id().bytes for _ in range(8))
    assert len(child) == len(parent) == 128
    assert child != parent

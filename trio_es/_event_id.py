"""Event ids: random (version 4) UUIDs, read from the OS a few kilobytes at a time.

``uuid.uuid4()`` reads 16 bytes from ``os.urandom`` per id, and ``os.urandom`` releases
the GIL around its system call. On the Trio thread, while a store's worker thread runs
Python, each release can hand the GIL over and then wait to get it back: with many
callers on SQLite, one per staged event. :func:`new_event_id` draws from the same source
(the operating system's cryptographic generator) and gives the same kind of id, with one
read per 256 ids.
"""

from __future__ import annotations

import os
import threading
import uuid
from typing import Final

__all__ = ["new_event_id"]

_IDS_PER_READ: Final = 256


class _Pool(threading.local):
    """Random bytes not handed out yet; one pool per thread, so no id is given twice."""

    def __init__(self) -> None:
        self.data = b""
        self.offset = 0


_pool = _Pool()


def new_event_id() -> uuid.UUID:
    """A new random UUID (version 4), as ``uuid.uuid4()`` makes, from the OS's generator."""
    pool = _pool
    offset, data = pool.offset, pool.data
    if offset >= len(data):
        data = pool.data = os.urandom(16 * _IDS_PER_READ)
        offset = 0
    pool.offset = offset + 16
    return uuid.UUID(bytes=data[offset : offset + 16], version=4)


def _forget_after_fork() -> None:
    # A forked child starts with a copy of the parent's unused bytes: drawing from them
    # would give the child the ids the parent gives next.
    global _pool
    _pool = _Pool()


os.register_at_fork(after_in_child=_forget_after_fork)

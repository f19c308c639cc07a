"""A projection lease held by another process: excluded while it lives, taken after its SIGKILL."""

from __future__ import annotations

import signal
from typing import Any

import pytest
import trio


async def assert_taken_over_after_the_holder_is_killed(
    store: Any, holder: trio.Process, *, start_within: float
) -> None:
    """``holder`` prints ``held`` once it holds lease "balances" at checkpoint 7.

    Checks that ``store`` cannot take the lease while the holder lives, then SIGKILLs it
    and checks that the lease is taken within 10 s, at the holder's checkpoint, and that
    the new holder can advance it.
    """
    assert holder.stdout is not None
    with trio.fail_after(start_within):
        said = b""
        while b"held\n" not in said:
            chunk = await holder.stdout.receive_some()
            assert chunk, "the holder process ended before it held the lease"
            said += chunk
    with trio.move_on_after(0.5) as scope:
        async with store.projection_lease("balances"):
            pytest.fail("took a lease another process holds")  # pragma: no cover
    assert scope.cancelled_caught
    holder.send_signal(signal.SIGKILL)
    with trio.fail_after(10):
        async with store.projection_lease("balances") as lease:
            assert await lease.checkpoint() == 7
            await lease.advance(7, 8)
    assert await holder.wait() == -signal.SIGKILL

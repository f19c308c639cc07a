"""Durable projections: read models fed from the store, resumed from a stored checkpoint.

A projection is a name and a handler. Its runner (one task per projection, started by
``open_eventsourcing``) works in a loop:

1. **Lease.** Wait until this process holds the projection's single-active lease in the
   store (an advisory lock on PostgreSQL, a file lock on SQLite): however many processes
   run the same projection, exactly one processes it at a time; when it dies another
   takes over within the store's takeover interval. A standby follows the stored
   checkpoint, so :meth:`ProjectionRunner.wait` works in every process.
2. **Catch up, then follow.** Read the checkpoint, subscribe after it, and for each batch
   run the handler, then move the checkpoint to the batch's last position: with
   ``transactional=True`` in the same database transaction as the handler's writes
   (exactly once), otherwise right after the handler returned (at least once: a batch is
   delivered again only if the process died, or the handler or the checkpoint write
   failed, in between).
3. **Failures.** When the handler raises, the runner lets go of the lease, backs off and
   starts again from the checkpoint; the same batch failing ``retries`` times in a row
   (no progress in between) is a poison batch: the projection stops, reports ``failed``
   in its stats and logs why. It never skips the batch, and commands never wait for it.
   Store failures (a lost connection, a database restart) are retried with back-off for
   as long as they last.

Positions come from the store: ``global_position`` increases in commit order, and a
checkpoint at *p* means every event up to *p* was processed.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import logging
import random
from collections.abc import Callable
from typing import Any, Final, Generic, TypeVar, final

import attrs
import trio

from ._errors import CheckpointMoved, ProjectionFailed, describe_error
from ._store import Lease, ProjectionSource
from ._subscription import subscribe
from ._trio_util import AsyncValue, async_value, periodic
from ._types import EventEnvelope, ProjectionStats
from ._validated import check_int

__all__ = ["Projection", "ProjectionRunner", "check_projections"]

logger: Final = logging.getLogger("trio_es")

EventT = TypeVar("EventT")

#: The first back-off after a failure; it doubles up to the runner's ``max_backoff``.
_FIRST_BACKOFF: Final = 0.05
#: How often a standby reads the stored checkpoint (for ``wait`` and stats).
_FOLLOW_INTERVAL: Final = 0.5
#: The window, in seconds, over which events/s is measured.
_RATE_WINDOW: Final = 10.0


def _check_name(_: object, __: object, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise TypeError(
            f"a projection's name must be a non-empty str (got {value!r}); it keys the "
            "stored checkpoint, so pick a stable one such as 'balances'"
        )


def _check_callable(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if attribute.name == "reset" and value is None:
        return
    if not callable(value):
        raise TypeError(
            f"a projection's {attribute.name} must be a function (got {value!r:.80}); pass "
            f"e.g. an async def {attribute.name}(batch)"
        )


@final
@attrs.frozen
class Projection(Generic[EventT]):
    """A durable read model: ``handle`` is fed every committed event once, in order.

    Args:
        name: the projection's stable name: its checkpoint is stored under it.
        handle: with ``transactional=False``, an async function of a batch (a list of
            envelopes in ``global_position`` order); delivery is at least once (a batch
            comes again only after a failure or a crash), so make it idempotent or
            tolerant. With ``transactional=True`` (SQLite and PostgreSQL stores), a plain
            function ``handle(connection, batch)`` run in a worker thread inside the
            database transaction that moves the checkpoint: its writes and the checkpoint
            commit together, so every event is applied exactly once. It must not commit
            or roll back itself.
        transactional: see ``handle``.
        batch_size: the most events one batch holds.
        reset: what a rebuild runs to empty the read model before the replay: an async
            function of no arguments, or with ``transactional=True`` a plain
            ``reset(connection)`` run in the transaction that resets the checkpoint.
    """

    name: str = attrs.field(validator=_check_name)
    handle: Callable[..., Any] = attrs.field(validator=_check_callable)
    transactional: bool = attrs.field(default=False, kw_only=True)
    batch_size: int = attrs.field(default=500, kw_only=True)
    reset: Callable[..., Any] | None = attrs.field(
        default=None, kw_only=True, validator=_check_callable
    )

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.transactional, bool):
            raise TypeError(f"transactional must be True or False (got {self.transactional!r})")
        check_int("batch_size", self.batch_size, minimum=1, hint="500 suits most uses")
        if self.transactional:
            for role, fn in (("handle", self.handle), ("reset", self.reset)):
                if fn is not None and inspect.iscoroutinefunction(fn):
                    raise TypeError(
                        f"projection {self.name!r} is transactional, so its {role} runs in "
                        f"a worker thread inside the database transaction and must be a "
                        f"plain function (got the async function {fn!r:.80}); use def, "
                        "not async def"
                    )


def check_projections(projections: object) -> tuple[Projection[Any], ...]:
    """``projections`` as a tuple, checked: Projection objects with distinct names.

    Raises:
        TypeError: it is not an iterable of :class:`Projection`.
        ValueError: two projections share a name.
    """
    if isinstance(projections, Projection | str | bytes):
        raise TypeError(
            f"projections must be a list of Projection objects (got {projections!r:.80}); "
            "wrap a single one in a list"
        )
    try:
        items: tuple[object, ...] = tuple(projections)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"projections must be a list of Projection objects (got {projections!r:.80})"
        ) from None
    names: set[str] = set()
    checked: list[Projection[Any]] = []
    for item in items:
        if not isinstance(item, Projection):
            raise TypeError(
                f"projections must hold Projection objects (got {item!r:.80}); wrap the "
                "handler: Projection('name', handle)"
            )
        if item.name in names:
            raise ValueError(
                f"two projections are named {item.name!r}; give each its own name (the "
                "name keys its stored checkpoint)"
            )
        names.add(item.name)
        checked.append(item)
    return tuple(checked)


class _HandlerFailed(Exception):
    """The projection's own handler raised ``error`` (not the store)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


@attrs.frozen
class _Progress:
    """What waiters watch: the processed position and the runner's status."""

    position: int
    status: str = "running"


@attrs.define(eq=False)
class _Rebuild:
    """A rebuild request: done once the checkpoint was reset, with the head to reach."""

    reset: trio.Event = attrs.Factory(trio.Event)
    target: int = 0
    error: BaseException | None = None


@final
@attrs.define(eq=False)
class ProjectionRunner(Generic[EventT]):
    """Runs one projection in this process (see the module docstring for the loop).

    Attributes:
        projection: what it runs.
        store: where the events and the checkpoint are.
        retries: how often a failing batch is retried before the projection stops.
        max_backoff: the longest pause, in seconds, between two attempts.
        grace: how long, once the system stops, a checkpoint write for a batch the
            handler finished may still take (so a clean close keeps it).
    """

    projection: Projection[EventT]
    store: ProjectionSource[EventT]
    retries: int
    max_backoff: float
    grace: float = 5.0
    #: The processed position (here, or the stored checkpoint while a standby) and status.
    progress: AsyncValue[_Progress] = attrs.field(init=False)
    #: Whether this process holds the lease now (a value standbys can wait on).
    _active: AsyncValue[bool] = attrs.field(init=False)
    failure: ProjectionFailed | None = attrs.field(default=None, init=False)
    #: (time, events processed so far) samples, for events/s.
    _samples: collections.deque[tuple[float, int]] = attrs.field(
        init=False, factory=collections.deque
    )
    _processed: int = attrs.field(default=0, init=False)
    _rebuilds: list[_Rebuild] = attrs.field(init=False, factory=list)
    #: The scope of the processing under way, cancelled to serve a rebuild.
    _scope: trio.CancelScope | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self.progress = async_value(_Progress(0))
        self._active = async_value(False)

    @property
    def active(self) -> bool:
        """Whether this process is the projection's active instance now."""
        return self._active.value

    @property
    def name(self) -> str:
        """The projection's name."""
        return self.projection.name

    @property
    def status(self) -> str:
        """``"running"``, ``"failed"`` or ``"stopped"``."""
        return self.progress.value.status

    def _set(self, position: int | None = None, status: str | None = None) -> None:
        now = self.progress.value
        self.progress.value = _Progress(
            now.position if position is None else position, now.status if status is None else status
        )

    # -- the task ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled (the system stops) or a poison batch stops the projection."""
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._follow)
                await self._serve()
                nursery.cancel_scope.cancel()
        finally:
            if self.status == "running":
                self._set(status="stopped")
            for request in self._rebuilds:
                request.error = ProjectionFailed(self.name, self.progress.value.position, "stopped")
                request.reset.set()

    async def _follow(self) -> None:
        """While a standby, keep the stored checkpoint as the position (for waiters)."""
        while True:
            # No timer while active: an idle system should have nothing to wake for.
            await self._active.wait_value(lambda active: not active)
            async with contextlib.aclosing(periodic(_FOLLOW_INTERVAL)) as ticks:
                async for _ in ticks:
                    if self.active:
                        break
                    try:
                        position = await self.store.checkpoint_position(self.name)
                    except Exception as error:  # a standby's read: the next one may work
                        logger.debug(
                            "projection %r: cannot read its checkpoint: %r", self.name, error
                        )
                        continue
                    if not self.active:
                        self._set(position=position)

    async def _serve(self) -> None:
        # The handler's failures on one batch in a row (the poison count), the position
        # they happened at, and the next back-off; progress resets all three.
        failures, failed_at, backoff = 0, -1, _FIRST_BACKOFF
        while True:
            try:
                async with self.store.projection_lease(self.name) as lease:
                    self._active.value = True
                    # The rate counts from here, so that one batch already gives one.
                    self._samples.clear()
                    self._samples.append((trio.current_time(), self._processed))
                    try:
                        await self._process(lease)
                    finally:
                        self._active.value = False
            except CheckpointMoved as moved:
                # A rebuild elsewhere reset the checkpoint: start again from it.
                logger.info("projection %r: %s", self.name, moved.message)
                continue
            except Exception as error:
                position = self.progress.value.position
                if position != failed_at:
                    failures, failed_at, backoff = 0, position, _FIRST_BACKOFF
                if isinstance(error, _HandlerFailed):
                    failures += 1
                    if failures > self.retries:
                        self._stop(error.error)
                        return
                    logger.warning(
                        "projection %r failed after position %d (attempt %d of %d), "
                        "restarting from its checkpoint: %s",
                        self.name,
                        position,
                        failures,
                        self.retries + 1,
                        describe_error(error.error),
                    )
                else:
                    # The store failed (connection lost, database restarting): not the
                    # batch's fault, so retried for as long as it lasts.
                    logger.warning(
                        "projection %r: the store failed, retrying: %s",
                        self.name,
                        describe_error(error),
                    )
            await trio.sleep(random.uniform(backoff / 2, backoff))
            backoff = min(backoff * 2, self.max_backoff)

    def _stop(self, error: Exception) -> None:
        position = self.progress.value.position
        self.failure = ProjectionFailed(
            self.name,
            position,
            f"its handler failed {self.retries + 1} times in a row on the batch after "
            f"position {position}: {describe_error(error)}",
        )
        self.failure.__cause__ = error
        logger.error("%s; it is stopped (commands go on)", self.failure)
        self._set(status="failed")

    async def _process(self, lease: Lease) -> None:
        """Process batches under ``lease`` until cancelled; serve rebuild requests."""
        projection = self.projection
        while True:
            if self._rebuilds:
                await self._reset(lease)
            position = await lease.checkpoint()
            self._set(position=position)
            try:
                with trio.CancelScope() as self._scope:
                    if self._rebuilds:  # asked for after the check above: serve it first
                        self._scope.cancel()
                    async with subscribe(
                        self.store, after=position, batch_size=projection.batch_size
                    ) as batches:
                        async for batch in batches:
                            # Subscriptions hand out positioned envelopes only.
                            last: int = batch[-1].global_position  # type: ignore[assignment]
                            await self._apply(lease, position, last, batch)
                            position = last
                            self._processed += len(batch)
                            self._sample()
                            self._set(position=position)
            finally:
                self._scope = None

    async def _apply(
        self, lease: Lease, position: int, last: int, batch: list[EventEnvelope[EventT]]
    ) -> None:
        projection = self.projection
        if projection.transactional:
            await lease.advance_with(position, last, _guarded(projection.handle), batch)
            return
        try:
            result = projection.handle(batch)
            if inspect.isawaitable(result):
                await result
        except Exception as error:
            raise _HandlerFailed(error) from error
        # The batch is processed: its checkpoint is written even if the system is
        # stopping now (within the grace), so a clean close redelivers nothing.
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self.grace
            await lease.advance(position, last)

    async def _reset(self, lease: Lease) -> None:
        """Serve the rebuild requests: checkpoint to 0, the read model emptied."""
        requests, self._rebuilds = self._rebuilds, []
        try:
            reset = self.projection.reset
            if self.projection.transactional:
                await lease.reset(None if reset is None else _guarded(reset))
            else:
                # The checkpoint first: a crash in between replays onto the old model
                # (duplicates, which at-least-once allows) rather than skipping events.
                await lease.reset()
                if reset is not None:
                    try:
                        result = reset()
                        if inspect.isawaitable(result):
                            await result
                    except Exception as error:
                        raise _HandlerFailed(error) from error
            target = await self.store.head_position()
        except BaseException as error:
            for request in requests:
                request.error = error
                request.reset.set()
            raise
        logger.info("projection %r: rebuilding, replaying up to position %d", self.name, target)
        self._set(position=0)
        for request in requests:
            request.target = target
            request.reset.set()

    def _sample(self) -> None:
        now = trio.current_time()
        samples = self._samples
        samples.append((now, self._processed))
        while len(samples) > 2 and now - samples[0][0] > _RATE_WINDOW:
            samples.popleft()

    # -- what the facade asks ----------------------------------------------------------

    def events_per_second(self) -> float:
        """Events processed per second over the last few seconds (0.0 when idle)."""
        samples = self._samples
        if len(samples) < 2:
            return 0.0
        now = trio.current_time()
        if now - samples[-1][0] > _RATE_WINDOW:
            return 0.0
        (start, first), (_, last) = samples[0], samples[-1]
        span = max(now - start, 1e-9)
        return (last - first) / span

    async def stats(self) -> ProjectionStats:
        """Where the projection stands; reads the store's head position."""
        head = await self.store.head_position()
        progress = self.progress.value
        return ProjectionStats(
            self.name,
            progress.position,
            head,
            max(head - progress.position, 0),
            progress.status,
            self.events_per_second(),
            active=self.active,
        )

    async def wait(self, position: int) -> None:
        """Return once the projection has processed every event up to ``position``.

        Raises:
            ProjectionFailed: it stopped (a poison batch, or the system stopping) before
                getting there.
        """
        progress = await self.progress.wait_value(
            lambda p: p.position >= position or p.status != "running"
        )
        if progress.position < position:
            raise self.failure or ProjectionFailed(
                self.name, progress.position, "the system is stopping"
            )

    async def rebuild(self, on_progress: Callable[[int, int], object] | None = None) -> int:
        """Reset the checkpoint (and the read model) and replay up to the current head.

        Returns the head position the replay reached. ``on_progress(position, head)`` is
        called as the replay advances.

        Raises:
            ProjectionFailed: the projection is stopped or failed.
        """
        if self.status != "running":
            raise self.failure or ProjectionFailed(
                self.name, self.progress.value.position, "the system is stopping"
            )
        request = _Rebuild()
        self._rebuilds.append(request)
        if self._scope is not None:
            self._scope.cancel()
        try:
            await request.reset.wait()
        except BaseException:
            if request in self._rebuilds:  # not started yet: withdrawn
                self._rebuilds.remove(request)
            raise
        if request.error is not None:
            if isinstance(request.error, _HandlerFailed):
                raise request.error.error
            raise request.error
        target = request.target
        seen = -1

        def moved(progress: _Progress) -> bool:
            return progress.position != seen or progress.status != "running"

        while True:
            progress = await self.progress.wait_value(moved)
            seen = progress.position
            if on_progress is not None:
                on_progress(min(seen, target), target)
            if seen >= target:
                return target
            if progress.status != "running":
                raise self.failure or ProjectionFailed(self.name, seen, "the system is stopping")


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` whose exceptions come out as :class:`_HandlerFailed` (they are the handler's)."""

    def guarded(*args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as error:
            raise _HandlerFailed(error) from error

    return guarded

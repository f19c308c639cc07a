"""Supervision trees built from Trio nurseries, with the semantics of Erlang/OTP supervisors.

A supervisor runs its children in a nursery of its own and decides, when one of them ends,
whether to start it again. The vocabulary is the one of ``gleam_otp``'s
``static_supervisor`` and of OTP:

* A child is described by a :class:`ChildSpecification` (build it with :func:`worker`): an
  ``async def start(task_status=trio.TASK_STATUS_IGNORED)`` function, a :class:`Restart`
  type and a label.
* A :class:`StaticSupervisor` starts a fixed list of children in order and restarts them
  following a :class:`Strategy`.
* A :class:`DynamicSupervisor` takes children while it runs (one task per live aggregate,
  say) and restarts each on its own.
* Restarts are rationed: more than ``intensity`` restarts within ``period`` seconds and the
  supervisor stops all its children and raises :class:`SupervisorGaveUp`. Its own
  supervisor sees that as the failure of a child, so failures escalate up the tree.

Only an :class:`Exception` is a failure. ``trio.Cancelled``, ``KeyboardInterrupt``,
``SystemExit`` and every other ``BaseException`` are never counted: the supervisor stops
its other children and lets them propagate.

Why a static supervisor's children run inside shielded cancel scopes it owns: Trio
delivers a cancellation to every task under the cancelled scope at once, while OTP stops a
static supervisor's children one at a time, in reverse start order, each with a grace
period. Shielding each child lets the supervisor catch its own cancellation and then cancel
the children one by one. A dynamic supervisor, like OTP's ``simple_one_for_one``, stops all
its children at once and gives them one grace period together (stopping 100,000 children
one scheduler round trip at a time would take longer than any grace period): its children's
scopes are not shielded, and it cancels its nursery, which reaches them all in one pass, so
that a cancellation of the supervisor reaches them at once too. Either supervisor's nursery
still waits for every child before ``run`` returns, so a child is never left running, even
one that ignores its cancellation.

A child that is itself a supervisor (or a worker running one, as the runtime's aggregate
supervisor is) bounds its own children's stop with its own grace, so its parent waits for
that stop to finish instead of timing it with the parent's grace (OTP gives supervisor
children ``shutdown => infinity`` for the same reason); only what is still running once
that stop finished is timed by the parent's grace.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import itertools
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any, Final, final

import attrs
import trio

from ._errors import EventSourcingError
from ._subject import Name
from ._trio_util import lone
from ._validated import check_int, check_seconds

__all__ = [
    "ChildHandle",
    "ChildSpecification",
    "DynamicSupervisor",
    "Restart",
    "StaticSupervisor",
    "Strategy",
    "SupervisorGaveUp",
    "worker",
]

logger: Final = logging.getLogger("trio_es.supervision")

_supervisor_ids = itertools.count(1)

#: The signature of a child's start function, called as ``start(task_status=...)``.
_StartFn = Callable[..., Awaitable[object]]
#: How many children that ignore their cancellation a dynamic supervisor names one by one
#: in its log before it only counts the rest (100,000 lines would drown the log).
_STRAGGLERS_NAMED: Final = 10


#: What a child that is not stoppable runs in instead of a cancel scope of its own.
_UNSCOPED: Final = contextlib.nullcontext()


class Restart(enum.Enum):
    """When a child that ended is started again (OTP's restart types)."""

    #: Always restarted, also after a normal return: the child is meant to run forever.
    PERMANENT = "permanent"
    #: Restarted only after it raised an exception; a normal return ends it for good.
    TRANSIENT = "transient"
    #: Never restarted, whatever the reason it ended.
    TEMPORARY = "temporary"


class Strategy(enum.Enum):
    """Which children a :class:`StaticSupervisor` restarts when one of them must restart."""

    #: Restart only the child that ended.
    ONE_FOR_ONE = "one_for_one"
    #: Stop all other children (in reverse start order), then start all again in order.
    ONE_FOR_ALL = "one_for_all"
    #: Stop the children started after the one that ended (in reverse order), then start
    #: it and them again in order.
    REST_FOR_ONE = "rest_for_one"


# --- validation -------------------------------------------------------------------------


def _check_intensity(_: object, __: object, value: Any) -> None:
    check_int(
        "intensity",
        value,
        minimum=0,
        hint="it is how many restarts the supervisor allows within its period",
    )


def _check_seconds(what: str, *, allow_zero: bool) -> Callable[[object, object, Any], None]:
    def check(_: object, __: object, value: Any) -> None:
        check_seconds(what, value, allow_zero=allow_zero)

    return check


def _check_label(_: object, __: object, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"name must be a str or None (got {value!r})")


def _check_restart(_: object, __: object, value: Any) -> None:
    if not isinstance(value, Restart):
        raise TypeError(f"restart must be a Restart, e.g. Restart.PERMANENT (got {value!r})")


def _check_strategy(_: object, __: object, value: Any) -> None:
    if not isinstance(value, Strategy):
        raise TypeError(f"strategy must be a Strategy, e.g. Strategy.ONE_FOR_ONE (got {value!r})")


def _check_start(_: object, __: object, value: Any) -> None:
    if not callable(value):
        raise TypeError(
            f"start must be an async function taking task_status (got {value!r}); "
            "pass the function itself, not a call to it"
        )


def _describe(start: object) -> str:
    """A human label for an unnamed child: its start function's qualified name."""
    while isinstance(start, functools.partial):
        start = start.func
    qualname = getattr(start, "__qualname__", None)
    return qualname if isinstance(qualname, str) else type(start).__name__


# --- public value types -----------------------------------------------------------------


@final
@attrs.frozen
class ChildSpecification:
    """How to start one child, and when to start it again.

    Attributes:
        start: ``async def start(task_status=trio.TASK_STATUS_IGNORED)``. A static
            supervisor waits for ``task_status.started()`` before it starts the next
            child; raising (or returning) before that is a failure like any other.
        restart: when the child is started again after it ends, see :class:`Restart`.
        name: a label for logs and errors; the start function's name when ``None``.
    """

    start: _StartFn = attrs.field(validator=_check_start)
    restart: Restart = attrs.field(default=Restart.PERMANENT, validator=_check_restart)
    name: str | None = attrs.field(default=None, validator=_check_label)

    @property
    def label(self) -> str:
        """The name, or the start function's name for an unnamed child."""
        return self.name if self.name is not None else _describe(self.start)


def worker(
    start: _StartFn,
    *,
    restart: Restart = Restart.PERMANENT,
    name: str | Name[Any] | None = None,
) -> ChildSpecification:
    """Describe a child task for a supervisor.

    Args:
        start: ``async def start(task_status=trio.TASK_STATUS_IGNORED)``; it calls
            ``task_status.started()`` once it is ready (a static supervisor waits for that
            before starting the next child). Bind arguments with ``functools.partial``.
        restart: when the child is started again, see :class:`Restart`.
        name: a label for logs and errors. A :class:`~trio_es.Name` is accepted and its
            label used, so an actor can be described by the name of its mailbox; the
            mailbox itself survives restarts because it belongs to the name, not the task.
    """
    label = name.label if isinstance(name, Name) else name
    return ChildSpecification(start, restart, label)


@final
class SupervisorGaveUp(EventSourcingError):
    """A supervisor's children failed more often than its restart intensity allows.

    The supervisor has stopped all its children. ``__cause__`` is the last failure (for a
    permanent child that returned normally, a ``RuntimeError`` saying so). Under another
    supervisor this error is that supervisor's child failing, so it escalates.

    Attributes:
        supervisor: the label of the supervisor that gave up.
        restarts: the restarts it made within ``period`` before giving up (its intensity).
        period: the period in seconds over which restarts are counted.
        child: the label of the child whose failure was one too many.
    """

    supervisor: str
    restarts: int
    period: float
    child: str | None

    def __init__(
        self, supervisor: str, restarts: int, period: float, child: str | None = None
    ) -> None:
        super().__init__(supervisor, restarts, period, child)
        self.supervisor = supervisor
        self.restarts = restarts
        self.period = period
        self.child = child

    def __str__(self) -> str:
        which = "a child" if self.child is None else f"child {self.child!r}"
        if self.restarts == 0:
            failed = "failed and it allows no restarts"
        else:
            times = "restart" if self.restarts == 1 else "restarts"
            failed = f"failed again after {self.restarts} {times} within {self.period:g} s"
        return (
            f"supervisor {self.supervisor!r} gave up because {which} {failed} "
            "(see __cause__); fix that failure or raise the supervisor's intensity"
        )


# --- machinery shared by both supervisors ------------------------------------------------


def _should_restart(restart: Restart, failure: Exception | None) -> bool:
    if restart is Restart.PERMANENT:
        return True
    return restart is Restart.TRANSIENT and failure is not None


def _returned(label: str) -> RuntimeError:
    # A permanent child that returns is restarted like a failed one, and a give-up needs a
    # cause to chain to; this error stands for the unexpected return.
    return RuntimeError(
        f"permanent child {label!r} returned; make it run until cancelled, "
        "or give it Restart.TRANSIENT if finishing is normal"
    )


def _note_restart(window: deque[float], period: float, intensity: int) -> bool:
    """Count a restart now; True if it is one more than ``intensity`` within ``period``."""
    now = trio.current_time()
    window.append(now)
    while now - window[0] >= period:
        window.popleft()
    return len(window) > intensity


def _gave_up(
    supervisor: str, intensity: int, period: float, child: str, cause: BaseException
) -> SupervisorGaveUp:
    error = SupervisorGaveUp(supervisor, intensity, period, child)
    error.__cause__ = cause
    return error


#: The one exception a supervisor's nursery really raised (see ``_trio_util.lone``).
_unwrap: Final = lone


async def _run_nursery(body: Callable[[trio.Nursery], Awaitable[None]]) -> None:
    """Run ``body`` in a fresh nursery, re-raising a lone error without its group."""
    error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            await body(nursery)
    except BaseExceptionGroup as group:
        error = _unwrap(group)
    if error is not None:
        # Raised outside the except block so the group does not become its __context__.
        raise error


@final
@attrs.define(eq=False)
class _StopLink:
    """What a static supervisor's child tells it about the supervisors it runs.

    The child's task sees it through :data:`_parent_link`; a supervisor run in that task
    counts itself in ``supervisors`` while it runs and sets ``stopped`` once its own stop
    (bounded by its own grace) has finished, so the parent waits for that instead of
    timing it with the parent's grace.
    """

    supervisors: int = 0
    #: Made by the parent when it stops the child; set by the last supervisor that
    #: finished stopping, or by the child's end.
    stopped: trio.Event | None = None

    def enter(self) -> None:
        self.supervisors += 1

    def leave(self) -> None:
        self.supervisors -= 1
        if self.supervisors == 0 and self.stopped is not None:
            self.stopped.set()

    def ended(self) -> None:
        if self.stopped is not None:
            self.stopped.set()


#: The link to the static supervisor running the current task, if any (see _StopLink).
#: A context variable, because a supervisor may run a few frames or a nursery below the
#: child's start function (the runtime's aggregate supervisor does).
_parent_link: ContextVar[_StopLink | None] = ContextVar("trio_es.supervision.parent", default=None)


async def _stop(
    supervisor: str,
    label: str,
    scope: trio.CancelScope,
    done: trio.Event,
    grace: float,
    link: _StopLink | None = None,
) -> None:
    """Cancel one child and wait up to ``grace`` seconds for it to end.

    A child running a supervisor is first given, without a time limit, the time that
    supervisor takes to stop its own children (each within its own grace).
    """
    if link is not None and link.supervisors > 0 and not done.is_set():
        stopped = link.stopped = trio.Event()
        scope.cancel()
        # Shielded: stopping must finish even when the supervisor is itself being cancelled.
        with trio.CancelScope(shield=True):
            await stopped.wait()
    scope.cancel()
    with trio.move_on_after(grace, shield=True):
        await done.wait()
    if not done.is_set():
        logger.error(
            "supervisor %r: child %r ignored cancellation for %g s; moving on without it "
            "(the supervisor still waits for it before it exits)",
            supervisor,
            label,
            grace,
        )


# --- static supervisor --------------------------------------------------------------------


@final
@attrs.define(eq=False)
class _StartStatus:
    """The ``task_status`` a static supervisor gives its children."""

    ready: trio.Event = attrs.field(factory=trio.Event)
    started_ok: bool = False

    def started(self, value: object = None) -> None:
        if self.started_ok:
            raise RuntimeError("task_status.started() was called twice; call it once, when ready")
        self.started_ok = True
        self.ready.set()


@final
@attrs.define(eq=False)
class _StaticChild:
    """A static supervisor's bookkeeping for one child specification during one run."""

    spec: ChildSpecification
    index: int
    label: str
    #: False once the child is gone for good (temporary, or transient that returned).
    wanted: bool = True
    #: True from spawn until the supervisor stopped it or handled its exit.
    running: bool = False
    #: Bumped at each start, so that the exit of a replaced incarnation is ignored.
    generation: int = 0
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    done: trio.Event = attrs.field(factory=trio.Event)
    link: _StopLink = attrs.field(factory=_StopLink)


@final
@attrs.frozen
class _Exit:
    child: _StaticChild
    generation: int
    failure: Exception | None
    #: The supervisor cancelled this incarnation: its exit decides nothing.
    stopped: bool


@final
@attrs.define(eq=False)
class _StaticRun:
    """The state of one call to :meth:`StaticSupervisor.run`."""

    label: str
    strategy: Strategy
    intensity: int
    period: float
    grace: float
    children: list[_StaticChild]
    task_status: trio.TaskStatus[None]
    exits_in: trio.MemorySendChannel[_Exit]
    exits_out: trio.MemoryReceiveChannel[_Exit]
    window: deque[float]
    nursery: trio.Nursery | None = None
    gave_up: SupervisorGaveUp | None = None

    async def supervise(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        link = _parent_link.get()
        if link is not None:
            link.enter()
        try:
            reported = False
            while True:
                complete = await self._start_pending()
                if complete and not reported:
                    self.task_status.started()
                    reported = True
                exit_ = await self.exits_out.receive()
                if not await self._handle(exit_):
                    return
        finally:
            # Every way out (give-up, cancellation, a child's BaseException) ends here.
            try:
                for child in reversed(self.children):
                    if child.running:
                        child.running = False
                        await _stop(
                            self.label,
                            child.label,
                            child.scope,
                            child.done,
                            self.grace,
                            child.link,
                        )
            finally:
                # Should the ordered stop itself be interrupted, no shielded child may be
                # left running: cancel them all.
                for child in self.children:
                    child.scope.cancel()
                if link is not None:
                    link.leave()

    def _exits_pending(self) -> bool:
        return self.exits_out.statistics().current_buffer_used > 0

    async def _start_pending(self) -> bool:
        """Start, in order, the wanted children that are not running.

        Returns False, leaving the rest for later, when a child ended before it was ready
        or another exit is waiting to be handled: that exit may change what must run.
        """
        for child in self.children:
            if not child.wanted or child.running:
                continue
            if self._exits_pending():
                return False
            if not await self._spawn(child):
                return False
        return True

    async def _spawn(self, child: _StaticChild) -> bool:
        """Start one incarnation of ``child``; True once it is ready, False if it ended first."""
        assert self.nursery is not None
        # A supervisor being cancelled starts nothing new: it is about to stop everything.
        await trio.lowlevel.checkpoint_if_cancelled()
        child.generation += 1
        child.scope = trio.CancelScope(shield=True)
        child.done = trio.Event()
        child.link = _StopLink()
        child.running = True
        status = _StartStatus()
        # The child's task starts with a copy of this context: that is how a supervisor
        # it runs finds its link.
        token = _parent_link.set(child.link)
        try:
            self.nursery.start_soon(
                self._child_task,
                child,
                child.generation,
                child.scope,
                child.done,
                child.link,
                status,
                name=f"{self.label}/{child.label}",
            )
        finally:
            _parent_link.reset(token)
        await status.ready.wait()
        return status.started_ok

    async def _child_task(
        self,
        child: _StaticChild,
        generation: int,
        scope: trio.CancelScope,
        done: trio.Event,
        link: _StopLink,
        status: _StartStatus,
    ) -> None:
        failure: Exception | None = None
        try:
            try:
                with scope:
                    await child.spec.start(task_status=status)
            except Exception as exc:
                failure = exc
        finally:
            # Also on a BaseException, which propagates into the nursery and so cancels
            # supervise(): nobody may wait forever for this child.
            status.ready.set()
            done.set()
            link.ended()
        self.exits_in.send_nowait(_Exit(child, generation, failure, scope.cancel_called))

    async def _handle(self, exit_: _Exit) -> bool:
        """Apply the restart rules to one exit; False when the supervisor gives up."""
        child = exit_.child
        if exit_.generation != child.generation or exit_.stopped:
            return True
        child.running = False
        failure = exit_.failure
        if not _should_restart(child.spec.restart, failure):
            child.wanted = False
            if failure is not None:
                logger.warning(
                    "supervisor %r: %s child %r failed with %r; not restarting it",
                    self.label,
                    child.spec.restart.value,
                    child.label,
                    failure,
                )
            return True
        reason = failure if failure is not None else _returned(child.label)
        if _note_restart(self.window, self.period, self.intensity):
            logger.error(
                "supervisor %r: child %r failed with %r after %d restarts within %g s; giving up",
                self.label,
                child.label,
                reason,
                self.intensity,
                self.period,
            )
            self.gave_up = _gave_up(self.label, self.intensity, self.period, child.label, reason)
            return False
        logger.warning(
            "supervisor %r: restarting child %r after %r (restart %d of %d allowed within %g s)",
            self.label,
            child.label,
            reason,
            len(self.window),
            self.intensity,
            self.period,
        )
        if self.strategy is Strategy.ONE_FOR_ALL:
            victims = [c for c in self.children if c is not child]
        elif self.strategy is Strategy.REST_FOR_ONE:
            victims = self.children[child.index + 1 :]
        else:
            victims = []
        for victim in reversed(victims):
            if victim.running:
                victim.running = False
                # OTP: a temporary child stopped because of a sibling is not restarted.
                if victim.spec.restart is Restart.TEMPORARY:
                    victim.wanted = False
                await _stop(
                    self.label, victim.label, victim.scope, victim.done, self.grace, victim.link
                )
        return True


@final
@attrs.define(eq=False)
class StaticSupervisor:
    """A supervisor of a fixed list of children, started in order and stopped in reverse.

    Build it, :meth:`add` children, then run it in a nursery::

        sup = StaticSupervisor(Strategy.ONE_FOR_ALL).add(worker(db)).add(worker(web))
        await nursery.start(sup.run)   # returns once db, then web, are ready

    When a child must restart (see :class:`Restart`), the :class:`Strategy` decides which
    siblings restart with it. More than ``intensity`` restarts within ``period`` seconds
    (Trio's clock) and the supervisor stops every child in reverse start order and raises
    :class:`SupervisorGaveUp` from the last failure. Cancelling the supervisor stops the
    children one by one in reverse start order, each given ``shutdown_grace`` seconds; a
    child that runs a supervisor is first given the time that supervisor's own stop takes
    (it bounds each of its children with its own grace).

    Once every child is gone for good (temporary children, or transient ones that
    returned) the supervisor keeps running with none, as OTP's does, until cancelled.

    A supervisor may be run again after a run ended (that is how a parent restarts a
    nested one), but not twice at the same time.

    Args:
        strategy: which children restart together, see :class:`Strategy`.
        intensity: the restarts allowed within ``period``; one more and it gives up.
        period: the window in seconds over which restarts are counted.
        name: a label for logs and errors.
        shutdown_grace: seconds each child gets to end once cancelled before the
            supervisor logs it and moves on to the next.

    Raises:
        TypeError, ValueError: an argument has the wrong type or is out of range.
    """

    strategy: Strategy = attrs.field(default=Strategy.ONE_FOR_ONE, validator=_check_strategy)
    intensity: int = attrs.field(default=3, kw_only=True, validator=_check_intensity)
    period: float = attrs.field(
        default=5.0, kw_only=True, validator=_check_seconds("period", allow_zero=False)
    )
    name: str | None = attrs.field(default=None, kw_only=True, validator=_check_label)
    shutdown_grace: float = attrs.field(
        default=5.0, kw_only=True, validator=_check_seconds("shutdown_grace", allow_zero=True)
    )
    _children: list[ChildSpecification] = attrs.field(factory=list, init=False, repr=False)
    _label: str = attrs.field(init=False, repr=False)
    _has_run: bool = attrs.field(default=False, init=False, repr=False)
    _running: bool = attrs.field(default=False, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._label = (
            self.name if self.name is not None else f"static-supervisor-{next(_supervisor_ids)}"
        )

    @property
    def label(self) -> str:
        """The name, or a generated ``static-supervisor-N`` when unnamed."""
        return self._label

    def add(self, child: ChildSpecification) -> StaticSupervisor:
        """Append a child; children start in the order they were added.

        Returns:
            The supervisor itself, so that calls chain.

        Raises:
            TypeError: ``child`` is not a :class:`ChildSpecification`.
            RuntimeError: the supervisor has already run.
        """
        if not isinstance(child, ChildSpecification):
            raise TypeError(
                f"add() takes a ChildSpecification (got {child!r}); wrap the start function "
                "with worker(start)"
            )
        if self._has_run:
            raise RuntimeError(
                f"supervisor {self._label!r} has already started, so its children are fixed; "
                "add every child before calling run()"
            )
        self._children.append(child)
        return self

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the children in order and supervise them until cancelled or giving up.

        ``await nursery.start(sup.run)`` returns once every child is ready: each child's
        ``task_status.started()`` is awaited before the next child starts.

        Raises:
            SupervisorGaveUp: more than ``intensity`` restarts within ``period``; every
                child has been stopped, and ``__cause__`` is the last failure.
            RuntimeError: the supervisor is already running.
            BaseException: a child's ``KeyboardInterrupt`` or other non-``Exception``,
                after the other children were stopped.
        """
        if self._running:
            raise RuntimeError(
                f"supervisor {self._label!r} is already running; a supervisor runs in one "
                "place at a time, build another one for a second tree"
            )
        self._running = True
        self._has_run = True
        try:
            exits_in, exits_out = trio.open_memory_channel[_Exit](math.inf)
            state = _StaticRun(
                label=self._label,
                strategy=self.strategy,
                intensity=self.intensity,
                period=self.period,
                grace=self.shutdown_grace,
                children=[
                    _StaticChild(spec, index, spec.label)
                    for index, spec in enumerate(self._children)
                ],
                task_status=task_status,
                exits_in=exits_in,
                exits_out=exits_out,
                window=deque(maxlen=self.intensity + 1),
            )
            await _run_nursery(state.supervise)
        finally:
            self._running = False
        if state.gave_up is not None:
            raise state.gave_up from state.gave_up.__cause__

    def supervised(self, *, restart: Restart = Restart.PERMANENT) -> ChildSpecification:
        """Describe this supervisor as a child of another one.

        When it gives up, the parent sees :class:`SupervisorGaveUp` as its child's failure
        and restarts it (a fresh run with every child started again) or gives up in turn.
        """
        return ChildSpecification(self.run, restart, self._label)


# --- dynamic supervisor -------------------------------------------------------------------


@final
@attrs.define(eq=False, init=False)
class ChildHandle:
    """A child started by :meth:`DynamicSupervisor.start_child`.

    Attributes:
        name: the child specification's name.
    """

    name: str | None
    _label: str = attrs.field(repr=False)
    #: Made by the first wait() only: a trio.Event (and its set of waiters) per live
    #: aggregate is memory that nobody uses.
    _done: trio.Event | None = attrs.field(repr=False)
    _finished: bool = attrs.field(repr=False)
    _scope: trio.CancelScope | None = attrs.field(repr=False)
    _stop_requested: bool = attrs.field(repr=False)

    def __init__(self, name: str | None, label: str) -> None:
        self.name = name
        self._label = label
        self._done = None
        self._finished = False
        self._scope = None
        self._stop_requested = False

    def stop(self) -> None:
        """Cancel the child for good: it is not restarted. Does nothing if already stopped.

        Returns at once; :meth:`wait` for the child to be gone.
        """
        self._stop_requested = True
        if self._scope is not None:
            self._scope.cancel()

    async def wait(self) -> None:
        """Wait until the child is gone for good: finished, stopped or given up."""
        if self._finished:
            await trio.lowlevel.checkpoint()
            return
        if self._done is None:
            self._done = trio.Event()
        await self._done.wait()

    @property
    def finished(self) -> bool:
        """True once the child is gone for good."""
        return self._finished

    def _finish(self) -> None:
        self._scope = None
        self._finished = True
        if self._done is not None:
            self._done.set()


@final
@attrs.define(eq=False)
class _DynamicRun:
    """The state of one call to :meth:`DynamicSupervisor.run`."""

    label: str
    intensity: int
    period: float
    per_child: bool
    grace: float
    nursery: trio.Nursery | None = None
    accepting: bool = False
    #: Live children in start order; a dict used as an ordered set, so that removing a
    #: finished child is O(1) and nothing of it is left behind.
    live: dict[ChildHandle, None] = attrs.field(factory=dict)
    #: Restart times over all children, when they are counted together.
    window: deque[float] = attrs.field(factory=deque)
    stop_requested: trio.Event = attrs.field(factory=trio.Event)
    gave_up: SupervisorGaveUp | None = None
    #: Set when the last live child is gone, once stopping began.
    emptied: trio.Event | None = None
    #: The static supervisor above, told when this one's stop is over (see _StopLink).
    link: _StopLink | None = None

    async def supervise(self, task_status: trio.TaskStatus[None], nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.accepting = True
        link = self.link = _parent_link.get()
        if link is not None:
            link.enter()
        try:
            task_status.started()
            await self.stop_requested.wait()
        finally:
            self.accepting = False
            try:
                await self._stop_all()
            finally:
                for handle in list(self.live):
                    handle.stop()
                if self.live:
                    # Children outlived the grace: the stop is over, and the parent times
                    # what is left with its own grace.
                    self.leave_link()
                # Otherwise the stop ends once the nursery has taken in its children's
                # Cancelled (DynamicSupervisor.run leaves then): for 100,000 children that
                # takes tens of milliseconds, which are this supervisor's, not the parent's.

    def leave_link(self) -> None:
        """Tell the static supervisor above, once, that this supervisor's stop is over."""
        link, self.link = self.link, None
        if link is not None:
            link.leave()

    async def _stop_all(self) -> None:
        """Cancel every live child at once; wait ``grace`` seconds for them to end.

        One grace period for all, from the moment all were cancelled: each child gets
        ``grace`` to end, and 100,000 children stop in the time Trio takes to cancel
        100,000 tasks. Children that outlive it are logged and left behind (the nursery
        still waits for them).
        """
        if not self.live:
            return
        emptied = self.emptied = trio.Event()
        for handle in self.live:
            handle._stop_requested = True
        # One cancellation for all: the children's scopes are not shielded, so cancelling
        # the nursery reaches every child in one pass, as Trio cancels bare tasks;
        # cancelling 100,000 scopes one by one took half as long again. (This task is
        # cancelled too: it only waits below, shielded.)
        assert self.nursery is not None
        self.nursery.cancel_scope.cancel()
        # Shielded: stopping must finish even when the supervisor is itself being cancelled.
        with trio.move_on_after(self.grace, shield=True):
            await emptied.wait()
        for count, handle in enumerate(self.live):
            if count == _STRAGGLERS_NAMED:
                logger.error(
                    "supervisor %r: %d more children ignored cancellation for %g s; moving "
                    "on without them (the supervisor still waits for them before it exits)",
                    self.label,
                    len(self.live) - count,
                    self.grace,
                )
                break
            logger.error(
                "supervisor %r: child %r ignored cancellation for %g s; moving on without it "
                "(the supervisor still waits for it before it exits)",
                self.label,
                handle._label,
                self.grace,
            )

    async def child_task(
        self,
        handle: ChildHandle,
        start: _StartFn,
        restart: Restart,
        on_give_up: Callable[[SupervisorGaveUp], None] | None,
        stoppable: bool = True,
    ) -> None:
        """Run and restart one child; tell ``on_give_up`` if it alone was given up on.

        One frame for the child's whole life, with no helper coroutine under it: a frame
        costs about 250 bytes, and there is one such task per live aggregate. A child
        that is not ``stoppable`` runs without a cancel scope of its own (see
        :meth:`DynamicSupervisor._start_child`).
        """
        gave_up: SupervisorGaveUp | None = None
        # Per-child restart times live in this frame only, so they go when the child goes.
        window: deque[float] | None = None
        try:
            while not handle._stop_requested:
                # Not shielded (a static supervisor's children are): the supervisor stops
                # all its children at once, by cancelling its nursery (see _stop_all); the
                # child's own scope serves ChildHandle.stop alone.
                scope = handle._scope = trio.CancelScope() if stoppable else None
                failure: Exception | None = None
                try:
                    with _UNSCOPED if scope is None else scope:
                        await start(task_status=trio.TASK_STATUS_IGNORED)
                except Exception as exc:
                    failure = exc
                stopped = handle._stop_requested if scope is None else scope.cancel_called
                if stopped or not self.accepting:
                    break
                if not _should_restart(restart, failure):
                    if failure is not None:
                        logger.warning(
                            "supervisor %r: %s child %r failed with %r; not restarting it",
                            self.label,
                            restart.value,
                            handle._label,
                            failure,
                        )
                    break
                reason = failure if failure is not None else _returned(handle._label)
                if self.per_child:
                    if window is None:
                        window = deque(maxlen=self.intensity + 1)
                    counted = window
                else:
                    counted = self.window
                if _note_restart(counted, self.period, self.intensity):
                    gave_up = self._give_up(handle._label, reason)
                    break
                logger.warning(
                    "supervisor %r: restarting child %r after %r "
                    "(restart %d of %d allowed within %g s)",
                    self.label,
                    handle._label,
                    reason,
                    len(counted),
                    self.intensity,
                    self.period,
                )
                del failure, reason
                # A child that fails without ever yielding must not starve the other tasks.
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            del self.live[handle]
            handle._finish()
            if not self.live and self.emptied is not None:
                self.emptied.set()
        # Told only once the child is gone for good, so the callback may start a fresh
        # child in its place.
        if gave_up is not None and on_give_up is not None:
            try:
                on_give_up(gave_up)
            except Exception:
                # The callback is the owner's business; its bug must not take the other
                # children down with it.
                logger.exception(
                    "supervisor %r: on_give_up for child %r raised; ignoring it",
                    self.label,
                    handle._label,
                )

    def _give_up(self, label: str, reason: Exception) -> SupervisorGaveUp | None:
        """Give up on one child (per_child) or on the whole supervisor (returns None)."""
        error = _gave_up(self.label, self.intensity, self.period, label, reason)
        logger.error(
            "supervisor %r: child %r failed with %r after %d restarts within %g s; %s",
            self.label,
            label,
            reason,
            self.intensity,
            self.period,
            "stopping it for good" if self.per_child else "giving up",
        )
        if self.per_child:
            return error
        if self.gave_up is None:
            self.gave_up = error
        self.accepting = False
        self.stop_requested.set()
        return None


@final
@attrs.define(eq=False)
class DynamicSupervisor:
    """A supervisor that takes children while it runs and restarts each one on its own.

    Used for one task per live aggregate: children come and go by the million, so a
    child's bookkeeping is dropped as soon as it is gone for good. When it stops, it
    cancels all its children at once (as OTP's ``simple_one_for_one`` does) and gives them
    ``shutdown_grace`` seconds together.

    Restarts are counted over all children together (``per_child=False``, OTP's
    behaviour: too many and the whole supervisor stops every child and raises
    :class:`SupervisorGaveUp`), or for each child on its own
    (``per_child=True``: a child that fails too often is stopped alone, its ``on_give_up``
    callback is told, and the others run on).

    Args:
        intensity: the restarts allowed within ``period``; one more and it gives up.
        period: the window in seconds over which restarts are counted.
        per_child: count restarts per child rather than over the whole supervisor.
        name: a label for logs and errors.
        shutdown_grace: seconds the children get to end once all of them were cancelled
            (when the supervisor stops); those still running then are logged and left
            behind, and the supervisor still waits for them before it exits.

    Raises:
        TypeError, ValueError: an argument has the wrong type or is out of range.
    """

    intensity: int = attrs.field(default=3, kw_only=True, validator=_check_intensity)
    period: float = attrs.field(
        default=5.0, kw_only=True, validator=_check_seconds("period", allow_zero=False)
    )
    per_child: bool = attrs.field(
        default=False, kw_only=True, validator=attrs.validators.instance_of(bool)
    )
    name: str | None = attrs.field(default=None, kw_only=True, validator=_check_label)
    shutdown_grace: float = attrs.field(
        default=5.0, kw_only=True, validator=_check_seconds("shutdown_grace", allow_zero=True)
    )
    _label: str = attrs.field(init=False, repr=False)
    _run: _DynamicRun | None = attrs.field(default=None, init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._label = (
            self.name if self.name is not None else f"dynamic-supervisor-{next(_supervisor_ids)}"
        )

    @property
    def label(self) -> str:
        """The name, or a generated ``dynamic-supervisor-N`` when unnamed."""
        return self._label

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Supervise children until cancelled or giving up; started once it accepts children.

        Children still running when the run ends are cancelled all at once and given
        ``shutdown_grace`` seconds, together, to end; the order they end in is the
        scheduler's.

        Raises:
            SupervisorGaveUp: with ``per_child=False``, more than ``intensity`` restarts
                within ``period``; every child has been stopped, ``__cause__`` is the last
                failure.
            RuntimeError: the supervisor is already running.
            BaseException: a child's ``KeyboardInterrupt`` or other non-``Exception``,
                after the other children were stopped.
        """
        if self._run is not None:
            raise RuntimeError(
                f"supervisor {self._label!r} is already running; a supervisor runs in one "
                "place at a time, build another one for a second tree"
            )
        state = self._run = _DynamicRun(
            self._label, self.intensity, self.period, self.per_child, self.shutdown_grace
        )
        try:
            await _run_nursery(functools.partial(state.supervise, task_status))
        finally:
            state.leave_link()
            self._run = None
        if state.gave_up is not None:
            raise state.gave_up from state.gave_up.__cause__

    def start_child(
        self,
        child: ChildSpecification,
        *,
        on_give_up: Callable[[SupervisorGaveUp], None] | None = None,
    ) -> ChildHandle:
        """Schedule a child to start; never waits.

        The child starts at the next scheduling point; its ``task_status.started()`` is
        not waited for. It is restarted following its :class:`Restart` type.

        Args:
            child: what to run.
            on_give_up: with ``per_child=True``, called (synchronously) with
                :class:`SupervisorGaveUp` from the last failure when this child failed
                too often and was stopped. An exception it raises is logged and ignored.

        Raises:
            RuntimeError: the supervisor is not running (not started yet, stopping, or
                stopped).
            TypeError: ``child`` is not a :class:`ChildSpecification`.
        """
        state = self._run
        if state is None or not state.accepting or state.nursery is None:
            raise RuntimeError(
                f"supervisor {self._label!r} is not running; start children after "
                "`await nursery.start(supervisor.run)` and before it stops"
            )
        if not isinstance(child, ChildSpecification):
            raise TypeError(
                f"start_child() takes a ChildSpecification (got {child!r}); wrap the start "
                "function with worker(start)"
            )
        return self._start_child(child.start, child.restart, child.name, child.label, on_give_up)

    def _start_child(
        self,
        start: _StartFn,
        restart: Restart,
        name: str | None,
        label: str,
        on_give_up: Callable[[SupervisorGaveUp], None] | None,
        *,
        stoppable: bool = True,
    ) -> ChildHandle:
        """:meth:`start_child` without the specification, for a caller whose values are valid.

        The runtime starts one child per first visit of an aggregate: a specification,
        validated and then dropped, would cost time on every one of them. A child that is
        not ``stoppable`` gets no cancel scope of its own (about 680 bytes per child): its
        handle's ``stop`` only keeps it from being restarted, and it ends by returning or
        when the whole supervisor stops. For a caller that never stops one child alone
        (the runtime's aggregates).
        """
        state = self._run
        if state is None or not state.accepting or state.nursery is None:
            raise RuntimeError(
                f"supervisor {self._label!r} is not running; start children after "
                "`await nursery.start(supervisor.run)` and before it stops"
            )
        handle = ChildHandle(name, label)
        state.live[handle] = None
        if _parent_link.get() is None:
            state.nursery.start_soon(
                state.child_task, handle, start, restart, on_give_up, stoppable, name=label
            )
            return handle
        # The child's task copies the caller's context: it must not inherit the link of a
        # static supervisor above the caller (see _StopLink); children of a dynamic
        # supervisor are all timed by its one grace period. (Only set when needed: a
        # context that differs from its parent's costs memory in every child.)
        token = _parent_link.set(None)
        try:
            state.nursery.start_soon(
                state.child_task, handle, start, restart, on_give_up, stoppable, name=label
            )
        finally:
            _parent_link.reset(token)
        return handle

    def supervised(self, *, restart: Restart = Restart.PERMANENT) -> ChildSpecification:
        """Describe this supervisor as a child of another one.

        When it gives up, the parent sees :class:`SupervisorGaveUp` as its child's
        failure. A restarted dynamic supervisor starts empty: its old children are gone.
        """
        return ChildSpecification(self.run, restart, self._label)

    def __len__(self) -> int:
        """The number of live children (scheduled, running or restarting)."""
        return 0 if self._run is None else len(self._run.live)

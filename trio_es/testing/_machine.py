"""The stateful model check: Hypothesis-generated concurrent programs against the real runtime.

Shape (chosen because it shrinks well): Hypothesis draws a whole :class:`Program` up
front, a few *callers* (each a list of steps: execute, read, pause, a burst of concurrent
executes, a store disruption) plus a fault plan for the store and for the queries. The
program runs in one ``trio.run`` per example, on Trio's ``MockClock`` with autojump (so
idle timeouts, slow commits and stalls cost no real time), all callers at once against
one eventsourcing system. Every call is recorded with its logical start and end order;
at the end the system is drained and the trace is checked against the
:class:`~trio_es.testing.ReferenceModel` and the stored streams. A failing program
shrinks by dropping callers, steps and faults, and by simplifying the rest, so the
report is a short script. (A ``RuleBasedStateMachine`` would run its rules one at a
time; concurrency is the point here.)

Under Hypothesis, Trio's scheduler is seeded per example, so with the memory store a
failing example replays exactly; stores that work in threads add real timing.

What the check asserts is listed on :class:`ModelCheck`.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import math
import secrets
import textwrap
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final, Generic, TypeAlias, TypeVar, final

import attrs
import hypothesis
import trio
import trio.testing
from hypothesis import strategies as st

from .. import _facade
from .._errors import (
    ActorTimeout,
    AggregateCrashed,
    CommitOutcomeUnknown,
    DomainError,
    EntityNotFound,
    EventStoreError,
    SystemStopped,
    TransactionFailed,
    describe_error,
)
from .._projection import Projection
from .._runtime import RuntimeOptions
from .._serialization import Transcoder
from .._store import EventStore, load_snapshot_and_events
from .._subject import new_name
from .._types import Aggregate, AggregateStats, ExecuteResult, Snapshot, SnapshotConfig, SystemStats
from .._validated import Frequency
from ._faults import Fault, FaultInjectingStore, FaultKind
from ._model import Accepted, Crashed, Decision, ReferenceModel, Rejected

__all__ = [
    "CALL_TIMEOUT_MS",
    "COMMAND_ID_KEY",
    "IDLE_TIMEOUT",
    "INVARIANTS",
    "READS",
    "STALL_SECONDS",
    "StoreFactory",
    "Violation",
    "Burst",
    "Cancel",
    "Crash",
    "CrashInApply",
    "Deposit",
    "Deposited",
    "Disrupt",
    "Domain",
    "Execute",
    "InsufficientFunds",
    "LEDGER",
    "Ledger",
    "ModelCheck",
    "ModelCheckFailure",
    "Pause",
    "PlannedCrash",
    "PlannedQueryFailure",
    "Program",
    "Read",
    "Slow",
    "Withdraw",
    "Withdrawn",
    "check_runtime",
    "ledger_transcoder",
]

CommandT = TypeVar("CommandT")
EventT = TypeVar("EventT")
EntityT = TypeVar("EntityT")

#: The metadata key under which each execute carries its call's id, so that every
#: stored event (and every event a query sees) can be traced back to its command.
COMMAND_ID_KEY: Final = "trio_es.testing.command"

# Times are in seconds of Trio's (mock) clock. Everything a program can do that takes
# time adds up to far less than CALL_TIMEOUT, except a stall: so a call that times out
# on an aggregate without a stall was lost (see the liveness check).
CALL_TIMEOUT_MS: Final = 120_000
_CALL_TIMEOUT: Final = CALL_TIMEOUT_MS / 1000
#: A stalled handle sleeps longer than a call may wait.
STALL_SECONDS: Final = 200.0
#: Aggregates with no message for this long stop (and reload on their next message).
IDLE_TIMEOUT: Final = 1.0
#: The longest the whole program may run before it counts as hung.
_HANG_SECONDS: Final = 20_000.0
#: How long draining waits for the queries to catch up.
_QUERY_CATCH_UP_SECONDS: Final = 600.0
#: Draining stops waiting for the queries after this long without a delivery (well
#: above any restart back-off a query may get).
_QUERY_QUIET_SECONDS: Final = 60.0
#: At most this many planned query failures: below the query restart intensity, so a
#: correct runtime never gives a query up and every query must see everything.
_MAX_QUERY_FAILURES: Final = 3
#: Query restarts allowed (per period); far above _MAX_QUERY_FAILURES.
_QUERY_INTENSITY: Final = 10
#: The projection every run feeds (when the store feeds projections): it resumes where
#: the previous run on the same database left it, and sees only this run's aggregates.
_PROJECTION: Final = "trio_es.testing.model-check"
#: Small, so that a run's events span several batches.
_PROJECTION_BATCH: Final = 3
_SLACK: Final = 1e-6
#: How far past its deadline a timed-out call may end: while a store call is in flight
#: mock time runs at the real rate (see _clock_held), so a wake-up may land a little late.
_DEADLINE_SLACK: Final = 0.5
_TRANSCRIPT_LINES: Final = 150


# -- what a program is made of ---------------------------------------------------------


class PlannedCrash(Exception):
    """The bug the check plants in ``handle`` (:class:`Crash`) or ``apply``
    (:class:`CrashInApply`): a crash, not a rejection."""


class PlannedQueryFailure(Exception):
    """The failure the check plants in its flaky query."""


@final
@attrs.frozen
class Slow(Generic[CommandT]):
    """Run ``command`` with a ``handle`` that first sleeps ``seconds``.

    A stall (``seconds >= STALL_SECONDS``) outlasts the call timeout on purpose.
    """

    command: CommandT
    seconds: float


@final
@attrs.frozen
class Crash:
    """A command whose ``handle`` raises :class:`PlannedCrash` (a bug, not a rejection)."""


@final
@attrs.frozen
class CrashInApply:
    """A command whose one event makes ``apply`` raise :class:`PlannedCrash`."""


@attrs.frozen
class _Poison:
    """The event of :class:`CrashInApply`; ``apply`` raises on it, so it is never stored."""


@final
@attrs.frozen
class Cancel:
    """The caller gives up: after ``seconds``, then ``checkpoints`` more scheduling points."""

    seconds: float = 0.0
    checkpoints: int = 0


@final
@attrs.frozen
class Execute:
    """``es.execute`` on aggregate number ``aggregate``; cancelled as ``cancel`` says."""

    aggregate: int
    command: Any
    cancel: Cancel | None = None


#: The invariants the check asserts (see :class:`ModelCheck`), as failures name them.
INVARIANTS: Final = (
    "stored once",
    "nothing stored on failure",
    "fifo",
    "model",
    "expected errors",
    "liveness",
    "call_timeout",
    "reads",
    "cache",
    "snapshots",
    "queries",
    "stopped",
    "store",
    "system",
    "harness",
)

#: What a :class:`Read` calls.
READS: Final = (
    "load_aggregate",
    "load_events",
    "latest_snapshot",
    "aggregate_stats",
    "system_stats",
)


@final
@attrs.frozen
class Read:
    """One read call (one of :data:`READS`; ``system_stats`` ignores ``aggregate``)."""

    aggregate: int
    what: str
    cancel: Cancel | None = None


@final
@attrs.frozen
class Pause:
    """The caller sleeps ``seconds`` (0: one scheduling point); long ones let aggregates idle."""

    seconds: float


@final
@attrs.frozen
class Burst:
    """Several executes by one caller, started at once (in the order Trio's scheduler
    picks, which Hypothesis seeds); the caller goes on when all have returned.

    Generated bursts go to one aggregate, so that the commands queue up behind each
    other and the runtime batches them.
    """

    executes: tuple[Execute, ...]


@final
@attrs.frozen
class Disrupt:
    """Call the check's ``disrupt`` hook (for example: kill the store's connections)."""


Step: TypeAlias = Execute | Read | Pause | Burst | Disrupt


@final
@attrs.frozen
class Program:
    """One generated test case: callers running at once, and the faults to inject.

    Attributes:
        aggregates: how many aggregates the callers use (numbered from 0).
        snapshot_every: the snapshot frequency, or ``None`` for no snapshots.
        mailbox_capacity: the runtime's per-aggregate mailbox capacity.
        callers: each caller's steps, run in order; the callers run concurrently.
        faults: the store's fault plan (the n-th writing transaction gets ``faults[n]``).
        query_failures: which deliveries (counted from 0) the flaky query raises on.
        query_delays: how long the slow query sleeps on each delivery (cycled).
    """

    aggregates: int
    snapshot_every: int | None
    mailbox_capacity: int
    callers: tuple[tuple[Step, ...], ...]
    faults: tuple[Fault | None, ...] = ()
    query_failures: frozenset[int] = frozenset()
    query_delays: tuple[float, ...] = ()

    def executes(self) -> list[Execute]:
        """Every execute step of the program."""
        found: list[Execute] = []
        for steps in self.callers:
            for step in steps:
                if isinstance(step, Execute):
                    found.append(step)
                elif isinstance(step, Burst):
                    found.extend(step.executes)
        return found


# -- a built-in domain -----------------------------------------------------------------


@final
@attrs.frozen
class Deposit:
    """Ledger command: one ``Deposited`` event per amount (none at all is fine)."""

    amounts: tuple[int, ...]


@final
@attrs.frozen
class Withdraw:
    """Ledger command: refused with ``InsufficientFunds`` unless the balance covers it."""

    amount: int


@final
@attrs.frozen
class Deposited:
    """Ledger event."""

    amount: int


@final
@attrs.frozen
class Withdrawn:
    """Ledger event."""

    amount: int


@final
@attrs.frozen
class Ledger:
    """The ledger entity: the balance and every movement, so that order shows in state."""

    balance: int = 0
    movements: tuple[int, ...] = ()


class InsufficientFunds(DomainError):
    """The ledger refused a withdrawal."""


def _ledger_handle(ledger: Ledger, command: Deposit | Withdraw) -> list[Deposited | Withdrawn]:
    match command:
        case Deposit(amounts):
            return [Deposited(amount) for amount in amounts]
        case Withdraw(amount):
            if amount > ledger.balance:
                raise InsufficientFunds((ledger.balance, amount))
            return [Withdrawn(amount)]
    raise TypeError(f"not a ledger command: {command!r}")


def _ledger_apply(ledger: Ledger, event: Deposited | Withdrawn) -> Ledger:
    change = event.amount if isinstance(event, Deposited) else -event.amount
    return Ledger(ledger.balance + change, (*ledger.movements, change))


def ledger_transcoder() -> Transcoder:
    """A transcoder with the ledger's events and entity registered (for the SQL stores)."""
    transcoder = Transcoder()
    transcoder.register_event(Deposited, name="model_check.Deposited")
    transcoder.register_event(Withdrawn, name="model_check.Withdrawn")
    transcoder.register_entity(Ledger, name="model_check.Ledger")
    return transcoder


@final
@attrs.frozen
class Domain(Generic[CommandT, EventT, EntityT]):
    """A domain to check the runtime with: its pure functions and a strategy of commands.

    Attributes:
        handle: ``handle(entity, command) -> events``, a plain function (the reference
            model runs it too); raises ``DomainError`` to reject.
        apply: ``apply(entity, event) -> entity``, pure.
        empty_state: the entity before the first event.
        commands: a Hypothesis strategy of commands; include some that are rejected in
            some states, and some with several (or no) events.
    """

    handle: Callable[[EntityT, CommandT], Iterable[EventT]]
    apply: Callable[[EntityT, EventT], EntityT]
    empty_state: EntityT
    commands: st.SearchStrategy[CommandT]


#: The built-in domain: a ledger whose withdrawals are refused when they overdraw it.
LEDGER: Final[Domain[Deposit | Withdraw, Deposited | Withdrawn, Ledger]] = Domain(
    handle=_ledger_handle,
    apply=_ledger_apply,
    empty_state=Ledger(),
    # Mostly deposits, so that most commands store events (and withdrawals can pass).
    commands=st.sampled_from(("deposit", "deposit", "withdraw")).flatmap(
        lambda kind: (
            st.builds(Deposit, st.lists(st.integers(1, 9), max_size=3).map(tuple))
            if kind == "deposit"
            else st.builds(Withdraw, st.integers(1, 12))
        )
    ),
)


# -- the failure -----------------------------------------------------------------------


@final
@attrs.frozen
class Violation:
    """One broken promise: which invariant, and what was seen."""

    invariant: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.invariant}] {self.detail}"


class ModelCheckFailure(AssertionError):
    """The runtime broke at least one promise on a program; the message says which.

    Attributes:
        violations: every broken promise found in the program.
        transcript: what happened: each call and its outcome, the stored streams, the
            faults injected and what each query saw.
    """

    def __init__(self, violations: Sequence[Violation], transcript: str) -> None:
        self.violations = list(violations)
        self.transcript = transcript
        listed = "\n".join(f"  - {v}" for v in self.violations)
        super().__init__(
            f"{len(self.violations)} broken promise(s):\n{listed}\n\nTranscript:\n{transcript}"
        )

    @property
    def invariants(self) -> set[str]:
        """The names of the invariants that failed."""
        return {v.invariant for v in self.violations}


# -- the trace -------------------------------------------------------------------------


@attrs.define(eq=False)
class _Call:
    """One call a caller made, and how it ended."""

    id: int
    caller: int
    op: str
    aggregate: int | None
    command: Any = None
    invoked: int = 0
    started: float = 0.0
    completed: int | None = None
    ended: float | None = None
    value: Any = None
    error: Exception | None = None
    cancelled: bool = False
    final: bool = False
    after_stop: bool = False

    @property
    def ok(self) -> bool:
        return self.completed is not None and self.error is None and not self.cancelled

    def describe(self, name: Callable[[int | None], str]) -> str:
        what = f"{self.op} {name(self.aggregate)}"
        if self.op == "execute":
            what += f" {self.command!r}"
        if self.completed is None:
            outcome = "never returned"
        elif self.cancelled:
            outcome = "cancelled"
        elif self.error is not None:
            outcome = f"raised {describe_error(self.error)}"
        else:
            outcome = "ok" if self.value is None else f"-> {_short(self.value)}"
        span = f"t={self.started:.3f}" + ("" if self.ended is None else f"..{self.ended:.3f}")
        who = (
            "after the stop"
            if self.after_stop
            else "drain"
            if self.final
            else f"caller {self.caller}"
        )
        return f"#{self.id} ({who}, {span}): {what}: {outcome}"


def _short(value: Any) -> str:
    match value:
        case Aggregate(_, entity, sequence):
            return f"Aggregate(sequence={sequence}, entity={entity!r})"
        case Snapshot(_, entity, sequence, _):
            return f"Snapshot(sequence={sequence}, entity={entity!r})"
        case list():
            return f"{len(value)} events"
    return repr(value)


@attrs.frozen
class _Seen:
    """One event as a query or the store holds it: sequence, command id, payload, and
    its place in the whole store (so a query fed other positions than the store holds,
    or none, differs from the stored stream)."""

    sequence: int
    command: int | None
    payload: Any
    global_position: int | None = None

    def __str__(self) -> str:
        return f"{self.sequence}(#{self.command})"


def _command_id(metadata: Sequence[tuple[str, str]]) -> int | None:
    for key, value in metadata:
        if key == COMMAND_ID_KEY:
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _seen(envelopes: Iterable[Any]) -> tuple[_Seen, ...]:
    return tuple(
        _Seen(e.sequence, _command_id(e.metadata), e.payload, e.global_position) for e in envelopes
    )


@attrs.define(eq=False)
class _Delivery:
    aggregate_id: str
    events: tuple[_Seen, ...]
    ok: bool


@attrs.define(eq=False)
class _Trace:
    """Everything a run observed."""

    ids: list[str]
    calls: list[_Call] = attrs.Factory(list)
    clock: int = 0
    deliveries: dict[str, list[_Delivery]] = attrs.Factory(dict)
    streams: dict[str, tuple[_Seen, ...]] = attrs.Factory(dict)
    snapshots: dict[str, Snapshot[Any] | None] = attrs.Factory(dict)
    injected: list[Any] = attrs.Factory(list)
    system_error: BaseException | None = None
    hung: bool = False
    drain_hung: bool = False
    disrupt_errors: list[BaseException] = attrs.Factory(list)
    #: The global positions the projection was handed, in order (every aggregate's).
    projected: list[int] = attrs.Factory(list)
    #: After the stop: the projection's stored checkpoint and the store's head, or
    #: None when the store feeds no projections.
    checkpoint: tuple[int, int] | None = None

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def new_call(self, caller: int, op: str, aggregate: int | None, command: Any = None) -> _Call:
        call = _Call(len(self.calls), caller, op, aggregate, command)
        self.calls.append(call)
        return call

    def start(self, call: _Call) -> None:
        call.invoked = self.tick()
        call.started = trio.current_time()

    def finish(
        self,
        call: _Call,
        *,
        value: Any = None,
        error: Exception | None = None,
        cancelled: bool = False,
    ) -> None:
        call.completed = self.tick()
        call.ended = trio.current_time()
        call.value, call.error, call.cancelled = value, error, cancelled

    def name(self, aggregate: int | None) -> str:
        return "-" if aggregate is None else f"a{aggregate}"


# -- the check -------------------------------------------------------------------------

StoreFactory: TypeAlias = Callable[[], AbstractAsyncContextManager[EventStore[Any, Any, Any]]]


@asynccontextmanager
async def _memory_store() -> AsyncIterator[EventStore[Any, Any, Any]]:
    from .._memory_store import MemoryStore

    yield MemoryStore()


def _sync_handle(domain: Domain[Any, Any, Any]) -> Callable[[Any, Any], Iterable[Any]]:
    """The harness's commands around the domain's, as the reference model runs them."""

    def handle(entity: Any, command: Any) -> Iterable[Any]:
        match command:
            case Slow(inner, _):
                return domain.handle(entity, inner)
            case Crash():
                raise PlannedCrash("planted crash in handle")
            case CrashInApply():
                return [_Poison()]
        return domain.handle(entity, command)

    return handle


def _apply(domain: Domain[Any, Any, Any]) -> Callable[[Any, Any], Any]:
    def apply(entity: Any, event: Any) -> Any:
        if isinstance(event, _Poison):
            raise PlannedCrash("planted crash in apply")
        return domain.apply(entity, event)

    return apply


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _choices(what: str, *, optional: bool = False) -> Callable[[Any, Any, Any], None]:
    def check(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        good = (
            isinstance(value, tuple)
            and value
            and all((optional and v is None) or (_is_int(v) and v > 0) for v in value)
        )
        if not good:
            raise ValueError(
                f"{attribute.name} must be a non-empty tuple of {what} values (got {value!r})"
            )

    return check


def _at_least(low: int) -> Callable[[Any, Any, Any], None]:
    def check(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not _is_int(value) or value < low:
            raise ValueError(f"{attribute.name} must be an int >= {low} (got {value!r})")

    return check


def _seconds(_: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{attribute.name} must be a number of seconds >= 0 (got {value!r})")


@final
@attrs.frozen(kw_only=True)
class ModelCheck(Generic[CommandT, EventT, EntityT]):
    """Checks the runtime against the reference model on generated concurrent programs.

    The invariants, each named in a failure report:

    * ``stored once``: every command is stored at most once, as one contiguous run of
      events; every acknowledged command with events is stored exactly once.
    * ``nothing stored on failure``: nothing is stored for a command whose caller was
      told it failed before committing (a ``DomainError``, ``TransactionFailed``, an
      ``EventStoreError`` other than ``CommitOutcomeUnknown``, a crash,
      ``AggregateCrashed``). ``CommitOutcomeUnknown``, ``ActorTimeout`` and cancelled
      commands may be stored, once.
    * ``fifo``: each aggregate's stored commands are in the order their calls were made.
    * ``model``: the stored streams are what the reference model makes of the stored
      commands, in stored order; and each reply (ok, rejection, crash) is the model's
      for the state the command was decided on.
    * ``expected errors``: a call fails only in ways the program can cause (an injected
      fault, a planted crash, a stall): anything else is a bug, e.g. ``MailboxFull``.
    * ``liveness``: no call times out unless its aggregate had a stall; the program
      finishes; ``call_timeout``: every call ends within it.
    * ``reads``: loads, stats and snapshots are consistent with the stored stream and
      see at least every command acknowledged before the read was made.
    * ``cache``: after the run, ``load_aggregate`` equals the replay of the stored events.
    * ``stopped``: once the ``open_eventsourcing`` block has exited, an execute and a
      load raise ``SystemStopped`` at once, and nothing is stored.
    * ``snapshots``: the latest stored snapshot ``s`` satisfies ``n*(head//n) <= s <=
      head`` when ``head >= n`` (none before), ends a command, and holds the replay up
      to ``s``.
    * ``queries``: every query sees every stored event exactly once per aggregate, in
      order; a delivery the query raised on does not count (the runtime redelivers it).
      The flaky query fails fewer times than its restart intensity, so no query is
      ever given up.

    Attributes:
        domain: the handle/apply/empty state and command strategy to run.
        store_factory: makes the store for one example: an async context manager that
            yields an open store. Aggregate ids are fresh per example, so one database
            may serve every example. Default: a new ``MemoryStore``.
        snapshot_frequencies: the snapshot frequencies to draw from (``None``: off).
        mailbox_capacities: the mailbox capacities to draw from (small ones test the
            facade's backpressure).
        faults: inject store faults (errors before and after commit, lost connections,
            conflicts, slow commits).
        crashes: send commands that crash ``handle`` or ``apply``.
        cancellations: callers give up on some calls.
        stalls: some commands stall past the call timeout.
        failing_queries: the flaky query raises now and then; the slow one sleeps.
        disrupt: an async hook that programs call at random points (e.g. kill the
            database connections). With it, any store error is an expected outcome.
        autojump_threshold: the ``MockClock`` autojump threshold, in real seconds. 0 for
            stores that never block in threads; a little above the longest store call
            for the others, or the clock jumps while a thread runs.
        max_aggregates, max_callers, max_steps, max_faults: the program's size limits.
    """

    domain: Domain[CommandT, EventT, EntityT]
    store_factory: StoreFactory = _memory_store
    snapshot_frequencies: tuple[int | None, ...] = attrs.field(
        default=(None, 1, 2, 3), validator=_choices("a positive int or None", optional=True)
    )
    mailbox_capacities: tuple[int, ...] = attrs.field(
        default=(1, 2, 10_000), validator=_choices("a positive int")
    )
    faults: bool = True
    crashes: bool = True
    cancellations: bool = True
    stalls: bool = True
    failing_queries: bool = True
    disrupt: Callable[[], Awaitable[None]] | None = None
    autojump_threshold: float = attrs.field(default=0.0, validator=_seconds)
    max_aggregates: int = attrs.field(default=3, validator=_at_least(1))
    max_callers: int = attrs.field(default=4, validator=_at_least(1))
    max_steps: int = attrs.field(default=6, validator=_at_least(1))
    max_faults: int = attrs.field(default=8, validator=_at_least(0))

    # -- generation --

    def programs(self) -> st.SearchStrategy[Program]:
        """The Hypothesis strategy of programs this check runs."""
        return _programs(self)

    # -- running --

    def run(self, program: Program) -> None:
        """Run ``program`` once (its own ``trio.run``) and check it.

        Outside Hypothesis, Trio schedules tasks in a random order, so the interleaving
        may differ from run to run; :meth:`replay` runs it as the search did.

        Raises:
            ModelCheckFailure: the runtime broke a promise; the message lists which.
        """
        clock = trio.testing.MockClock(autojump_threshold=self.autojump_threshold)
        trace = trio.run(self._run, program, clock=clock)
        _Checker(self, program, trace).check()

    def replay(self, program: Program) -> None:
        """Run ``program`` once as the search does: under Hypothesis, which seeds Trio's
        scheduler, so the interleaving is the one the search saw (with the memory store).

        :meth:`run` outside Hypothesis schedules tasks in a random order instead. Use
        this to pin a program (a shrunk failure, say) as a regression test.

        Raises:
            ModelCheckFailure: the runtime broke a promise; the message lists which.
        """

        @hypothesis.settings(
            database=None, phases=[hypothesis.Phase.explicit], deadline=None, print_blob=False
        )
        @hypothesis.example(program=program)
        @hypothesis.given(program=st.just(program))
        def model_check(program: Program) -> None:
            self.run(program)

        model_check()

    def check(
        self,
        settings: hypothesis.settings | None = None,
        *,
        invariants: Collection[str] | None = None,
    ) -> None:
        """Run the check on as many programs as ``settings`` allows (default: the profile's).

        Hypothesis's deadline is turned off (runs vary in length), ``print_blob`` on, and
        its ``explain`` phase off (it traces every run, and made reporting a failure 15
        times slower). To run a failure again, pass the reported ``Program`` to
        :meth:`replay`.

        Args:
            settings: Hypothesis settings; the budget is their ``max_examples``.
            invariants: count only failures that break one of these invariants (by the
                names :class:`ModelCheck` lists), ignoring the others: to hunt one bug
                while another is known.

        Raises:
            ModelCheckFailure: for the shrunk program that breaks a promise.
        """
        base = hypothesis.settings() if settings is None else settings
        run_settings = hypothesis.settings(
            base,
            deadline=None,
            print_blob=True,
            phases=[phase for phase in base.phases if phase is not hypothesis.Phase.explain],
            suppress_health_check=[
                *base.suppress_health_check,
                hypothesis.HealthCheck.too_slow,
                hypothesis.HealthCheck.data_too_large,
            ],
        )

        wanted = None if invariants is None else frozenset(invariants)
        unknown = set() if wanted is None else wanted - set(INVARIANTS)
        if unknown:
            raise ValueError(f"invariants must be names from INVARIANTS (got {sorted(unknown)!r})")

        @run_settings
        @hypothesis.given(program=self.programs())
        def model_check(program: Program) -> None:
            try:
                self.run(program)
            except ModelCheckFailure as failure:
                if wanted is None or failure.invariants & wanted:
                    raise

        model_check()

    async def _run(self, program: Program) -> _Trace:
        token = secrets.token_hex(4)
        trace = _Trace(ids=[f"model-check-{token}-a{i}" for i in range(program.aggregates)])
        try:
            with trio.fail_after(_HANG_SECONDS * 2):
                factory = self.store_factory()
                if self.autojump_threshold > 0:
                    factory = _held_while_entering_and_exiting(factory)
                async with factory as real:
                    inner = _ClockHoldingStore(real) if self.autojump_threshold > 0 else real
                    await self._run_system(program, trace, inner)
                    await self._read_store(program, trace, inner)
        except trio.TooSlowError:
            trace.drain_hung = True
        return trace

    async def _run_system(
        self, program: Program, trace: _Trace, inner: EventStore[Any, Any, Any]
    ) -> None:
        store: FaultInjectingStore[Any, Any, Any] = FaultInjectingStore(inner, program.faults)
        trace.injected = store.injected
        queries = _Queries(trace, program)
        snapshots = (
            None
            if program.snapshot_every is None
            else SnapshotConfig(Frequency(program.snapshot_every))
        )
        options = RuntimeOptions(
            idle_timeout=IDLE_TIMEOUT,
            mailbox_capacity=program.mailbox_capacity,
            query_intensity=_QUERY_INTENSITY,
            projection_retries=_QUERY_INTENSITY,
            projection_backoff=1.0,
        )
        projections: list[Projection[Any]] = []
        if _feeds_projections(inner):
            trace.deliveries["projection"] = []
            projections.append(
                Projection(_PROJECTION, queries.projection, batch_size=_PROJECTION_BATCH)
            )
        runtime_handle = _async_handle(self.domain)
        try:
            async with _facade.open_eventsourcing(
                eventstore=store,
                handle=runtime_handle,
                apply=_apply(self.domain),
                empty_state=self.domain.empty_state,
                queries=queries.queries(),
                snapshot_config=snapshots,
                options=options,
                call_timeout=CALL_TIMEOUT_MS,
                projections=projections,
            ) as es:
                with trio.move_on_after(_HANG_SECONDS) as scope:
                    async with trio.open_nursery() as nursery:
                        for number, steps in enumerate(program.callers):
                            nursery.start_soon(self._caller, es, trace, number, steps)
                trace.hung = scope.cancelled_caught
                await self._drain(es, trace, inner, queries)
        except Exception as error:
            trace.system_error = error
            return
        await self._after_stop(program, es, trace)

    async def _after_stop(self, program: Program, es: Any, trace: _Trace) -> None:
        """Once the block has exited, calls must fail at once with ``SystemStopped``."""
        executes = program.executes()
        command = executes[-1].command if executes else None
        calls: list[tuple[_Call, Callable[[], Awaitable[Any]]]] = []
        aggregate_id = trace.ids[0]
        if command is not None:
            call = trace.new_call(-1, "execute", 0, command)
            metadata = ((COMMAND_ID_KEY, str(call.id)),)
            calls.append(
                (call, functools.partial(es.execute, aggregate_id, command, metadata=metadata))
            )
        calls.append(
            (
                trace.new_call(-1, "load_aggregate", 0),
                functools.partial(es.load_aggregate, aggregate_id),
            )
        )
        for call, fn in calls:
            call.after_stop = True
            # A facade that ignores both the stop and its own timeout must not hang the run.
            with trio.move_on_after(_CALL_TIMEOUT * 2):
                await _guarded(trace, call, None, fn)

    async def _caller(self, es: Any, trace: _Trace, number: int, steps: Sequence[Step]) -> None:
        for step in steps:
            match step:
                case Execute():
                    await self._execute(es, trace, number, step)
                case Read():
                    await self._read(es, trace, number, step)
                case Pause(seconds):
                    await trio.sleep(seconds)
                case Burst(executes):
                    async with trio.open_nursery() as nursery:
                        for execute in executes:
                            nursery.start_soon(self._execute, es, trace, number, execute)
                case Disrupt():
                    if self.disrupt is not None:
                        try:
                            await self.disrupt()
                        except Exception as error:
                            trace.disrupt_errors.append(error)

    async def _execute(self, es: Any, trace: _Trace, caller: int, step: Execute) -> None:
        call = trace.new_call(caller, "execute", step.aggregate, step.command)
        metadata = ((COMMAND_ID_KEY, str(call.id)),)
        await _guarded(
            trace,
            call,
            step.cancel,
            lambda: es.execute(trace.ids[step.aggregate], step.command, metadata=metadata),
        )

    async def _read(self, es: Any, trace: _Trace, caller: int, step: Read) -> None:
        aggregate_id = trace.ids[step.aggregate]
        if step.what == "system_stats":
            call = trace.new_call(caller, step.what, None)
            await _guarded(trace, call, step.cancel, es.system_stats)
            return
        call = trace.new_call(caller, step.what, step.aggregate)
        method = getattr(es, step.what)
        await _guarded(trace, call, step.cancel, lambda: method(aggregate_id))

    async def _drain(
        self,
        es: Any,
        trace: _Trace,
        inner: EventStore[Any, Any, Any],
        queries: _Queries,
    ) -> None:
        """Let everything in flight finish, load each aggregate once more, let queries catch up.

        A load queues behind every message sent to its aggregate before it, so once it
        returns, every command of the program has been processed.
        """
        with trio.move_on_after(_HANG_SECONDS) as scope:
            for number in range(len(trace.ids)):
                load = functools.partial(es.load_aggregate, trace.ids[number])
                while True:
                    call = trace.new_call(-1, "load_aggregate", number)
                    call.final = True
                    await _guarded(trace, call, None, load)
                    if not isinstance(call.error, ActorTimeout):
                        break
        if scope.cancelled_caught:
            trace.drain_hung = True
            return
        heads = {a: len(await _stored(inner, a)) for a in trace.ids}
        # Wait while the queries make progress; give up after a quiet spell (a query
        # that will never see an event must not cost the whole catch-up time).
        with trio.move_on_after(_QUERY_CATCH_UP_SECONDS):
            while not queries.caught_up(heads):
                progress = queries.progress
                with trio.move_on_after(_QUERY_QUIET_SECONDS):
                    await progress.wait()
                if not progress.is_set():
                    break

    async def _read_store(
        self, program: Program, trace: _Trace, inner: EventStore[Any, Any, Any]
    ) -> None:
        if "projection" in trace.deliveries:
            source: Any = inner
            trace.checkpoint = (
                await source.checkpoint_position(_PROJECTION),
                await source.head_position(),
            )
        for aggregate_id in trace.ids:
            trace.streams[aggregate_id] = _seen(await _stored(inner, aggregate_id))
            async with inner.transaction() as tx:
                trace.snapshots[aggregate_id] = await inner.load_snapshot(tx, aggregate_id)


_T = TypeVar("_T")


#: Per run: how many tasks hold the clock now, and the autojump threshold to restore.
_holds: trio.lowlevel.RunVar[list[float]] = trio.lowlevel.RunVar("trio_es.testing.holds")


@contextlib.contextmanager
def _clock_held() -> Iterator[None]:
    """No autojump of the mock clock while any task is inside such a block; mock time
    runs at the real rate instead.

    So a slow thread call cannot make the clock leap past call timeouts, and a store
    that sleeps inside such a block (a projection lease waiting for a killed session's
    lock to go, a listener reconnecting) still wakes up, in real time, instead of
    waiting for a jump that never comes. Counted, since several tasks (a group
    commit's) may be in store calls at once: autojump comes back only when the last one
    leaves.
    """
    clock = trio.lowlevel.current_clock()
    if not isinstance(clock, trio.testing.MockClock):
        yield
        return
    try:
        holds = _holds.get()
    except LookupError:
        holds = [0, 0.0]
        _holds.set(holds)
    if holds[0] == 0:
        holds[1] = clock.autojump_threshold
        clock.autojump_threshold = math.inf
        clock.rate = 1.0
    holds[0] += 1
    try:
        yield
    finally:
        holds[0] -= 1
        if holds[0] == 0:
            clock.rate = 0.0
            clock.autojump_threshold = holds[1]


@asynccontextmanager
async def _held_while_entering_and_exiting(
    manager: AbstractAsyncContextManager[_T],
) -> AsyncIterator[_T]:
    """``manager`` (a store or a transaction, working in threads) with the clock held while
    it is entered and exited, not in between."""
    with _clock_held():
        value = await manager.__aenter__()
    try:
        yield value
    except BaseException as error:
        with _clock_held():
            suppressed = await manager.__aexit__(type(error), error, error.__traceback__)
        if not suppressed:
            raise
    else:
        with _clock_held():
            await manager.__aexit__(None, None, None)


@attrs.define(eq=False)
class _ClockHoldingStore:
    """A store that works in threads, with the mock clock's autojump off while it works.

    Autojump moves the clock whenever every task has been blocked for the threshold of
    real time; a task waiting for a worker thread counts as blocked, so a slow thread
    call (an fsync, a loaded machine) would let the clock leap past call timeouts and
    make the runtime look hung. Holding the clock during each store call keeps mock
    time for the runtime's own timers only. The transaction body is not held: a slow
    commit injected there sleeps on the mock clock.
    """

    inner: EventStore[Any, Any, Any]

    def transaction(self) -> AbstractAsyncContextManager[Any]:
        return _held_while_entering_and_exiting(self.inner.transaction())

    async def load_events(self, tx: Any, aggregate_id: str, start_from: int) -> Any:
        with _clock_held():
            return await self.inner.load_events(tx, aggregate_id, start_from)

    async def commit_events(
        self, tx: Any, aggregate: Aggregate[Any], events: Iterable[Any], metadata: Any
    ) -> Any:
        with _clock_held():
            return await self.inner.commit_events(tx, aggregate, events, metadata)

    async def load_snapshot(self, tx: Any, aggregate_id: str) -> Any:
        with _clock_held():
            return await self.inner.load_snapshot(tx, aggregate_id)

    async def load_snapshot_and_events(self, tx: Any, aggregate_id: str) -> Any:
        with _clock_held():
            return await load_snapshot_and_events(self.inner, tx, aggregate_id)

    async def save_snapshot(self, tx: Any, snapshot: Snapshot[Any]) -> None:
        with _clock_held():
            await self.inner.save_snapshot(tx, snapshot)

    async def read_all(self, after_position: int = 0, limit: int = 1000) -> Any:
        with _clock_held():
            return await self.inner.read_all(after_position, limit)  # type: ignore[attr-defined]

    async def head_position(self) -> int:
        with _clock_held():
            head: int = await self.inner.head_position()  # type: ignore[attr-defined]
            return head

    async def checkpoint_position(self, name: str) -> int:
        with _clock_held():
            position: int = await self.inner.checkpoint_position(name)  # type: ignore[attr-defined]
            return position

    def watch(self) -> AbstractAsyncContextManager[Any]:
        # Waiting is on Trio's clock (its poll interval): not held, only entering/exiting.
        return _held_while_entering_and_exiting(self.inner.watch())  # type: ignore[attr-defined]

    @contextlib.asynccontextmanager
    async def projection_lease(self, name: str) -> AsyncIterator[Any]:
        manager = self.inner.projection_lease(name)  # type: ignore[attr-defined]
        async with _held_while_entering_and_exiting(manager) as lease:
            yield _ClockHoldingLease(lease)


@attrs.define(eq=False)
class _ClockHoldingLease:
    """A store's projection lease, with the clock held during its (thread) calls."""

    inner: Any

    async def checkpoint(self) -> int:
        with _clock_held():
            position: int = await self.inner.checkpoint()
            return position

    async def advance(self, expected: int, position: int) -> None:
        with _clock_held():
            await self.inner.advance(expected, position)

    async def advance_with(self, expected: int, position: int, fn: Any, batch: Any) -> None:
        with _clock_held():
            await self.inner.advance_with(expected, position, fn, batch)

    async def reset(self, fn: Any = None) -> None:
        with _clock_held():
            await self.inner.reset(fn)


def _feeds_projections(store: object) -> bool:
    names = ("read_all", "head_position", "checkpoint_position", "watch", "projection_lease")
    return all(callable(getattr(store, name, None)) for name in names)


async def _stored(inner: EventStore[Any, Any, Any], aggregate_id: str) -> Sequence[Any]:
    async with inner.transaction() as tx:
        return await inner.load_events(tx, aggregate_id, 0)


async def _guarded(
    trace: _Trace,
    call: _Call,
    cancel: Cancel | None,
    fn: Callable[[], Awaitable[Any]],
) -> None:
    """Make the call, recording its start and end; give up on it as ``cancel`` says."""
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as scope:
            if cancel is not None:
                nursery.start_soon(_cancel_later, scope, cancel)
            trace.start(call)
            try:
                value = await fn()
            except Exception as error:
                trace.finish(call, error=error)
            else:
                trace.finish(call, value=value)
        if scope.cancelled_caught and call.completed is None:
            trace.finish(call, cancelled=True)
        nursery.cancel_scope.cancel()


async def _cancel_later(scope: trio.CancelScope, cancel: Cancel) -> None:
    await trio.sleep(cancel.seconds)
    for _ in range(cancel.checkpoints):
        await trio.lowlevel.checkpoint()
    scope.cancel()


def _async_handle(domain: Domain[Any, Any, Any]) -> Callable[[Any, Any], Awaitable[Any]]:
    decide = _sync_handle(domain)

    async def handle(entity: Any, command: Any) -> Any:
        if isinstance(command, Slow):
            await trio.sleep(command.seconds)
        return decide(entity, command)

    return handle


@attrs.define(eq=False)
class _Queries:
    """The three queries: a plain one, a flaky one (raises on planned deliveries), a slow one."""

    trace: _Trace
    program: Program
    flaky_count: int = 0
    slow_count: int = 0
    projection_count: int = 0
    #: Set (and replaced) at every delivery.
    progress: trio.Event = attrs.Factory(trio.Event)

    def queries(self) -> list[tuple[Any, Callable[..., Any]]]:
        for label in ("plain", "flaky", "slow"):
            self.trace.deliveries[label] = []
        return [
            (new_name("plain query"), self.plain),
            (new_name("flaky query"), self.flaky),
            (new_name("slow query"), self.slow),
        ]

    def _record(self, label: str, aggregate_id: str, envelopes: Any, ok: bool) -> None:
        self.trace.deliveries[label].append(_Delivery(aggregate_id, _seen(envelopes), ok))
        self.progress.set()
        self.progress = trio.Event()

    def plain(self, aggregate_id: str, envelopes: Sequence[Any]) -> None:
        self._record("plain", aggregate_id, envelopes, True)

    def flaky(self, aggregate_id: str, envelopes: Sequence[Any]) -> None:
        number = self.flaky_count
        self.flaky_count += 1
        if number in self.program.query_failures:
            self._record("flaky", aggregate_id, envelopes, False)
            raise PlannedQueryFailure(f"planted failure of the flaky query on delivery {number}")
        self._record("flaky", aggregate_id, envelopes, True)

    async def slow(self, aggregate_id: str, envelopes: Sequence[Any]) -> None:
        delays = self.program.query_delays
        number = self.slow_count
        self.slow_count += 1
        if delays:
            await trio.sleep(delays[number % len(delays)])
        self._record("slow", aggregate_id, envelopes, True)

    async def projection(self, batch: list[Any]) -> None:
        """The projection's handler: fails on the planned deliveries, like the flaky query."""
        number = self.projection_count
        self.projection_count += 1
        if number in self.program.query_failures:
            raise PlannedQueryFailure(f"planted failure of the projection on delivery {number}")
        ids = set(self.trace.ids)
        trace = self.trace
        deliveries = trace.deliveries.setdefault("projection", [])
        for envelope in batch:
            trace.projected.append(envelope.global_position)
            if envelope.aggregate_id in ids:
                deliveries.append(_Delivery(envelope.aggregate_id, _seen([envelope]), True))
        self.progress.set()
        self.progress = trio.Event()

    def caught_up(self, heads: dict[str, int]) -> bool:
        for deliveries in self.trace.deliveries.values():
            # Distinct events: a projection may get a batch again after a lost checkpoint
            # write, and a repeat must not count as progress.
            seen: dict[str, set[int]] = collections.defaultdict(set)
            for delivery in deliveries:
                if delivery.ok:
                    seen[delivery.aggregate_id].update(e.sequence for e in delivery.events)
            if any(len(seen[aggregate_id]) < head for aggregate_id, head in heads.items()):
                return False
        return True


# -- generation ------------------------------------------------------------------------

_CANCEL_SECONDS: Final = (0.0, 0.001, 0.01, 0.1, 0.5, 2.0)
_PAUSES: Final = (0.0, 0.0, 0.001, 0.1, 0.5, 1.5, 3.0)


def _programs(check: ModelCheck[Any, Any, Any]) -> st.SearchStrategy[Program]:
    @st.composite
    def program(draw: st.DrawFn) -> Program:
        aggregates = draw(st.integers(1, check.max_aggregates))
        snapshot_every = draw(st.sampled_from(check.snapshot_frequencies))
        capacity = draw(st.sampled_from(check.mailbox_capacities))
        aggregate = st.integers(0, aggregates - 1)
        cancel = st.builds(Cancel, st.sampled_from(_CANCEL_SECONDS), st.integers(0, 12))
        maybe_cancel = st.none() | cancel if check.cancellations else st.none()
        command = _command_strategy(check)
        execute = st.builds(Execute, aggregate, command, maybe_cancel)
        kinds = ["execute", "execute", "execute", "burst", "burst", "read", "read", "pause"]
        if check.disrupt is not None:
            kinds.append("disrupt")

        @st.composite
        def step(draw: st.DrawFn) -> Step:
            match draw(st.sampled_from(kinds)):
                case "execute":
                    return draw(execute)
                case "burst":
                    # One aggregate, so that the commands queue up and batch.
                    target = draw(aggregate)
                    one = st.builds(Execute, st.just(target), command, maybe_cancel)
                    return Burst(tuple(draw(st.lists(one, min_size=2, max_size=5))))
                case "read":
                    return draw(st.builds(Read, aggregate, st.sampled_from(READS), maybe_cancel))
                case "pause":
                    return Pause(draw(st.sampled_from(_PAUSES)))
            return Disrupt()

        callers = draw(
            st.lists(
                st.lists(step(), min_size=1, max_size=check.max_steps).map(tuple),
                min_size=1,
                max_size=check.max_callers,
            ).map(tuple)
        )
        faults: tuple[Fault | None, ...] = ()
        if check.faults:
            faults = tuple(draw(st.lists(st.none() | _fault_strategy(), max_size=check.max_faults)))
        failures: frozenset[int] = frozenset()
        delays: tuple[float, ...] = ()
        if check.failing_queries:
            failures = draw(st.frozensets(st.integers(0, 30), max_size=_MAX_QUERY_FAILURES))
            delays = tuple(draw(st.lists(st.sampled_from((0.0, 0.01, 0.2)), max_size=3)))
        return Program(aggregates, snapshot_every, capacity, callers, faults, failures, delays)

    return program()


def _fault_strategy() -> st.SearchStrategy[Fault]:
    return st.one_of(
        st.just(Fault.error_before_commit()),
        st.just(Fault.error_after_commit()),
        st.builds(Fault.lost_connection, committed=st.booleans()),
        st.just(Fault.conflict()),
        st.sampled_from((0.01, 0.3, 1.0)).map(Fault.slow_commit),
    )


def _command_strategy(check: ModelCheck[Any, Any, Any]) -> st.SearchStrategy[Any]:
    user = check.domain.commands
    kinds = ["plain"] * 6 + ["slow"] * 2
    if check.crashes:
        kinds += ["crash", "crash", "crash in apply"]
    if check.stalls:
        kinds.append("stall")

    @st.composite
    def command(draw: st.DrawFn) -> Any:
        match draw(st.sampled_from(kinds)):
            case "plain":
                return draw(user)
            case "slow":
                return Slow(draw(user), draw(st.sampled_from((0.01, 0.1, 0.5))))
            case "crash":
                return Crash()
            case "crash in apply":
                return CrashInApply()
        return Slow(draw(user), STALL_SECONDS)

    return command()


# -- checking --------------------------------------------------------------------------


@attrs.define(eq=False)
class _Run:
    """One command's events in a stored stream."""

    command: int
    first: int
    last: int
    events: list[_Seen]


@attrs.define(eq=False)
class _Stream:
    """One aggregate's stored stream, cut into commands, with the state after each event."""

    aggregate: int
    events: tuple[_Seen, ...]
    runs: list[_Run]
    #: states[k]: the replay of the first k events (_UNREPLAYABLE past an event that
    #: apply refused).
    states: list[Any]
    #: Sequences at which a command's events end (0 included).
    boundaries: set[int]
    #: Each stored command id -> its last sequence.
    ends: dict[int, int]


#: Stands for a state that cannot be replayed (``apply`` raised on a stored event).
_UNREPLAYABLE: Final = object()


class _Checker:
    """Checks one run's trace against the model; collects every violation, then raises."""

    def __init__(self, check: ModelCheck[Any, Any, Any], program: Program, trace: _Trace) -> None:
        self.check_ = check
        self.program = program
        self.trace = trace
        self.model: ReferenceModel[Any, Any, Any] = ReferenceModel(
            handle=_sync_handle(check.domain),
            apply=_apply(check.domain),
            empty_state=check.domain.empty_state,
            snapshot_every=program.snapshot_every,
        )
        self.violations: list[Violation] = []
        self.calls = {call.id: call for call in trace.calls}
        executes = [c for c in trace.calls if c.op == "execute"]
        self.executes = executes
        self.kinds = _kinds(program)
        self.streams: dict[int, _Stream] = {}

    def fail(self, invariant: str, detail: str) -> None:
        self.violations.append(Violation(invariant, detail))

    def check(self) -> None:
        trace = self.trace
        if trace.system_error is not None:
            self.fail(
                "system", f"the system stopped with an error: {_describe(trace.system_error)}"
            )
        if trace.hung:
            pending = [
                c for c in trace.calls if c.completed is None and not (c.final or c.after_stop)
            ]
            self.fail(
                "liveness",
                f"the program did not finish in {_HANG_SECONDS:.0f} s; calls still waiting: "
                + "; ".join(c.describe(trace.name) for c in pending[:5]),
            )
        if trace.drain_hung:
            self.fail("liveness", "draining the system (loads after the program) hung")
        for error in trace.disrupt_errors:
            self.fail("harness", f"the disrupt hook raised {_describe(error)}")
        for number, aggregate_id in enumerate(trace.ids):
            if aggregate_id in trace.streams:
                self.streams[number] = self._stream(number, trace.streams[aggregate_id])
        if len(self.streams) == len(trace.ids):
            self._check_replies()
            self._check_reads()
            self._check_snapshots()
            self._check_queries()
        self._check_stopped()
        self._check_timing()
        if self.violations:
            raise ModelCheckFailure(self.violations, self._transcript())

    # -- the stored streams --

    def _stream(self, number: int, events: tuple[_Seen, ...]) -> _Stream:
        name = self.trace.name(number)
        runs: list[_Run] = []
        for expected, seen in enumerate(events, start=1):
            if seen.sequence != expected:
                self.fail(
                    "store", f"{name}: stored sequence {seen.sequence} where {expected} belongs"
                )
            if runs and runs[-1].command == seen.command:
                runs[-1].events.append(seen)
                runs[-1].last = seen.sequence
            else:
                runs.append(
                    _Run(
                        seen.command if seen.command is not None else -1,
                        seen.sequence,
                        seen.sequence,
                        [seen],
                    )
                )
        ends: dict[int, int] = {}
        tiles: set[int] = set()
        previous: _Call | None = None
        state = self.model.empty_state
        states: list[Any] = [state]
        for run in runs:
            call = self.calls.get(run.command)
            span = f"{name} events {run.first}-{run.last}"
            if call is None or call.op != "execute" or call.aggregate != number:
                self.fail(
                    "stored once", f"{span} belong to no command sent to {name} (#{run.command})"
                )
            elif run.command in ends:
                self.fail(
                    "stored once",
                    f"command #{run.command} {call.command!r} is stored twice: {name} events "
                    f"ending at {ends[run.command]} and {span}",
                )
            else:
                if previous is not None and call.invoked < previous.invoked:
                    self.fail(
                        "fifo",
                        f"{name}: command #{call.id} is stored after #{previous.id} (at "
                        f"{run.first}-{run.last}), though it was sent before it",
                    )
                previous = call
            if call is not None and call.op == "execute":
                decision = self.model.decide(state, call.command)
                payloads = tuple(seen.payload for seen in run.events)
                if (
                    isinstance(decision, Accepted)
                    and decision.events
                    and len(payloads) > len(decision.events)
                    and payloads == decision.events * (len(payloads) // len(decision.events))
                ):
                    # Stored again right after itself: the same run holds it twice.
                    tile = len(decision.events)
                    tiles.update(range(run.first - 1 + tile, run.last, tile))
                    self.fail(
                        "stored once",
                        f"command #{run.command} {call.command!r} is stored "
                        f"{len(payloads) // len(decision.events)} times in a row: {span}",
                    )
                elif not isinstance(decision, Accepted) or decision.events != payloads:
                    self.fail(
                        "model",
                        f"{span} of command #{run.command} {call.command!r} are "
                        f"{list(payloads)!r}; the model says {_decision(decision)} on "
                        f"{state!r}",
                    )
            ends.setdefault(run.command, run.last)
            for seen in run.events:
                states.append(self._apply_stored(name, states[-1], seen))
            state = states[-1]
        boundaries = {0, *tiles, *(run.last for run in runs)}
        return _Stream(number, events, runs, states, boundaries, ends)

    def _apply_stored(self, name: str, state: Any, seen: _Seen) -> Any:
        if state is _UNREPLAYABLE:
            return _UNREPLAYABLE
        try:
            return self.model.apply(state, seen.payload)
        except Exception as error:
            self.fail("model", f"{name}: apply raised {_describe(error)} on stored event {seen}")
            return _UNREPLAYABLE

    # -- replies --

    def _state_at(self, stream: _Stream, call: _Call) -> tuple[Any, int]:
        """The state ``call`` must have been decided on, assuming FIFO: every stored
        command sent before it, none sent after it."""
        sequence = 0
        for run in stream.runs:
            other = self.calls.get(run.command)
            if other is None or other.invoked >= call.invoked:
                break
            sequence = run.last
        return stream.states[sequence], sequence

    def _check_result(self, call: _Call, stream: _Stream, before: int, where: str) -> None:
        """``execute`` returned the sequence and global position of what it stored."""
        end = stream.ends.get(call.id)
        expected = ExecuteResult(
            self.trace.ids[stream.aggregate],
            before if end is None else end,
            None if end is None else stream.events[end - 1].global_position,
        )
        if call.value != expected:
            self.fail(
                "stored once", f"{where} returned {call.value!r}; the store says {expected!r}"
            )

    def _check_replies(self) -> None:
        for call in self.executes:
            assert call.aggregate is not None
            stream = self.streams[call.aggregate]
            stored = call.id in stream.ends
            where = f"#{call.id} {call.command!r} on {self.trace.name(call.aggregate)}"
            error = call.error
            if call.after_stop:
                if stored:
                    self.fail("stopped", f"{where}, made after the stop, is stored")
                continue
            if call.completed is None or call.cancelled:
                continue
            if isinstance(error, ActorTimeout):
                if call.aggregate not in self.kinds.stalled:
                    self.fail(
                        "liveness",
                        f"{where} got {describe_error(error)} though nothing in the program "
                        "stalls that aggregate (a lost reply?)",
                    )
                continue
            if isinstance(error, CommitOutcomeUnknown):
                if not (self.kinds.unknown or self.check_.disrupt):
                    self.fail(
                        "expected errors",
                        f"{where} got {_describe(error)}; no fault could cause it",
                    )
                continue
            state, before = self._state_at(stream, call)
            decision = None if state is _UNREPLAYABLE else self.model.decide(state, call.command)
            if error is None:
                if isinstance(decision, Accepted):
                    if decision.events and not stored:
                        self.fail("stored once", f"{where} was acknowledged but is not stored")
                    else:
                        self._check_result(call, stream, before, where)
                elif decision is not None:
                    self.fail(
                        "model",
                        f"{where} was acknowledged; the model says {_decision(decision)} "
                        f"on {state!r}",
                    )
                continue
            if stored:
                self.fail(
                    "nothing stored on failure",
                    f"{where} got {_describe(error)} but is stored at "
                    f"{self.trace.name(call.aggregate)} ..{stream.ends[call.id]}",
                )
            if isinstance(decision, Crashed) and type(error) is type(decision.error):
                continue  # the domain crashes on it, and the caller was told so
            if isinstance(error, DomainError):
                if decision is not None and not (
                    isinstance(decision, Rejected) and _same_rejection(decision.error, error)
                ):
                    self.fail(
                        "model",
                        f"{where} was rejected with {_describe(error)}; the model says "
                        f"{_decision(decision)} on {state!r}",
                    )
            elif isinstance(error, PlannedCrash):
                if not isinstance(call.command, Crash | CrashInApply):
                    self.fail(
                        "expected errors",
                        f"{where} got another command's crash: {_describe(error)}",
                    )
            elif isinstance(error, AggregateCrashed):
                # Only bugs are crashes: a store's errors must not stop an aggregate.
                if call.aggregate not in self.kinds.crashing:
                    self.fail(
                        "expected errors", f"{where} got {_describe(error)}; nothing crashes it"
                    )
            elif isinstance(error, TransactionFailed):
                if not (self.kinds.conflicts or self.check_.disrupt):
                    self.fail(
                        "expected errors",
                        f"{where} got {_describe(error)}; no fault could cause it",
                    )
            elif isinstance(error, EventStoreError):
                if not (self.kinds.store_errors or self.check_.disrupt):
                    self.fail(
                        "expected errors",
                        f"{where} got {_describe(error)}; no fault could cause it",
                    )
            else:
                self.fail("expected errors", f"{where} got an unexpected {_describe(error)}")

    # -- reads --

    def _acknowledged_before(self, aggregate: int, call: _Call) -> int:
        """The highest sequence of the commands acknowledged before ``call`` began."""
        stream = self.streams[aggregate]
        highest = 0
        for other in self.executes:
            if (
                other.aggregate == aggregate
                and other.ok
                and other.completed is not None
                and other.completed < call.invoked
            ):
                highest = max(highest, stream.ends.get(other.id, 0))
        return highest

    def _check_reads(self) -> None:
        n = self.program.snapshot_every
        for call in self.trace.calls:
            if call.op == "execute" or call.completed is None or call.cancelled:
                continue
            if call.after_stop:
                continue
            name = self.trace.name(call.aggregate)
            where = f"#{call.id} {call.op} {name}"
            if call.op == "system_stats":
                self._check_system_stats(call, where)
                continue
            assert call.aggregate is not None
            stream = self.streams[call.aggregate]
            head = len(stream.events)
            floor = self._acknowledged_before(call.aggregate, call)
            if call.final:
                floor = head
            error = call.error
            if error is not None:
                if isinstance(error, ActorTimeout) and call.aggregate in self.kinds.stalled:
                    continue
                if isinstance(error, EntityNotFound) and call.op == "load_aggregate":
                    if floor > 0:
                        self.fail(
                            "reads",
                            f"{where} raised EntityNotFound after commands up to sequence "
                            f"{floor} were acknowledged",
                        )
                    continue
                if isinstance(error, AggregateCrashed) and call.aggregate in self.kinds.crashing:
                    continue
                if isinstance(error, _STORE_ERRORS) and self.check_.disrupt is not None:
                    continue
                invariant = "liveness" if isinstance(error, ActorTimeout) else "expected errors"
                self.fail(invariant, f"{where} raised {_describe(error)}")
                continue
            value = call.value
            sequence: int | None = None
            match call.op:
                case "load_aggregate":
                    if not isinstance(value, Aggregate):
                        self.fail("reads", f"{where} returned {value!r}")
                        continue
                    sequence = value.sequence
                    if value.aggregate_id != self.trace.ids[call.aggregate]:
                        self.fail("reads", f"{where} returned aggregate {value.aggregate_id!r}")
                    if sequence <= head and value.entity != stream.states[sequence]:
                        self.fail(
                            "cache" if call.final else "reads",
                            f"{where} returned {value.entity!r} at sequence {sequence}; the "
                            f"replay of the stored events is {stream.states[sequence]!r}",
                        )
                case "load_events":
                    got = _seen(value)
                    sequence = len(got)
                    if got != stream.events[:sequence]:
                        self.fail(
                            "reads",
                            f"{where} returned {_events(got)}; the store holds "
                            f"{_events(stream.events)}",
                        )
                case "aggregate_stats":
                    if not isinstance(value, AggregateStats):
                        self.fail("reads", f"{where} returned {value!r}")
                        continue
                    sequence = value.current_sequence
                    if value.event_count != sequence:
                        self.fail("reads", f"{where} returned {value!r}: count != sequence")
                    expected = n is not None and sequence >= n
                    if value.has_snapshot != expected:
                        self.fail(
                            "reads",
                            f"{where} says has_snapshot={value.has_snapshot} at sequence "
                            f"{sequence} with snapshot frequency {n}",
                        )
                case "latest_snapshot":
                    self._check_snapshot(where, stream, value, floor, "reads")
                    continue
            if sequence is None:
                continue
            if sequence > head or sequence not in stream.boundaries:
                self.fail(
                    "reads",
                    f"{where} answered at sequence {sequence}, which is not the end of a "
                    f"stored command (stored: {_events(stream.events)})",
                )
            elif sequence < floor:
                self.fail(
                    "cache" if call.final else "reads",
                    f"{where} answered at sequence {sequence}, but commands up to {floor} "
                    "were acknowledged before it was called (stale read)",
                )

    def _check_system_stats(self, call: _Call, where: str) -> None:
        error = call.error
        if error is not None:
            if isinstance(error, _STORE_ERRORS) and self.check_.disrupt is not None:
                return
            invariant = "liveness" if isinstance(error, ActorTimeout) else "expected errors"
            self.fail(invariant, f"{where} raised {_describe(error)}")
            return
        value = call.value
        if not isinstance(value, SystemStats):
            self.fail("reads", f"{where} returned {value!r}")
            return
        if value.query_actors_count != 3:
            self.fail("reads", f"{where} counts {value.query_actors_count} queries; there are 3")
        done = sum(
            1
            for c in self.executes
            if c.completed is not None
            and c.completed < call.invoked
            and not c.cancelled
            and (c.error is None or isinstance(c.error, DomainError))
        )
        sent = sum(1 for c in self.executes if c.invoked < (call.completed or 0))
        if not done <= value.total_commands_processed <= sent:
            self.fail(
                "reads",
                f"{where} counts {value.total_commands_processed} commands processed; "
                f"{done} were answered before it was called and {sent} sent before it returned",
            )

    # -- snapshots --

    def _check_snapshot(
        self, where: str, stream: _Stream, snapshot: Any, floor: int, invariant: str
    ) -> None:
        n = self.program.snapshot_every
        if snapshot is None:
            if n is not None and floor >= n:
                self.fail(
                    invariant,
                    f"{where}: no snapshot, though commands up to sequence {floor} were "
                    f"stored with snapshot frequency {n}",
                )
            return
        if not isinstance(snapshot, Snapshot):
            self.fail(invariant, f"{where}: not a snapshot: {snapshot!r}")
            return
        s = snapshot.sequence
        head = len(stream.events)
        if n is None:
            self.fail(invariant, f"{where}: a snapshot at {s} though snapshots are off")
            return
        low = n * (floor // n)
        if floor < n:
            low = n
        if not low <= s <= head or s not in stream.boundaries:
            self.fail(
                invariant,
                f"{where}: snapshot at sequence {s}; with frequency {n} and {floor} events it "
                f"must be in {low}..{head} and end a stored command "
                f"(stored: {_events(stream.events)})",
            )
            return
        if snapshot.entity != stream.states[s]:
            self.fail(
                invariant,
                f"{where}: the snapshot at {s} holds {snapshot.entity!r}; the replay up to "
                f"{s} is {stream.states[s]!r}",
            )

    def _check_snapshots(self) -> None:
        for number, stream in self.streams.items():
            snapshot = self.trace.snapshots.get(self.trace.ids[number])
            head = len(stream.events)
            where = f"stored snapshot of {self.trace.name(number)}"
            self._check_snapshot(where, stream, snapshot, head, "snapshots")

    # -- queries --

    def _check_queries(self) -> None:
        by_id = {self.trace.ids[n]: stream for n, stream in self.streams.items()}
        # Connection kills may lose a checkpoint write after its batch was handled: the
        # projection then gets that batch again (at least once). Nothing else may repeat.
        again = self.check_.disrupt is not None
        self._check_projection(again)
        for label, deliveries in self.trace.deliveries.items():
            seen: dict[str, list[_Seen]] = {aggregate_id: [] for aggregate_id in by_id}
            for delivery in deliveries:
                if delivery.ok:
                    events = seen.setdefault(delivery.aggregate_id, [])
                    for event in delivery.events:
                        if label == "projection" and again and event in events:
                            continue
                        events.append(event)
            for aggregate_id, got in seen.items():
                stream = by_id.get(aggregate_id)
                stored = () if stream is None else stream.events
                if tuple(got) != stored:
                    name = aggregate_id if stream is None else self.trace.name(stream.aggregate)
                    places = ""
                    if _events(got) == _events(stored):  # the same events, other positions
                        places = (
                            f" (global positions {[e.global_position for e in got]} against "
                            f"{[e.global_position for e in stored]})"
                        )
                    self.fail(
                        "queries",
                        f"the {label} query saw {name} events {_events(got)}; the store "
                        f"holds {_events(stored)}{places}",
                    )

    def _check_projection(self, again: bool) -> None:
        """The projection saw positions in increasing order, and checkpointed the head."""
        trace = self.trace
        projected = trace.projected
        if again:
            projected = list(dict.fromkeys(projected))
        if any(b <= a for a, b in itertools.pairwise(projected)):
            self.fail(
                "queries",
                f"the projection was handed global positions out of order or twice: {projected}",
            )
        if trace.checkpoint is not None and not (trace.hung or trace.drain_hung):
            checkpoint, head = trace.checkpoint
            # A killed connection may fail the checkpoint write after a handled batch: that
            # batch is delivered again on the next start (at least once), so the stored
            # checkpoint may lag then, never lead.
            if checkpoint > head or (checkpoint != head and not again):
                self.fail(
                    "queries",
                    f"after a clean stop the projection's checkpoint is {checkpoint}; the "
                    f"store's head is {head}",
                )

    # -- after the stop --

    def _check_stopped(self) -> None:
        for call in self.trace.calls:
            if not call.after_stop:
                continue
            where = call.describe(self.trace.name)
            if call.completed is None:
                self.fail("stopped", f"{where}: a call after the stop hung")
            elif not isinstance(call.error, SystemStopped):
                self.fail("stopped", f"{where}: a call after the stop must raise SystemStopped")
            elif call.ended is not None and call.ended - call.started > _SLACK:
                self.fail("stopped", f"{where}: SystemStopped must come at once")

    # -- timing --

    def _check_timing(self) -> None:
        for call in self.trace.calls:
            if call.ended is None:
                continue
            took = call.ended - call.started
            if took > _CALL_TIMEOUT + _DEADLINE_SLACK:
                self.fail(
                    "call_timeout",
                    f"{call.describe(self.trace.name)} took {took:.3f} s; call_timeout is "
                    f"{_CALL_TIMEOUT:.0f} s",
                )

    # -- the report --

    def _transcript(self) -> str:
        trace = self.trace
        lines = [call.describe(trace.name) for call in trace.calls]
        for fault in trace.injected:
            names = ", ".join(self._names(fault.aggregate_ids))
            lines.append(f"injected {fault.fault!r} into write {fault.write} ({names})")
        for number, aggregate_id in enumerate(trace.ids):
            events = trace.streams.get(aggregate_id)
            if events is not None:
                lines.append(f"stored {trace.name(number)}: {_events(events)}")
            snapshot = trace.snapshots.get(aggregate_id)
            if snapshot is not None:
                lines.append(f"stored snapshot {trace.name(number)}: {_short(snapshot)}")
        for label, deliveries in trace.deliveries.items():
            shown = [
                f"{self._names([d.aggregate_id])[0]}:{_events(d.events)}"
                + ("" if d.ok else "(raised)")
                for d in deliveries
            ]
            lines.append(f"{label} query saw: {' '.join(shown) or 'nothing'}")
        if len(lines) > _TRANSCRIPT_LINES:
            lines = [*lines[:_TRANSCRIPT_LINES], f"... {len(lines) - _TRANSCRIPT_LINES} more lines"]
        return textwrap.indent("\n".join(lines), "  ")

    def _names(self, aggregate_ids: Iterable[str]) -> list[str]:
        index = {aggregate_id: n for n, aggregate_id in enumerate(self.trace.ids)}
        return [self.trace.name(index[a]) if a in index else repr(a) for a in aggregate_ids]


#: What a store disruption (a killed connection) may make a call raise.
_STORE_ERRORS: Final = (EventStoreError, TransactionFailed)


@attrs.frozen
class _Kinds:
    """What a program can cause, for deciding which errors are expected."""

    stalled: frozenset[int]
    crashing: frozenset[int]
    store_errors: bool
    unknown: bool
    conflicts: bool


def _kinds(program: Program) -> _Kinds:
    stalled = {
        e.aggregate
        for e in program.executes()
        if isinstance(e.command, Slow) and e.command.seconds >= _CALL_TIMEOUT
    }
    crashing = {
        e.aggregate for e in program.executes() if isinstance(e.command, Crash | CrashInApply)
    }
    kinds = {f.kind for f in program.faults if f is not None}
    return _Kinds(
        stalled=frozenset(stalled),
        crashing=frozenset(crashing),
        store_errors=bool(
            kinds
            & {
                FaultKind.ERROR_BEFORE_COMMIT,
                FaultKind.ERROR_AFTER_COMMIT,
                FaultKind.LOST_CONNECTION,
            }
        ),
        unknown=bool(kinds & {FaultKind.ERROR_AFTER_COMMIT, FaultKind.LOST_CONNECTION}),
        conflicts=FaultKind.CONFLICT in kinds,
    )


def _same_rejection(expected: DomainError, got: DomainError) -> bool:
    if type(expected) is not type(got):
        return False
    if expected.error is expected or got.error is got:
        return str(expected) == str(got)
    return bool(expected.error == got.error)


def _decision(decision: Decision | None) -> str:
    match decision:
        case Accepted(events, _):
            return f"accepted with events {list(events)!r}"
        case Rejected(error):
            return f"rejected ({_describe(error)})"
        case Crashed(error):
            return f"crash ({_describe(error)})"
    return "unknown (the state could not be replayed)"


def _events(events: Iterable[_Seen]) -> str:
    shown = " ".join(str(seen) for seen in events)
    return f"[{shown}]"


def _describe(error: BaseException) -> str:
    if isinstance(error, BaseExceptionGroup):
        inner = ", ".join(_describe(e) for e in error.exceptions)
        return f"{type(error).__name__}({inner})"
    text = f"{type(error).__name__}: {describe_error(error)}"
    if error.__cause__ is not None:
        text += f" (caused by {_describe(error.__cause__)})"
    return text


def check_runtime(
    *,
    handle: Callable[[EntityT, CommandT], Iterable[EventT]],
    apply: Callable[[EntityT, EventT], EntityT],
    empty_state: EntityT,
    commands: st.SearchStrategy[CommandT],
    store_factory: StoreFactory | None = None,
    settings: hypothesis.settings | None = None,
    **options: Any,
) -> None:
    """Check the runtime with your domain: generated concurrent programs against the model.

    Args:
        handle: your ``handle``, as a plain function (the reference model runs it).
        apply: your ``apply``.
        empty_state: your entity before its first event.
        commands: a Hypothesis strategy of your commands.
        store_factory: an async context manager factory yielding an open store (default:
            a new ``MemoryStore`` per example). A serializing store needs your events and
            entity registered in its transcoder.
        settings: Hypothesis settings (default: the loaded profile's).
        **options: any other :class:`ModelCheck` attribute (``faults=False``, ...).

    Raises:
        ModelCheckFailure: for the shrunk program on which the runtime broke a promise.
    """
    domain = Domain(handle=handle, apply=apply, empty_state=empty_state, commands=commands)
    if store_factory is not None:
        options["store_factory"] = store_factory
    ModelCheck(domain=domain, **options).check(settings)

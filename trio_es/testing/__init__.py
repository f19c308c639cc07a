"""Testing tools for trio_es and for applications built on it.

* :class:`Scenario`: given/when/then tests of a domain's ``handle`` and ``apply``,
  synchronous, without Trio.
* :func:`open_test_system`: a whole system on a fresh memory store, for integration
  tests, without fixtures.
* :class:`EventStoreConformance`: the store tests every :class:`~trio_es.EventStore`
  must pass; subclass it to run them against your own store (needs pytest).
  :class:`ProjectionSourceConformance` does the same for what subscriptions and
  projections need (positions, watches, leases, checkpoints).
* :func:`check_runtime` and :class:`ModelCheck`: the stateful model check, which runs
  Hypothesis-generated concurrent programs (with crashes, cancellations and store
  faults) against the real runtime and checks every reply, stored event, read and
  query delivery against the sequential :class:`ReferenceModel` (needs Hypothesis).
* :class:`FaultInjectingStore`: wraps a real store and fails the commits a plan says.

pytest and Hypothesis are optional: the names that need them are imported on first
use, so ``import trio_es.testing``, :class:`Scenario` and :func:`open_test_system`
work without either installed.

See docs/testing.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Final

from .. import _claim_public_names
from ._faults import Fault as Fault
from ._faults import FaultInjectingStore as FaultInjectingStore
from ._faults import FaultKind as FaultKind
from ._faults import FaultTransaction as FaultTransaction
from ._faults import InjectedFault as InjectedFault
from ._given import Given as Given
from ._given import Scenario as Scenario
from ._given import When as When
from ._harness import SystemUnderTest as SystemUnderTest
from ._harness import open_test_system as open_test_system
from ._model import Accepted as Accepted
from ._model import Crashed as Crashed
from ._model import Decision as Decision
from ._model import ModelStep as ModelStep
from ._model import ReferenceModel as ReferenceModel
from ._model import Rejected as Rejected

# Names that need no test library: their reprs and tracebacks say trio_es.testing, as the
# package's own names say trio_es (the lazily loaded ones are claimed when loaded).
_EAGER: Final = [
    "Accepted",
    "Crashed",
    "Decision",
    "Fault",
    "FaultInjectingStore",
    "FaultKind",
    "FaultTransaction",
    "Given",
    "InjectedFault",
    "ModelStep",
    "ReferenceModel",
    "Rejected",
    "Scenario",
    "SystemUnderTest",
    "When",
    "open_test_system",
]
_claim_public_names(globals(), _EAGER, __name__)

if TYPE_CHECKING:
    from ._conformance import ODD_IDS as ODD_IDS
    from ._conformance import ODD_METADATA as ODD_METADATA
    from ._conformance import Added as Added
    from ._conformance import Counter as Counter
    from ._conformance import EventStoreConformance as EventStoreConformance
    from ._conformance import ProjectionSourceConformance as ProjectionSourceConformance
    from ._conformance import Renamed as Renamed
    from ._conformance import Tagged as Tagged
    from ._conformance import Unregistered as Unregistered
    from ._conformance import conformance_transcoder as conformance_transcoder
    from ._machine import CALL_TIMEOUT_MS as CALL_TIMEOUT_MS
    from ._machine import COMMAND_ID_KEY as COMMAND_ID_KEY
    from ._machine import IDLE_TIMEOUT as IDLE_TIMEOUT
    from ._machine import INVARIANTS as INVARIANTS
    from ._machine import LEDGER as LEDGER
    from ._machine import READS as READS
    from ._machine import STALL_SECONDS as STALL_SECONDS
    from ._machine import Burst as Burst
    from ._machine import Cancel as Cancel
    from ._machine import Crash as Crash
    from ._machine import CrashInApply as CrashInApply
    from ._machine import Deposit as Deposit
    from ._machine import Deposited as Deposited
    from ._machine import Disrupt as Disrupt
    from ._machine import Domain as Domain
    from ._machine import Execute as Execute
    from ._machine import InsufficientFunds as InsufficientFunds
    from ._machine import Ledger as Ledger
    from ._machine import ModelCheck as ModelCheck
    from ._machine import ModelCheckFailure as ModelCheckFailure
    from ._machine import Pause as Pause
    from ._machine import PlannedCrash as PlannedCrash
    from ._machine import PlannedQueryFailure as PlannedQueryFailure
    from ._machine import Program as Program
    from ._machine import Read as Read
    from ._machine import Slow as Slow
    from ._machine import StoreFactory as StoreFactory
    from ._machine import Violation as Violation
    from ._machine import Withdraw as Withdraw
    from ._machine import Withdrawn as Withdrawn
    from ._machine import check_runtime as check_runtime
    from ._machine import ledger_transcoder as ledger_transcoder

# Loaded on first access (PEP 562): these modules import pytest or Hypothesis at the top,
# which an application's tests of its domain should not need.
_NEEDS: Final = {"_conformance": "pytest", "_machine": "Hypothesis"}
_LAZY: Final[dict[str, str]] = {
    "ODD_IDS": "_conformance",
    "ODD_METADATA": "_conformance",
    "Added": "_conformance",
    "Counter": "_conformance",
    "EventStoreConformance": "_conformance",
    "ProjectionSourceConformance": "_conformance",
    "Renamed": "_conformance",
    "Tagged": "_conformance",
    "Unregistered": "_conformance",
    "conformance_transcoder": "_conformance",
    "CALL_TIMEOUT_MS": "_machine",
    "COMMAND_ID_KEY": "_machine",
    "IDLE_TIMEOUT": "_machine",
    "INVARIANTS": "_machine",
    "LEDGER": "_machine",
    "READS": "_machine",
    "STALL_SECONDS": "_machine",
    "Burst": "_machine",
    "Cancel": "_machine",
    "Crash": "_machine",
    "CrashInApply": "_machine",
    "Deposit": "_machine",
    "Deposited": "_machine",
    "Disrupt": "_machine",
    "Domain": "_machine",
    "Execute": "_machine",
    "InsufficientFunds": "_machine",
    "Ledger": "_machine",
    "ModelCheck": "_machine",
    "ModelCheckFailure": "_machine",
    "Pause": "_machine",
    "PlannedCrash": "_machine",
    "PlannedQueryFailure": "_machine",
    "Program": "_machine",
    "Read": "_machine",
    "Slow": "_machine",
    "StoreFactory": "_machine",
    "Violation": "_machine",
    "Withdraw": "_machine",
    "Withdrawn": "_machine",
    "check_runtime": "_machine",
    "ledger_transcoder": "_machine",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
    except ImportError as error:
        # Only a missing test library gets the install hint; another missing module
        # (a broken install) is reported as itself.
        missing = (error.name or "").partition(".")[0]
        if missing and missing not in ("pytest", "_pytest", "hypothesis"):
            raise
        raise ImportError(
            f"trio_es.testing.{name} needs {_NEEDS[module_name]}, which could not be "
            f"imported ({error}); install it with: pip install 'trio_es[testing]'"
        ) from error
    # Claim the whole module's public names at once, and cache them, so the next access
    # is a plain attribute lookup.
    names = [other for other, source in _LAZY.items() if source == module_name]
    namespace = {other: getattr(module, other) for other in names}
    _claim_public_names(namespace, names, __name__)
    globals().update(namespace)
    return namespace[name]


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = sorted([*_EAGER, *_LAZY])

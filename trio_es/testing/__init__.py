"""Testing tools for trio_es and for applications built on it.

* :class:`EventStoreConformance`: the store tests every :class:`~trio_es.EventStore`
  must pass; subclass it to run them against your own store (needs pytest).
* :func:`check_runtime` and :class:`ModelCheck`: the stateful model check, which runs
  Hypothesis-generated concurrent programs (with crashes, cancellations and store
  faults) against the real runtime and checks every reply, stored event, read and
  query delivery against the sequential :class:`ReferenceModel` (needs Hypothesis).
* :class:`FaultInjectingStore`: wraps a real store and fails the commits a plan says.

See docs/testing.md.
"""

from ._conformance import ODD_IDS as ODD_IDS
from ._conformance import ODD_METADATA as ODD_METADATA
from ._conformance import Added as Added
from ._conformance import Counter as Counter
from ._conformance import EventStoreConformance as EventStoreConformance
from ._conformance import Renamed as Renamed
from ._conformance import Tagged as Tagged
from ._conformance import Unregistered as Unregistered
from ._conformance import conformance_transcoder as conformance_transcoder
from ._faults import Fault as Fault
from ._faults import FaultInjectingStore as FaultInjectingStore
from ._faults import FaultKind as FaultKind
from ._faults import FaultTransaction as FaultTransaction
from ._faults import InjectedFault as InjectedFault
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
from ._model import Accepted as Accepted
from ._model import Crashed as Crashed
from ._model import Decision as Decision
from ._model import ModelStep as ModelStep
from ._model import ReferenceModel as ReferenceModel
from ._model import Rejected as Rejected

"""Testing tools for trio_es and for applications built on it.

* :class:`EventStoreConformance`: the store tests every :class:`~trio_es.EventStore`
  must pass; subclass it to run them against your own store (needs pytest).
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

"""The in-memory event store: ``MemoryStore()`` or the Gleam package's supervised actors."""

from . import _claim_public_names
from ._memory_store import MemoryStore as MemoryStore
from ._memory_store import MemoryTransaction as MemoryTransaction
from ._memory_store import SupervisedMemoryStore as SupervisedMemoryStore
from ._memory_store import supervised as supervised

__all__ = ["MemoryStore", "MemoryTransaction", "SupervisedMemoryStore", "supervised"]

_claim_public_names(globals(), __all__, __name__)

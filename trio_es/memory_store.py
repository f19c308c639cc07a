"""The in-memory event store: ``MemoryStore()`` or the seed's supervised actors."""

from ._memory_store import MemoryStore as MemoryStore
from ._memory_store import MemoryTransaction as MemoryTransaction
from ._memory_store import SupervisedMemoryStore as SupervisedMemoryStore
from ._memory_store import supervised as supervised

__all__ = ["MemoryStore", "MemoryTransaction", "SupervisedMemoryStore", "supervised"]

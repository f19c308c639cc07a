"""The store conformance suite run against the in-memory store."""

from __future__ import annotations

from typing import Any

import pytest

from trio_es.memory_store import MemoryStore
from trio_es.testing import EventStoreConformance


class TestMemoryStoreConformance(EventStoreConformance):
    """MemoryStore passes the shared store suite (it keeps objects, so no serialization)."""

    supports_serialization = False

    @pytest.fixture
    async def store(self) -> MemoryStore[Any, Any]:
        """A fresh, empty memory store."""
        return MemoryStore()

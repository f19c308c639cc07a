"""The SQLite event store: ``async with SqliteStore.open(path, transcoder=...) as store``.

Durable (WAL, ``synchronous=FULL``), embedded, and safe for several processes sharing one
file. Events and snapshot entities are stored as JSON through a
:class:`~trio_es.serialization.Transcoder`.
"""

from . import _claim_public_names
from ._sql import StoredEvent as StoredEvent
from ._sqlite_store import SqliteStore as SqliteStore
from ._sqlite_store import SqliteTransaction as SqliteTransaction

__all__ = ["SqliteStore", "SqliteTransaction", "StoredEvent"]

_claim_public_names(globals(), __all__, __name__)

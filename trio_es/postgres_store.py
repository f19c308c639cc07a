"""The PostgreSQL event store: ``async with PostgresStore.open(dsn, transcoder=...) as store``.

Needs ``psycopg`` 3 (``pip install "psycopg[binary]"``). See :class:`PostgresStore`.
"""

from . import _claim_public_names
from ._postgres_store import PostgresStore as PostgresStore
from ._postgres_store import PostgresTransaction as PostgresTransaction
from ._sql import StoredEvent as StoredEvent

__all__ = ["PostgresStore", "PostgresTransaction", "StoredEvent"]

_claim_public_names(globals(), __all__, __name__)

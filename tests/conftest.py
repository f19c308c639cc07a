"""Shared test configuration: Hypothesis profiles, and the PostgreSQL fixtures.

The profile is chosen by the environment variable ``HYPOTHESIS_PROFILE``; without it,
CI (``CI=true``) runs "ci" and everything else "dev", as before:

* "ci": a small budget, no example database (a fresh clone has none to reuse anyway,
  and runs stay independent), ``print_blob`` on so a failure can be replayed.
* "dev": a smaller budget, with the local example database.
* "thorough": a big budget for hunting rare interleavings, and the only profile that
  runs the PostgreSQL model check with connection kills
  (``HYPOTHESIS_PROFILE=thorough pytest tests/test_model_check.py``).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from . import _pg

settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
    print_blob=True,
)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.register_profile(
    "thorough",
    max_examples=2_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") == "true" else "dev")
)


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The server DSN; skips without a reachable server, fails instead when CI=true."""
    return _pg.require_server()


@pytest.fixture(scope="session")
def postgres_databases(postgres_server: str) -> Iterator[_pg.Databases]:
    """Makes the tests' databases ahead of need and drops them in the background."""
    databases = _pg.Databases(postgres_server)
    try:
        yield databases
    finally:
        databases.close()


@pytest.fixture
def postgres_dsn(postgres_databases: _pg.Databases) -> Iterator[str]:
    """The DSN of a fresh, empty database with a random name, force-dropped after the test."""
    with postgres_databases.fresh() as dsn:
        yield dsn


@pytest.fixture
def raw(postgres_dsn: str) -> Iterator[Any]:
    """A plain autocommit connection to the test database, for inspection and faults.

    It never holds a transaction open: PostgreSQL freezes pg_stat_activity for the
    length of a transaction, so watching the store must happen outside one.
    """
    with _pg.connect(postgres_dsn, application_name="trio_es_test") as connection:
        yield connection


@pytest.fixture
def blocker(postgres_dsn: str) -> Iterator[Any]:
    """Another session of the test database, to hold locks in an open transaction."""
    with _pg.connect(postgres_dsn, application_name="trio_es_blocker") as connection:
        yield connection


@pytest.fixture
def raw_connections() -> Iterator[list[sqlite3.Connection]]:
    """Raw sqlite3 connections a test opens; closed (rolling back) at teardown."""
    connections: list[sqlite3.Connection] = []
    yield connections
    for connection in connections:
        connection.close()

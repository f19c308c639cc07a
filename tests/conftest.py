"""Shared test configuration: Hypothesis profiles for local runs, CI and thorough runs.

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

from hypothesis import HealthCheck, settings

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

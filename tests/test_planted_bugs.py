"""The model check catches each bug planted through the runtime's test hook.

``trio_es._aggregate.planted_bugs`` is a set of bug names; adding one switches that bug
on. Each test plants one bug, runs the model check with the budget the memory-store model
check has in CI (:data:`MODEL_CHECK_CI_EXAMPLES`, whatever profile is loaded, so that the
bar is the same everywhere) and expects a failure that breaks one of the invariants the
bug must break. Shrinking is skipped: detection is the point here, and shrinking costs
far more than finding.

The budget is measured, not guessed: with 60 examples the rarest of these bugs (a
crash while a batch of at least two commands is in hand, needed to see FIFO broken)
went unfound for about one seed in 30; 200 examples make a miss vanishingly rare.
"""

from __future__ import annotations

from collections.abc import Iterator

import hypothesis
import pytest

from trio_es.testing import LEDGER, ModelCheck, ModelCheckFailure

from .test_model_check import MODEL_CHECK_CI_EXAMPLES

#: Each planted bug, and the invariants a failure caused by it breaks.
PLANTED = {
    # Queries see events of a commit that then fails.
    "publish_before_commit": {"queries"},
    # A crashed command's caller never hears back: its call times out.
    "lost_reply_on_restart": {"liveness", "call_timeout"},
    # The snapshot's sequence is one before the state it holds.
    "snapshot_off_by_one": {"snapshots", "cache", "reads"},
    # Commands given back after a crash come back in reverse order.
    "fifo_violation_across_restart": {"fifo"},
    # The last command of a committed batch is run (and stored) again.
    "rerun_committed_batch": {"stored once", "nothing stored on failure"},
}


@pytest.fixture
def planted_bugs() -> Iterator[set[str]]:
    """The runtime's planted-bug set, restored afterwards."""
    # Imported here: the hook arrives with the runtime rewrite (issue 8).
    from trio_es import _aggregate

    saved = set(_aggregate.planted_bugs)
    try:
        yield _aggregate.planted_bugs
    finally:
        _aggregate.planted_bugs.clear()
        _aggregate.planted_bugs.update(saved)


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_model_check_catches_planted_bug(bug: str, planted_bugs: set[str]) -> None:
    """With the bug switched on, the CI budget finds a program that breaks its invariant."""
    planted_bugs.add(bug)
    budget = hypothesis.settings(
        hypothesis.settings.get_profile("ci"),
        max_examples=MODEL_CHECK_CI_EXAMPLES,
        phases=[hypothesis.Phase.generate],
        database=None,
    )
    with pytest.raises(ModelCheckFailure) as failure:
        ModelCheck(domain=LEDGER).check(budget, invariants=PLANTED[bug])
    assert failure.value.invariants & PLANTED[bug]

"""The restart policy's rule, one branch per case: no database, no processes."""

from __future__ import annotations

import pytest

from app.core.states import JobState
from app.store.restart_policy import AttemptEnd, Decision, decide

S = JobState


@pytest.mark.parametrize(("restarts", "max_restarts", "recover_on", "end", "expected"), [
    # A cancel wins over everything, with the watcher's words when it has some.
    (0, 3, [], AttemptEnd(exit_code=1, cancelled=True),
     Decision(S.CANCELLED, "cancelled by user")),
    (0, 3, [], AttemptEnd(cancelled=True, why="cancelled; its worker died"),
     Decision(S.CANCELLED, "cancelled; its worker died")),
    # Exit 0 succeeds; exit 0 whose result cannot be kept fails, and is not restarted.
    (0, 3, [], AttemptEnd(exit_code=0), Decision(S.SUCCEEDED, None)),
    (0, 3, [], AttemptEnd(exit_code=0, why="result is too large"),
     Decision(S.FAILED, "result is too large")),
    # A failure with restarts left restarts, spending one; without, it fails.
    (1, 2, [], AttemptEnd(exit_code=3),
     Decision(S.RECOVERING, "exit code 3; restarting", spends_restart=True)),
    (2, 2, [], AttemptEnd(exit_code=3), Decision(S.FAILED, "exit code 3")),
    (0, 1, [], AttemptEnd(exit_code=1, why="raised builtins.RuntimeError: no data"),
     Decision(S.RECOVERING, "raised builtins.RuntimeError: no data; restarting", True)),
    # An exit code that recovers restarts for free, even with the budget spent.
    (2, 2, [75], AttemptEnd(exit_code=75),
     Decision(S.RECOVERING, "exit code 75; restarting", spends_restart=False)),
    (2, 2, [75], AttemptEnd(exit_code=76), Decision(S.FAILED, "exit code 76")),
    # A failure with no exit code to judge (a backend's NODE_FAIL) is still a failure.
    (0, 0, [0], AttemptEnd(why="NODE_FAIL on Slurm"), Decision(S.FAILED, "NODE_FAIL on Slurm")),
    (0, 0, [], AttemptEnd(), Decision(S.FAILED, "failed with no exit code")),
    # A lost attempt restarts while restarts remain, else it is LOST.
    (0, 1, [], AttemptEnd(lost=True, why="its worker died"),
     Decision(S.RECOVERING, "its worker died; restarting", spends_restart=True)),
    (1, 1, [], AttemptEnd(lost=True, why="its worker died"),
     Decision(S.LOST, "its worker died; no restart left")),
    (0, 0, [], AttemptEnd(lost=True, exit_code=0),
     Decision(S.LOST, "its attempt was lost; no restart left")),
])
def test_the_policy_sends_each_ending_where_it_belongs(restarts, max_restarts, recover_on,
                                                       end, expected):
    assert decide(restarts, max_restarts, recover_on, end) == expected


def test_only_a_restart_decision_restarts():
    assert decide(0, 1, [], AttemptEnd(exit_code=1)).restarts
    assert not decide(1, 1, [], AttemptEnd(exit_code=1)).restarts

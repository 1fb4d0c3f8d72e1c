"""The state machine: every allowed move is made and logged, every other one refused."""

from __future__ import annotations

import itertools
import time

import pytest
from sqlmodel import Session, col, select

from app.core.errors import IllegalTransition
from app.core.settings import Settings
from app.core.states import ALLOWED, TERMINAL, JobState
from app.store.db import make_engine
from app.store.jobs import move
from app.store.models import Job, JobEvent

PAIRS = list(itertools.product(JobState, JobState))


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("states")
    engine = make_engine(Settings(home=home, _env_file=None))
    yield engine
    engine.dispose()


def _job_in(session: Session, state: JobState) -> int:
    job = Job(command="true", state=state.value, submitted_at=time.time())
    session.add(job)
    session.flush()
    assert job.id is not None
    return job.id


@pytest.mark.parametrize(("source", "target"), PAIRS,
                         ids=[f"{a.value}->{b.value}" for a, b in PAIRS])
def test_transition_is_made_and_logged_only_when_allowed(engine, source, target):
    with Session(engine) as session:
        job_id = _job_in(session, source)
        if target in ALLOWED[source]:
            move(session, job_id, target, "because")
            assert session.get(Job, job_id).state == target.value
            event = session.exec(select(JobEvent).where(JobEvent.job_id == job_id)
                                 .order_by(col(JobEvent.id).desc())).first()
            assert event is not None
            assert (event.from_state, event.to_state, event.reason) == (
                source.value, target.value, "because")
        else:
            with pytest.raises(IllegalTransition, match=f"is {source.value}"):
                move(session, job_id, target)
            assert session.get(Job, job_id).state == source.value
            assert session.exec(select(JobEvent).where(JobEvent.job_id == job_id)).first() is None
        session.rollback()


def test_terminal_states_have_no_way_out():
    for state in TERMINAL:
        assert ALLOWED[state] == frozenset()


def test_every_active_state_can_be_cancelled_or_ended():
    for state in set(JobState) - TERMINAL:
        assert ALLOWED[state] & TERMINAL, state

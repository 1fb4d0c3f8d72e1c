"""schemathesis against the dashboard's published OpenAPI schema, on a real Redis and
database: no request makes it answer 500, and every answer matches the schema."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from app.core.settings import Settings
from app.dashboard import create_app
from tests.support.dashboard_http import bearer

# Following a log streams until its job ends: test_dashboard_api covers it.
# Running any operation by name takes any operation's arguments, a body no schema narrows:
# tests/contract/test_users.py and tests/e2e/test_second_user_e2e.py cover it.
UNFUZZED = {"/api/jobs/{job_id}/logs/stream", "/api/ops/{name}"}
OPERATIONS = [(path, method)
              for path, methods in create_app(Settings(_env_file=None)).openapi()["paths"].items()
              if path not in UNFUZZED for method in methods]


def test_every_api_route_is_published():
    assert {f"{method.upper()} {path}" for path, method in OPERATIONS} >= {
        "GET /api/jobs", "POST /api/jobs", "GET /api/jobs/{job_id}",
        "POST /api/jobs/{job_id}/cancel", "GET /api/jobs/{job_id}/logs",
        "GET /api/launches", "POST /api/launches", "GET /api/launches/{launch_id}",
        "POST /api/launches/{launch_id}/cancel", "GET /api/status"}


@pytest.mark.parametrize(("path", "method"), OPERATIONS)
def test_answers_match_the_published_schema(settings, local, path, method):
    # A job and a launch, so that some of the ids the generator picks exist.
    local.submit("echo one", name="one")
    local.launch("echo {rank}", num_jobs=3, name="sweep")
    # The ASGI client's requests name the host "testserver": the dashboard answers to it
    # as to a proxy's name.
    app = create_app(settings.model_copy(update={"dashboard_hosts": "testserver"}), local)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers=bearer(app))
    operation = schema[path][method]

    @given(case=operation.as_strategy())
    @hypothesis_settings(max_examples=30, deadline=None, database=None,
                         suppress_health_check=list(HealthCheck))
    def check(case: schemathesis.Case) -> None:
        # Which preflight checks exist is configuration, and whether a job named in `after`
        # can still succeed is data, not schema, and --gpu-ids must hold the job's GPUs,
        # each named once, and an environment's total size is bounded (rules across items
        # and fields), and a relative workdir means the caller's directory, which the server
        # does not know, and a log is read from its head or its tail, not both, and a command
        # of quotes alone runs nothing: a well-formed request naming an unknown check, a job
        # that ended unsuccessfully, too few or repeated GPU ids, a larger environment, a
        # relative workdir, both --head and --tail or a command of quotes is refused with
        # 400, and so is a time limit of 0 or over a year, which its pattern does not
        # bound. Any other 400 is a finding.
        response = case.call_and_validate(headers=bearer(app),
                                          excluded_checks=[positive_data_acceptance])
        if response.status_code == 400:
            message = response.json()["message"]
            assert message.startswith("unknown preflight") or any(
                rule in message for rule in ("so a job after it could never start",
                                             "--gpu-ids names", "distinct GPU indices",
                                             "65,536 bytes",  # an environment's total size
                                             "the server does not run in your directory",
                                             "--head and --tail cannot be used together",
                                             # quotes alone: nonempty, yet no command
                                             "the command is empty",
                                             "time takes from 1s to")
            ), response.text

    check()

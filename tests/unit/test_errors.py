"""Every error class is registered by its code and comes back as itself over the remote
transport: a real Celery worker on the control queue, the real broker, the JSON envelope."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from celery.contrib.testing.worker import start_worker

import app
from app.client import Client
from app.core import errors
from app.core.errors import ERRORS_BY_CODE, GpuqError, JobsFileError
from app.core.keys import CONTROL_QUEUE
from app.ops import registry
from app.runtime import Runtime
from tasks import control


def _every_error_class() -> list[type[GpuqError]]:
    """GpuqError and its subclasses, however deep, wherever gpuq defines them."""
    found, todo = [], [GpuqError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return [c for c in found if c.__module__.startswith(app.__name__ + ".")]


def test_every_error_class_lives_in_one_module_and_is_registered_by_its_code():
    classes = _every_error_class()
    assert len(classes) >= 20
    for cls in classes:
        assert cls.__module__ == errors.__name__, f"{cls.__name__} is defined outside errors"
        assert ERRORS_BY_CODE[cls.code] is cls


def test_a_new_error_without_a_code_of_its_own_is_refused_at_definition():
    with pytest.raises(TypeError, match="needs a `code` of its own"):
        type("Vague", (GpuqError,), {})
    with pytest.raises(TypeError, match="is taken by JobNotFound"):
        type("Twin", (GpuqError,), {"code": "job_not_found"})


@pytest.fixture
def control_worker(rt: Runtime, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A Celery worker in this process on the control queue, with one extra operation
    that raises the error named by its code."""

    def explode(rt: Runtime, code: str) -> dict[str, object]:
        raise ERRORS_BY_CODE[code](f"raised remotely as {code}")

    monkeypatch.setitem(registry.OPERATIONS, "explode", explode)
    celery = rt.celery
    control.register(celery, rt)
    with start_worker(celery, pool="solo", queues=[CONTROL_QUEUE], perform_ping_check=False,
                      shutdown_timeout=30):
        yield


def test_each_error_comes_back_as_its_own_class_over_the_remote_transport(
        settings, control_worker):
    client = Client(settings, "remote")
    try:
        for code, cls in sorted(ERRORS_BY_CODE.items()):
            with pytest.raises(GpuqError) as caught:
                client.call("explode", code=code)
            assert type(caught.value) is cls, code
            assert str(caught.value) == f"raised remotely as {code}"
            if isinstance(caught.value, JobsFileError):
                assert caught.value.lineno is None
    finally:
        client.close()

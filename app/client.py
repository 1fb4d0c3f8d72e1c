"""The Python client: submit and launch jobs, get future-like handles back.

    client = Client()
    job = client.submit("python train.py --lr 3e-4", gpus=1)
    job.wait(); print(job.status, job.logs())
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Sequence
from typing import Any

from app.celery_app import CONTROL_QUEUE
from app.errors import GpuqError, OperationTimeout, error_from_envelope
from app.ops import call_local
from app.runtime import Runtime
from app.settings import Settings
from app.states import JobState

POLL_S = 0.2


class Client:
    """Entry point of the API; `transport` is 'local' (in process) or 'remote' (broker)."""

    def __init__(self, settings: Settings | None = None, transport: str | None = None) -> None:
        self.settings = settings or Settings()
        self.transport = transport or self.settings.transport
        if self.transport not in ("local", "remote"):
            raise GpuqError(f"unknown transport {self.transport!r}; use 'local' or 'remote'")
        self.rt = Runtime(self.settings)

    def call(self, op: str, /, **kwargs: Any) -> dict[str, Any]:
        """Run one operation of the operations layer over this client's transport."""
        if self.transport == "local":
            return call_local(self.rt, op, kwargs)
        return self._call_remote(op, kwargs)

    def _call_remote(self, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        from celery.exceptions import TimeoutError as CeleryTimeout

        result = self.rt.celery.send_task("gpuq.op", args=[name, kwargs], queue=CONTROL_QUEUE)
        try:
            envelope = result.get(timeout=self.settings.op_timeout_s)
        except CeleryTimeout:
            raise OperationTimeout(
                f"no control worker answered {name!r} within {self.settings.op_timeout_s}s; "
                "start one with `gpuq up` or `gpuq control-worker`"
            ) from None
        finally:
            result.forget()
        if not envelope["ok"]:
            raise error_from_envelope(envelope["code"], envelope["message"])
        value: dict[str, Any] = envelope["value"]
        return value

    def submit(self, command: str | Sequence[str], allow_duplicate: bool = False,
               **options: Any) -> JobHandle:
        """Queue one job; options are JobSpec fields (gpus, name, priority, env, ...).

        Raises DuplicateJob when an identical job has not ended, unless allow_duplicate."""
        out = self.call("submit", spec=_spec(command, options), allow_duplicate=allow_duplicate)
        return JobHandle(self, out["job_ids"][0])

    def launch(self, command: str | Sequence[str], num_jobs: int, **options: Any
               ) -> LaunchHandle:
        """Queue `num_jobs` replicas of one command; each sees its GPUQ_JOB_RANK."""
        out = self.call("launch", spec=_spec(command, options), num_jobs=num_jobs)
        return LaunchHandle(self, out["launch_id"], out["job_ids"])

    def job(self, job_id: int) -> JobHandle:
        return JobHandle(self, job_id)

    def rows(self, job_ids: Sequence[int]) -> list[dict[str, Any]]:
        jobs: list[dict[str, Any]] = self.call("queue", ids=list(job_ids),
                                               limit=max(1, len(job_ids)))["jobs"]
        return jobs

    def wait(self, job_ids: Sequence[int], timeout_s: float | None = None
             ) -> list[dict[str, Any]]:
        """Block until every job is in a terminal state; return their rows."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            rows = self.rows(job_ids)
            if all(JobState(r["status"]).terminal for r in rows):
                return rows
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"jobs still running after {timeout_s}s")
            time.sleep(POLL_S)

    def close(self) -> None:
        self.rt.close()


def _spec(command: str | Sequence[str], options: dict[str, Any]) -> dict[str, Any]:
    text = command if isinstance(command, str) else shlex.join(command)
    return {"command": text, **{k: v for k, v in options.items() if v is not None}}


class JobHandle:
    """A submitted job, in the manner of a future."""

    def __init__(self, client: Client, job_id: int) -> None:
        self.client = client
        self.id = job_id

    def __repr__(self) -> str:
        return f"JobHandle({self.id})"

    def row(self) -> dict[str, Any]:
        return self.client.rows([self.id])[0]

    @property
    def status(self) -> str:
        return str(self.row()["status"])

    def done(self) -> bool:
        return JobState(self.status).terminal

    def wait(self, timeout_s: float | None = None) -> str:
        """Block until the job ends; return its final status."""
        return str(self.client.wait([self.id], timeout_s)[0]["status"])

    def logs(self) -> str:
        text: str = self.client.call("logs", job_id=self.id)["text"]
        return text

    def cancel(self) -> dict[str, Any]:
        return self.client.call("cancel", ids=[self.id])


class LaunchHandle:
    """The N replicas of one launch."""

    def __init__(self, client: Client, launch_id: int, job_ids: list[int]) -> None:
        self.client = client
        self.id = launch_id
        self.job_ids = job_ids

    @property
    def jobs(self) -> list[JobHandle]:
        return [JobHandle(self.client, i) for i in self.job_ids]

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = self.client.call("launches", launch_id=self.id)[
            "launches"][0]["counts"]
        return counts

    def wait(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        return self.client.wait(self.job_ids, timeout_s)

    def cancel(self) -> dict[str, Any]:
        return self.client.call("cancel", launch_id=self.id)

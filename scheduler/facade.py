"""`GPUJobScheduler`: the older single-file scheduler API, as a thin facade over gpuq.

    scheduler = GPUJobScheduler(num_gpus=8, jobs_file_path="jobs.txt")
    scheduler.start()
    job_id = scheduler.add_job("train.py", env={"LR": "3e-4"}, args=["--epochs", "3"])
    print(scheduler.get_gpu_status())
    scheduler.stop()

Behind it run the real pieces: the embedded Redis (unless GPUQ_REDIS_URL is set), one
Celery worker per GPU, the jobs-file watcher, and the in-process operations layer.
"""

from __future__ import annotations

import os
import shlex
import threading
import time
from pathlib import Path
from typing import Any

from app.client import Client
from app.core.errors import GpuqError
from app.core.settings import Settings
from app.runtime import Runtime
from app.stack.commands import gpu_worker_programs
from app.stack.host import register_host
from app.stack.supervisor import Supervisor
from app.store.embedded_redis import EmbeddedRedis
from scheduler.dispatch.allocator import Dispatcher
from scheduler.jobsfile import JobsFileWatcher
from scheduler.worker.monitor import detect_provider

POLL_S = 0.5


class GPUJobScheduler:
    def __init__(self, num_gpus: int | None = None, jobs_file_path: str | Path | None = None,
                 settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.num_gpus = num_gpus
        self.jobs_file = Path(jobs_file_path) if jobs_file_path else None
        self._redis: EmbeddedRedis | None = None
        self._supervisor: Supervisor | None = None
        self._client: Client | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 60) -> None:
        """Start the broker (if embedded) and one worker per GPU; return when they are up."""
        settings = self.settings
        if self.num_gpus is not None and settings.fake_gpus is None:
            probe = detect_provider(settings)
            if probe.kind == "fake":  # no driver here: pretend the asked-for number
                settings = settings.model_copy(update={"fake_gpus": self.num_gpus})
        if not settings.redis_url:
            self._redis = EmbeddedRedis(settings)
            settings = settings.model_copy(update={"redis_url": self._redis.start()})
        self.settings = settings
        self._client = Client(settings, "local")
        count = register_host(self._client.rt, detect_provider(settings), settings.hostname,
                              limit=self.num_gpus)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("GPUQ_")},
               **settings.as_environment()}
        self._supervisor = Supervisor(gpu_worker_programs(settings, count), base_env=env)
        self._supervisor.start()
        self._thread = threading.Thread(target=self._loop, name="gpuq-facade", daemon=True)
        self._thread.start()
        self._wait_for_workers(count, timeout_s)

    def _wait_for_workers(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if sum(g["alive"] for g in self.get_gpu_status()) >= count:
                return
            time.sleep(0.2)
        self.stop()
        raise GpuqError(f"the {count} GPU workers did not come up in {timeout_s}s")

    def _loop(self) -> None:
        """Keep workers alive, read the jobs file, and run the periodic dispatch pass."""
        client = self._client
        assert client is not None and self._supervisor is not None
        watcher = None
        if self.jobs_file is not None:
            watcher = JobsFileWatcher(self.jobs_file, lambda origin, specs, **more: client.call(
                "submit_many", origin=origin, specs=specs, **more))
        dispatcher_rt = Runtime(self.settings)
        try:
            while not self._stop.wait(POLL_S):
                self._supervisor.poll()
                if watcher is not None:
                    watcher.poll()
                Dispatcher(dispatcher_rt).dispatch()
        finally:
            dispatcher_rt.close()

    def add_job(self, script: str, env: dict[str, str] | None = None,
                args: list[str] | None = None, gpus: int = 1, **options: Any) -> int:
        """Queue `script args...` (a shell command) and return its job id."""
        command = shlex.join([script, *args]) if args else script
        return self._require_client().submit(command, env=env or {}, gpus=gpus,
                                             allow_duplicate=True, **options).id

    def get_gpu_status(self) -> list[dict[str, Any]]:
        """One dict per GPU: host, index, name, alive, job_id, reading."""
        status = self._require_client().call("status")
        return [{"host": host["host"], **gpu} for host in status["hosts"] for gpu in host["gpus"]]

    def client(self) -> Client:
        """The full client API (wait, logs, cancel, launch) over the same system."""
        return self._require_client()

    def _require_client(self) -> Client:
        if self._client is None:
            raise GpuqError("call start() first")
        return self._client

    def stop(self) -> None:
        """Stop the workers, the watcher and the embedded broker this scheduler started."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._supervisor is not None:
            self._supervisor.stop()
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._redis is not None:
            self._redis.stop()

    def __enter__(self) -> GPUJobScheduler:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

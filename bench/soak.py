"""A soak: two simulated hosts run thousands of short jobs while seeded random hard faults
hit them; afterwards every invariant is checked on the spans the jobs recorded themselves.

    python -m bench.soak --minutes 3 --seed 1

Host A runs `gpuq worker`, `gpuq control-worker` and `gpuq beat`; host B runs `gpuq worker`
and reaches Redis (and PostgreSQL, when GPUQ_DATABASE_URL names one) through TCP forwarders
that can be cut: a network partition of host B. Redis is a private `redis-server` with no
persistence, so that it can be SIGKILLed and come back empty. The database is SQLite under a
temporary home, or a database of its own on GPUQ_DATABASE_URL's server, dropped at the end.

The same seed draws the same faults in the same order and the same jobs. Exit status 1 when
a job was lost, ran twice, double-booked a GPU or was stuck; every process started here (and
everything they started, found by a marker in their environment) is stopped by its PID.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import make_url, text
from sqlmodel import col, create_engine, select

from app.client import Client
from app.core import keys
from app.core.procgroup import stop_groups
from app.core.settings import Settings
from app.core.states import TERMINAL
from app.store.models import Job, JobEvent
from tests.support.netutil import PausableProxy, _pipe, free_port
from tests.support.spans import Span, Violations, check, read_spans, span_command

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
TERMINAL_NAMES = {s.value for s in TERMINAL}
BACKLOG = 24  # jobs not yet ended that the submitter keeps in flight at most
FAULT_GAP_S = (4.0, 12.0)  # quiet time between two faults
KINDS = ("kill-gpu-worker", "kill-cpu-worker", "kill-control-worker", "kill-host-b",
         "kill-redis", "delete-holds", "partition-host-b", "cut-database-b")


def log(start: float, message: str) -> None:
    print(f"[{time.monotonic() - start:7.1f}s] {message}", flush=True)


class Forwarder(PausableProxy):
    """A PausableProxy that outlives its target going away (Redis killed): a connection it
    cannot pass on is closed, not the end of its accept loop."""

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=2)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


class RedisServer:
    """A private redis-server with no persistence: killed, it comes back empty."""

    def __init__(self, home: Path, env: dict[str, str]) -> None:
        self.dir = home / "redis"
        self.dir.mkdir(parents=True)
        self.port = free_port()
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log_file = open(self.dir / "redis.log", "ab")  # noqa: SIM115 (handed to the child)
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir)],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, env=self.env)
        log_file.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=0.5):
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not come up; see {self.dir / 'redis.log'}")

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait()
            self.proc = None


@contextlib.contextmanager
def soak_database(url: str | None) -> Iterator[str | None]:
    """None (SQLite under the home), or a database of its own on `url`'s server, dropped
    after: never `url`'s own database, which the tests use."""
    if not url:
        yield None
        return
    name = f"gpuq_soak_{os.getpid()}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS {name}"))
        conn.execute(text(f"CREATE DATABASE {name}"))
    try:
        yield make_url(url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


def environ_of(pid: int) -> dict[str, str] | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
        if " Z " in Path(f"/proc/{pid}/stat").read_text():
            return None
    except (OSError, ValueError):
        return None
    pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, _, v in pairs}


def cmdline_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


@dataclass
class Soak:
    minutes: float
    seed: int
    home: Path
    database_url: str | None
    only: list[str] | None = None  # the fault kinds to draw from; None: every one
    start: float = field(default_factory=time.monotonic)
    token: str = field(default_factory=lambda: secrets.token_hex(6))
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    proxies: list[Forwarder] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    accepted: set[int] = field(default_factory=set)
    meant: dict[int, int] = field(default_factory=dict)  # job id: the exit code it was given
    launches: int = 0
    singles: int = 0
    refused: int = 0
    stop_submitting: threading.Event = field(default_factory=threading.Event)
    client: Client = field(init=False)

    def __post_init__(self) -> None:
        self.host_a, self.host_b = f"soak{os.getpid()}a", f"soak{os.getpid()}b"
        self.spans = self.home / "spans"
        self.redis = RedisServer(self.home, self.marked_env())

    # -- processes -------------------------------------------------------------------

    def marked_env(self, settings: Settings | None = None) -> dict[str, str]:
        """The environment of every process started here: SOAK_RUN marks them and all
        they start (jobs keep it: only GPUQ_* variables are withheld from jobs)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUQ_")}
        if settings is not None:
            env.update(settings.as_environment())
        env.update(PATH=f"{BIN}:{env.get('PATH', '')}", PYTHONPATH=str(ROOT),
                   SOAK_RUN=self.token)
        return env

    def ours(self, **wanted: str) -> list[int]:
        """PIDs of live processes carrying this soak's marker (and `wanted` variables)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            env = environ_of(int(entry.name))
            if env is None or env.get("SOAK_RUN") != self.token:
                continue
            if all(env.get(k) == v for k, v in wanted.items()):
                found.append(int(entry.name))
        return found

    def settings(self, host: str) -> Settings:
        base = Settings(home=self.home, redis_url=self.redis.url,
                        database_url=self.database_url, hostname=self.host_a, fake_gpus=2,
                        cpu_slots=1, heartbeat_s=1, kill_grace_s=1, reservation_ttl_s=8,
                        lease_margin_s=2, reconcile_interval_s=1, dispatch_interval_s=1,
                        monitor_interval_s=2, log_level="WARNING",
                        secret=f"soak {self.token}", _env_file=None)
        if host == self.host_a:
            return base
        changes: dict[str, object] = {"hostname": self.host_b,
                                      "redis_url": f"redis://127.0.0.1:{self.proxies[0].port}/0"}
        if self.database_url:
            db = make_url(self.database_url)
            changes["database_url"] = db.set(host="127.0.0.1", port=self.proxies[1].port
                                             ).render_as_string(hide_password=False)
        return base.model_copy(update=changes)

    def spawn(self, name: str, host: str, command: str) -> None:
        settings = self.settings(host)
        log_file = open(self.home / f"{name}.log", "ab")  # noqa: SIM115 (handed to the child)
        self.procs[name] = subprocess.Popen(
            [str(BIN / "gpuq"), command], env=self.marked_env(settings), stdout=log_file,
            stderr=subprocess.STDOUT, start_new_session=True, cwd=self.home)
        log_file.close()

    def start_stack(self) -> None:
        self.redis.start()
        self.proxies.append(Forwarder(("127.0.0.1", self.redis.port)))
        if self.database_url:
            db = make_url(self.database_url)
            self.proxies.append(Forwarder((db.host or "127.0.0.1", db.port or 5432)))
        self.spawn("worker-a", self.host_a, "worker")
        self.spawn("control", self.host_a, "control-worker")
        self.spawn("beat", self.host_a, "beat")
        self.spawn("worker-b", self.host_b, "worker")

    def wait_ready(self, client: Client, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                hosts = client.call("status")["hosts"]
                if sum(h["workers_alive"] for h in hosts) >= 4:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"the two hosts' GPU workers did not come up; see {self.home}")

    def stop_everything(self) -> list[int]:
        """Stop every process started here, by PID; return those that had to be killed in
        the sweep after their groups were stopped."""
        stop_groups(list(self.procs.values()), grace_s=15)
        self.procs.clear()
        swept: list[int] = []
        for _ in range(20):
            left = [p for p in self.ours() if p != (self.redis.proc.pid if self.redis.proc
                                                     else None)]
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            swept += left
            time.sleep(0.2)
        self.redis.kill()
        for proxy in self.proxies:
            with contextlib.suppress(Exception):
                proxy.down()
        return sorted(set(swept))

    # -- faults ----------------------------------------------------------------------

    def kill(self, pids: list[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def celery_pids(self, name: str) -> list[int]:
        return [p for p in self.ours() if f" -n {name} " in cmdline_of(p)]

    def running(self, gpus: bool, wait_s: float = 10) -> list[tuple[str, list[int]]]:
        """(host, GPU ids) of the GPU (or 0-GPU) jobs running now, waiting a little for
        one: a worker is killed under a job, the hard version of the fault."""
        deadline = time.monotonic() + wait_s
        while True:
            with self.client.rt.session() as session:
                found = sorted((j.host, j.gpu_ids or []) for j in session.exec(
                    select(Job).where(col(Job.state) == "RUNNING",
                                      (col(Job.gpus) > 0) if gpus else (col(Job.gpus) == 0))
                ).all() if j.host)
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.2)

    def fault_kill_gpu_worker(self, rng: random.Random) -> str:
        busy = [f"gpu{ids[0]}@{host}" for host, ids in self.running(gpus=True) if ids]
        name = rng.choice(busy or [f"gpu{rng.randrange(2)}@{self.host_a}"])
        pids = self.celery_pids(name)
        self.kill(pids)
        return f"{name} pids {pids}" + ("" if busy else " (no GPU job running)")

    def fault_kill_cpu_worker(self, rng: random.Random) -> str:
        busy = sorted({host for host, _ in self.running(gpus=False)})
        host = rng.choice(busy or [self.host_a, self.host_b])
        pids = self.celery_pids(f"cpu@{host}")
        self.kill(pids)
        return f"cpu@{host} pids {pids}" + ("" if busy else " (no 0-GPU job running)")

    def fault_kill_control_worker(self, rng: random.Random) -> str:
        proc = self.procs.pop("control")
        pids = sorted({*self.celery_pids(f"control@{self.host_a}"), proc.pid})
        self.kill(pids)
        proc.wait()
        time.sleep(rng.uniform(0.5, 3))
        self.spawn("control", self.host_a, "control-worker")
        return f"control@{self.host_a} pids {pids}, restarted"

    def fault_kill_host_b(self, rng: random.Random) -> str:
        """Host B dies at once: its supervisor and workers first (none lives to see its
        jobs die and record it), then every job process on it."""
        proc = self.procs.pop("worker-b")
        workers = sorted({*self.ours(GPUQ_HOSTNAME=self.host_b), proc.pid})
        self.kill(workers)
        jobs = self.ours(GPUQ_HOST=self.host_b)
        self.kill(jobs)
        proc.wait()
        down_s = rng.uniform(3, 15)
        time.sleep(down_s)
        self.spawn("worker-b", self.host_b, "worker")
        return f"{len(workers)} workers, {len(jobs)} job processes; back after {down_s:.1f}s"

    def fault_kill_redis(self, rng: random.Random) -> str:
        self.redis.kill()
        down_s = rng.uniform(0.5, 3)
        time.sleep(down_s)
        self.redis.start()
        return f"restarted empty after {down_s:.1f}s"

    def fault_delete_holds(self, rng: random.Random) -> str:
        found = list(self.client.rt.redis.scan_iter(f"{keys.PREFIX}:hold:*"))
        if found:
            self.client.rt.redis.delete(*found)
        return f"{len(found)} keys"

    def _cut(self, proxies: list[Forwarder], rng: random.Random) -> str:
        settings = self.settings(self.host_a)
        down_s = settings.reservation_ttl_s + settings.lease_margin_s + rng.uniform(2, 6)
        for proxy in proxies:
            proxy.down()
        time.sleep(down_s)
        for proxy in proxies:
            proxy.up()
        return f"{down_s:.1f}s (lease {settings.reservation_ttl_s}s)"

    def fault_partition_b(self, rng: random.Random) -> str:
        return "Redis" + (" and database" if self.database_url else "") + " cut for " + \
            self._cut(self.proxies, rng)

    def fault_cut_database_b(self, rng: random.Random) -> str:
        return "database cut for " + self._cut(self.proxies[1:], rng)

    def fault_kinds(self) -> dict[str, Callable[[random.Random], str]]:
        kinds: dict[str, Callable[[random.Random], str]] = {
            "kill-gpu-worker": self.fault_kill_gpu_worker,
            "kill-cpu-worker": self.fault_kill_cpu_worker,
            "kill-control-worker": self.fault_kill_control_worker,
            "kill-host-b": self.fault_kill_host_b,
            "kill-redis": self.fault_kill_redis,
            "delete-holds": self.fault_delete_holds,
            "partition-host-b": self.fault_partition_b,
        }
        if self.database_url:
            kinds["cut-database-b"] = self.fault_cut_database_b
        return kinds

    def inject_faults(self, until: float) -> None:
        # One stream draws the kinds and the gaps, another each fault's details: what a
        # fault finds running (and so draws) never shifts the sequence of kinds.
        rng = random.Random(self.seed)
        kinds = self.fault_kinds()
        names = sorted(k for k in kinds if self.only is None or k in self.only)
        for n in itertools.count():
            time.sleep(rng.uniform(*FAULT_GAP_S))
            if time.monotonic() >= until:
                return
            kind = rng.choice(names)
            log(self.start, f"fault {kind} ...")
            try:
                detail = kinds[kind](random.Random(f"{self.seed}/{n}"))
            except Exception as e:  # the soak goes on; the fault is reported as tried
                detail = f"could not be injected: {type(e).__name__}: {e}"
            self.faults[kind] += 1
            log(self.start, f"fault {kind}: {detail}")

    # -- jobs ------------------------------------------------------------------------

    def submit_jobs(self, client: Client) -> None:
        rng = random.Random(self.seed * 7919 + 1)
        while not self.stop_submitting.is_set():
            gpus = rng.choices((1, 2, 0), weights=(45, 20, 35))[0]
            seconds = rng.uniform(0.2, 3.0)
            exit_code = rng.choice((1, 3, 42)) if rng.random() < 0.1 else 0
            restarts = rng.randint(1, 2) if rng.random() < 0.3 else 0
            replicas = rng.randint(3, 10) if rng.random() < 0.3 else 1
            command = span_command(self.spans, seconds, exit_code)
            try:
                while self.in_flight(client) >= BACKLOG and not self.stop_submitting.is_set():
                    time.sleep(0.3)
                if replicas > 1:
                    handle = client.launch(command, num_jobs=replicas, gpus=gpus,
                                           max_restarts=restarts, name="soak")
                    self.accepted.update(handle.job_ids)
                    self.meant.update(dict.fromkeys(handle.job_ids, exit_code))
                    self.launches += 1
                else:
                    job = client.submit(command, gpus=gpus, max_restarts=restarts,
                                        name="soak", allow_duplicate=True)
                    self.accepted.add(job.id)
                    self.meant[job.id] = exit_code
                    self.singles += 1
            except Exception:  # refused while Redis or the database is away: not accepted
                self.refused += 1
                time.sleep(0.5)
            time.sleep(rng.uniform(0.05, 0.4))

    def in_flight(self, client: Client) -> int:
        with client.rt.session() as session:
            return len(session.exec(select(Job.id).where(
                col(Job.state).not_in(TERMINAL_NAMES))).all())

    def drain(self, client: Client) -> list[Job]:
        """Wait until every job has ended; those still not ended when nothing ended for
        several leases (or after 15 minutes) are stuck."""
        settings = self.settings(self.host_a)
        window_s = 4 * (settings.reservation_ttl_s + settings.lease_margin_s)
        last, changed_at, cap = -1, time.monotonic(), time.monotonic() + 900
        while True:
            with contextlib.suppress(Exception), client.rt.session() as session:
                left = session.exec(select(Job).where(
                    col(Job.state).not_in(TERMINAL_NAMES))).all()
                if not left:
                    return []
                if len(left) != last:
                    last, changed_at = len(left), time.monotonic()
                if time.monotonic() - changed_at > window_s or time.monotonic() > cap:
                    return list(left)
            time.sleep(1)

    # -- the run ---------------------------------------------------------------------

    def run(self) -> int:
        self.start_stack()
        client = self.client = Client(self.settings(self.host_a), "local")
        try:
            self.wait_ready(client)
            self.start = time.monotonic()
            log(self.start, f"two hosts up ({self.host_a}, {self.host_b}) at epoch "
                            f"{time.time():.2f}; home {self.home}")
            submitter = threading.Thread(target=self.submit_jobs, args=(client,), daemon=True)
            submitter.start()
            self.inject_faults(until=self.start + self.minutes * 60)
            self.stop_submitting.set()
            submitter.join(timeout=120)
            log(self.start, "faults and submissions stopped; waiting for every job to end")
            stuck = self.drain(client)
            return self.report(client, stuck)
        finally:
            client.close()

    def report(self, client: Client, stuck: list[Job]) -> int:
        with client.rt.session() as session:
            rows = {int(j.id or 0): j for j in session.exec(select(Job)).all()}
        states = Counter(j.state for j in rows.values())
        lost = sorted(self.accepted - set(rows))
        found = check(read_spans(self.spans), {i: j.attempt for i, j in rows.items()})
        twice = (len(found.attempts_run_twice) + len(found.runs_over_attempts)
                 + len(found.ran_twice_at_once))
        failed = bool(lost or twice or found.gpu_overlaps or stuck)
        print(f"\nsoak: seed {self.seed}, {self.minutes:g} min, "
              f"{'PostgreSQL' if self.database_url else 'SQLite'}")
        print(f"  jobs submitted   {len(self.accepted)} ({self.launches} launches, "
              f"{self.singles} single submits; {self.refused} submits refused)")
        print(f"  faults injected  {sum(self.faults.values())}: " + ", ".join(
            f"{k} {n}" for k, n in sorted(self.faults.items())))
        print("  ended            " + ", ".join(f"{k} {n}" for k, n in sorted(states.items())))
        print(f"  ended LOST       {states.get('LOST', 0)}")
        reasons = Counter((j.state, re.sub(r"[0-9a-f]{12,}", "…", j.reason or ""))
                          for j in rows.values()
                          if j.state != "SUCCEEDED" and (
                              j.state != "FAILED" or j.exit_code != self.meant.get(int(j.id or 0))))
        for (state, reason), n in reasons.most_common(6):
            print(f"    {state:<16} {n:>5}  {reason}")
        print(f"  lost             {len(lost)}")
        print(f"  run twice        {twice} ((job, attempt) run twice "
              f"{len(found.attempts_run_twice)}, runs over attempts "
              f"{len(found.runs_over_attempts)}, runs of one job at once "
              f"{len(found.ran_twice_at_once)}; {len(read_spans(self.spans))} runs with their "
              "attempts)")
        print(f"  GPU overlaps     {len(found.gpu_overlaps)}")
        print(f"  stuck            {len(stuck)}")
        if failed:
            self.evidence(client, lost, stuck, found)
        print(f"soak: {'FAILED' if failed else 'OK'}", flush=True)
        return 1 if failed else 0

    def evidence(self, client: Client, lost: list[int], stuck: list[Job],
                 found: Violations) -> None:
        print(f"  lost ids: {lost[:20]}")
        print(f"  stuck: {[(j.id, j.state, j.host, j.attempt) for j in stuck[:20]]}")
        print(f"  runs over attempts (job: runs, attempts): "
              f"{dict(list(found.runs_over_attempts.items())[:10])}")
        for what, pairs in (("one job at once", found.ran_twice_at_once),
                            ("GPU overlap", found.gpu_overlaps)):
            for a, b in pairs[:5]:
                print(f"  {what}: {self.span(a)} | {self.span(b)}")
        ids = set(list(found.runs_over_attempts)[:5]) | {int(j.id or 0) for j in stuck[:5]}
        ids |= {job_id for job_id, _ in list(found.attempts_run_twice)[:5]}
        ids |= {a.job_id for a, _ in found.ran_twice_at_once[:3] + found.gpu_overlaps[:3]}
        ids |= {b.job_id for _, b in found.ran_twice_at_once[:3] + found.gpu_overlaps[:3]}
        with client.rt.session() as session:
            for job_id in sorted(ids):
                print(f"  job {job_id} events:")
                for e in session.exec(select(JobEvent).where(col(JobEvent.job_id) == job_id)
                                      .order_by(col(JobEvent.id))).all():
                    print(f"    {e.at - self.start_epoch:8.1f}s {e.from_state} -> "
                          f"{e.to_state} ({e.reason})")
        print(f"  worker logs and spans kept under {self.home}")

    def span(self, span: Span) -> str:
        return (f"job {span.job_id} run {span.run} on {span.host} GPUs {','.join(span.gpus)} "
                f"{span.start - self.start_epoch:.1f}s-{span.end - self.start_epoch:.1f}s")

    @property
    def start_epoch(self) -> float:
        return time.time() - (time.monotonic() - self.start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="how long faults go on")
    parser.add_argument("--seed", type=int, default=1, help="draws the faults and the jobs")
    parser.add_argument("--faults", help="draw only these fault kinds (comma-separated): "
                        + ", ".join(KINDS))
    parser.add_argument("--keep", action="store_true", help="keep the home (logs, spans)")
    args = parser.parse_args(argv)
    only = args.faults.split(",") if args.faults else None
    unknown = sorted(set(only or []) - set(KINDS))
    if unknown:
        parser.error(f"unknown fault kinds {unknown}; choose from {', '.join(KINDS)}")
    home = Path(tempfile.mkdtemp(prefix="gpuq-soak-"))
    code = 2
    with soak_database(os.environ.get("GPUQ_DATABASE_URL")) as database_url:
        soak = Soak(args.minutes, args.seed, home, database_url, only)
        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        try:
            code = soak.run()
        finally:
            swept = soak.stop_everything()
            signal.signal(signal.SIGTERM, previous)
            if swept:
                print(f"  processes swept after their groups stopped: {len(swept)}")
            left = soak.ours()
            if left:
                print(f"soak: processes left behind: {left}")
                code = 1
    if code == 0 and not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())

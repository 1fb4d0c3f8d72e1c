"""The cluster's live state in Redis, with one owner: hosts and their GPU inventory,
heartbeats, monitor readings, and reservations (holds).

Each is a cache or a lease the database can outlive: a GPU worker re-registers its host,
heartbeats expire, and a hold names the attempt (job id, attempt) it belongs to, so that a
stale message of an earlier attempt can never release the GPUs of the current one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from app.core import keys

if TYPE_CHECKING:
    import redis

# All-or-nothing: every GPU must be alive and unheld, then all are held by ARGV[1].
# KEYS = hold keys followed by the matching alive keys.
_RESERVE = """
local n = #KEYS / 2
for i = 1, n do
  if redis.call('EXISTS', KEYS[i]) == 1 or redis.call('EXISTS', KEYS[n + i]) == 0 then
    return 0
  end
end
for i = 1, n do
  redis.call('SET', KEYS[i], ARGV[1], 'EX', ARGV[2])
end
return 1
"""

# Release only the reservations this job still holds.
_RELEASE = """
local released = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('DEL', KEYS[i]); released = released + 1
  end
end
return released
"""
# Refresh a running job's reservations; take back one that expired while Redis was away
# (the job never stopped using the GPU), but never one another job holds now.
_REFRESH = """
for i = 1, #KEYS do
  local holder = redis.call('GET', KEYS[i])
  if holder == ARGV[1] then
    redis.call('EXPIRE', KEYS[i], ARGV[2])
  elseif not holder then
    redis.call('SET', KEYS[i], ARGV[1], 'EX', ARGV[2])
  end
end
return 1
"""


# The dispatcher's turn: one pass at a time cluster-wide. A caller that finds the turn taken
# flags its request (dirty) for the holder to serve; the holder, after each pass, either
# takes the flag and goes round again or gives the turn up, in one step, so that a request
# can never fall between its last look at the flag and its release.
# KEYS = lock, dirty flag. ARGV = token, ttl (ms).
_ENTER_DISPATCH = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('DEL', KEYS[2]); return 1
end
redis.call('SET', KEYS[2], 1)
return 0
"""
# ARGV = token, ttl (ms), 1 when the holder may go round again.
_NEXT_DISPATCH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] == '1' and redis.call('DEL', KEYS[2]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2]); return 1
end
redis.call('DEL', KEYS[1])
return 0
"""


def enter_dispatch(r: redis.Redis, token: str, ttl_s: float) -> bool:
    """Take the dispatcher's turn; False (and the request flagged) when another has it."""
    return bool(_script(r, _ENTER_DISPATCH)(keys=[keys.DISPATCH_LOCK, keys.DISPATCH_DIRTY],
                                            args=[token, int(ttl_s * 1000)]))


def next_dispatch(r: redis.Redis, token: str, ttl_s: float, may_continue: bool) -> bool:
    """After a pass: True when a request came meanwhile and the turn is kept for another
    pass (`may_continue`); else the turn is given up, a request left flagged."""
    return bool(_script(r, _NEXT_DISPATCH)(keys=[keys.DISPATCH_LOCK, keys.DISPATCH_DIRTY],
                                           args=[token, int(ttl_s * 1000),
                                                 "1" if may_continue else "0"]))


def holder(job_id: int, attempt: int) -> str:
    """What a reservation holds: one attempt of one job, so that a stale message of an
    earlier attempt can never release the GPUs of the current one."""
    return f"{job_id}.{attempt}"


def _script(r: redis.Redis, source: str) -> Any:
    """The script registered on this client (sent by SHA after the first call)."""
    scripts: dict[str, Any] = r.__dict__.setdefault("_gpuq_scripts", {})
    if source not in scripts:
        scripts[source] = r.register_script(source)
    return scripts[source]


def reserve(r: redis.Redis, host: str, gpu_ids: Sequence[int], token: str, ttl_s: int) -> bool:
    hold_keys = [keys.hold(host, i) for i in gpu_ids]
    alive_keys = [keys.alive(host, i) for i in gpu_ids]
    return bool(_script(r, _RESERVE)(keys=[*hold_keys, *alive_keys], args=[token, ttl_s]))


def release(r: redis.Redis, host: str, gpu_ids: Sequence[int], token: str) -> int:
    return int(_script(r, _RELEASE)(keys=[keys.hold(host, i) for i in gpu_ids], args=[token]))


def refresh(r: redis.Redis, host: str, gpu_ids: Sequence[int], token: str, ttl_s: int) -> None:
    _script(r, _REFRESH)(keys=[keys.hold(host, i) for i in gpu_ids], args=[token, ttl_s])


@dataclass
class HostView:
    """One host's GPUs as the dispatcher sees them during one pass."""

    name: str
    capacity: int
    free: list[int] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)  # every GPU it registered
    # GPUs that are free or will be once a gpuq job ends: worker alive, not used by others.
    serving: list[int] = field(default_factory=list)
    foreign: list[int] = field(default_factory=list)  # used by processes outside gpuq
    down: list[int] = field(default_factory=list)  # their worker's heartbeat stopped


INVENTORY_TTL_S = 1.0  # hosts and their GPU lists change rarely: re-read once a second


def _inventory(r: redis.Redis) -> list[tuple[str, list[int]]]:
    """Registered hosts and their GPU indices, cached on the client for a second."""
    cached = r.__dict__.get("_gpuq_inventory")
    if cached is not None and time.monotonic() - cached[0] < INVENTORY_TTL_S:
        return list(cached[1])
    hosts = sorted(h.decode() for h in r.smembers(keys.HOSTS))  # type: ignore[union-attr]
    pipe = r.pipeline(transaction=False)
    for host in hosts:
        pipe.hkeys(keys.host_gpus(host))
    inventory = [(host, sorted(int(i) for i in indices))
                 for host, indices in zip(hosts, pipe.execute(), strict=True) if indices]
    r.__dict__["_gpuq_inventory"] = (time.monotonic(), inventory)
    return inventory


def read_hosts(r: redis.Redis) -> list[HostView]:
    """Registered hosts with their free GPUs: worker alive, not held in Redis, and not used
    by processes outside gpuq according to the latest monitor reading. (The dispatcher takes
    out the GPUs the database says are held, read in its own transaction.)"""
    inventory = _inventory(r)
    pipe = r.pipeline(transaction=False)
    for host, indices in inventory:
        for i in indices:
            pipe.exists(keys.alive(host, i))
            pipe.exists(keys.hold(host, i))
            pipe.get(keys.reading(host, i))
    flags = iter(pipe.execute())
    views = []
    for host, indices in inventory:
        view = HostView(host, len(indices), indices=list(indices))
        for i in indices:
            alive, held_here, reading = next(flags), next(flags), next(flags)
            if not alive:
                view.down.append(i)
            elif _foreign(reading):
                view.foreign.append(i)
            else:
                view.serving.append(i)
                if not held_here:
                    view.free.append(i)
        views.append(view)
    return views


def _foreign(reading: bytes | None) -> bool:
    return reading is not None and bool(json.loads(reading).get("foreign"))


# After Redis lost the inventory, each GPU worker puts its own GPU back at its next beat:
# for this long a host may show fewer GPUs than it has, and no job is refused for it.
INVENTORY_SETTLE_S = 20.0


def inventory_settled(r: redis.Redis) -> bool:
    """Whether the registered inventory can be trusted to say what never fits."""
    since = r.get(keys.INVENTORY_SINCE)
    return isinstance(since, bytes) and time.time() - float(since) >= INVENTORY_SETTLE_S


def largest_host(r: redis.Redis) -> int | None:
    """GPUs of the largest registered host, None while no host has registered (or the
    inventory is being rebuilt after Redis lost it)."""
    if not inventory_settled(r):
        return None
    hosts = [h.decode() for h in r.smembers(keys.HOSTS)]  # type: ignore[union-attr]
    sizes = [int(r.hlen(keys.host_gpus(h))) for h in hosts]  # type: ignore[arg-type]
    return max(sizes) if sizes else None


# -- written by a host's `gpuq worker` and each GPU worker --------------------------------


def register_host(r: redis.Redis, host: str, gpus: Mapping[int, dict[str, Any]]) -> None:
    """Publish a host's GPU inventory (index -> description), replacing what was there."""
    pipe = r.pipeline()
    pipe.sadd(keys.HOSTS, host)
    pipe.set(keys.INVENTORY_SINCE, 0, nx=True)
    pipe.delete(keys.host_gpus(host))
    if gpus:
        pipe.hset(keys.host_gpus(host), mapping={str(i): json.dumps(described)
                                                for i, described in gpus.items()})
    pipe.execute()


def ensure_registered(r: redis.Redis, host: str, index: int, described: dict[str, Any]) -> None:
    """Put one GPU back in its host's inventory if Redis lost it; a no-op otherwise."""
    pipe = r.pipeline(transaction=False)
    pipe.sadd(keys.HOSTS, host)
    pipe.set(keys.INVENTORY_SINCE, time.time(), nx=True)
    pipe.hsetnx(keys.host_gpus(host), str(index), json.dumps(described))
    pipe.execute()


def beat(r: redis.Redis, host: str, index: int, ttl_s: int) -> bool:
    """The worker of one GPU is alive for `ttl_s` more seconds. True when the GPU comes
    (back) to life: its worker is new, or was too slow to beat and was taken for dead, so
    that no pass since has offered it; it then asks for a pass (the dispatch request flag),
    or nothing may come to wake one."""
    key = keys.alive(host, index)
    if not r.set(key, 1, ex=ttl_s, nx=True):
        r.expire(key, ttl_s)
        return False
    r.set(keys.DISPATCH_DIRTY, 1)
    return True


def beat_cpu(r: redis.Redis, host: str, slots: int, ttl_s: int) -> None:
    """A host's CPU worker is alive, with `slots` 0-GPU jobs at once, for `ttl_s` more."""
    pipe = r.pipeline(transaction=False)
    pipe.sadd(keys.HOSTS, host)
    pipe.set(keys.cpu_slots(host), slots, ex=ttl_s)
    pipe.execute()


def stop_cpu(r: redis.Redis, host: str) -> None:
    r.delete(keys.cpu_slots(host))


def cpu_slots(r: redis.Redis) -> int:
    """The slots for 0-GPU jobs of every host whose CPU worker is alive."""
    hosts = sorted(h.decode() for h in r.smembers(keys.HOSTS))  # type: ignore[union-attr]
    if not hosts:
        return 0
    values = r.mget([keys.cpu_slots(h) for h in hosts])
    return sum(int(v) for v in values if v is not None)  # type: ignore[union-attr]


def stop_beating(r: redis.Redis, host: str, index: int) -> None:
    r.delete(keys.alive(host, index))


def is_alive(r: redis.Redis, host: str, index: int) -> bool:
    return bool(r.exists(keys.alive(host, index)))


def is_held(r: redis.Redis, host: str, index: int) -> bool:
    return bool(r.exists(keys.hold(host, index)))


def holds_all(r: redis.Redis, host: str, gpu_ids: Sequence[int], token: str) -> bool:
    """Whether `token` (an attempt, see holder) holds every one of these GPUs."""
    if not gpu_ids:
        return False
    held = r.mget([keys.hold(host, i) for i in gpu_ids])
    return all(h == token.encode() for h in held)


def holds_any(r: redis.Redis, host: str, gpu_ids: Sequence[int], token: str) -> bool:
    held = r.mget([keys.hold(host, i) for i in gpu_ids]) if gpu_ids else []
    return any(h == token.encode() for h in held)


def publish_reading(r: redis.Redis, host: str, index: int, reading: dict[str, Any],
                    ttl_s: int) -> None:
    """One GPU's latest monitor reading; `foreign` in it keeps the dispatcher away."""
    r.set(keys.reading(host, index), json.dumps({**reading, "at": time.time()}), ex=ttl_s)


def gpu_table(r: redis.Redis) -> list[dict[str, Any]]:
    """Every registered host with its GPUs: description, latest reading, whether its worker
    is alive, and the job holding it."""
    hosts = []
    for host in sorted(h.decode() for h in r.smembers(keys.HOSTS)):  # type: ignore[union-attr]
        described = r.hgetall(keys.host_gpus(host))
        gpus = []
        for index in sorted(int(i) for i in described):  # type: ignore[union-attr]
            info = json.loads(described[str(index).encode()])  # type: ignore[index]
            held = r.get(keys.hold(host, index))  # b"jobid.attempt"
            reading = r.get(keys.reading(host, index))
            gpus.append({**info, "index": index,
                         "reading": json.loads(reading) if reading else None,
                         "alive": bool(r.exists(keys.alive(host, index))),
                         "job_id": int(held.split(b".")[0]) if isinstance(held, bytes) else None})
        hosts.append({"host": host, "gpus": gpus,
                      "workers_alive": sum(g["alive"] for g in gpus)})
    return hosts


# -- attempts' outcomes, while the database cannot take them ------------------------------

OUTCOME_TTL_S = 7 * 86400


def keep_outcome(r: redis.Redis, job_id: int, attempt: int, outcome: dict[str, Any]) -> None:
    r.set(keys.outcome(job_id, attempt), json.dumps(outcome), ex=OUTCOME_TTL_S)


def kept_outcome(r: redis.Redis, job_id: int, attempt: int) -> dict[str, Any] | None:
    raw = r.get(keys.outcome(job_id, attempt))
    return json.loads(raw) if isinstance(raw, bytes) else None


def forget_outcome(r: redis.Redis, job_id: int, attempt: int) -> None:
    r.delete(keys.outcome(job_id, attempt))

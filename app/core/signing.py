"""Signed messages: with GPUQ_SECRET set, nothing on the broker runs unless a holder of the
secret sent it.

A `gpuq.op` message (an operation, sent by the remote client) and a `gpuq.run` message (an
attempt, sent by the dispatcher) carry an `auth` object: the operation's arguments as
canonical JSON, the sender's owner name, a timestamp, a random nonce, and an HMAC-SHA256
over the purpose, the operation's name and all of these. The MAC's key is derived from the
secret for that purpose alone (`derive_key`), so a MAC made for one purpose (a payload, a
result, a run message) is never accepted for another.

Operations are also fresh and one-shot: a message older (or newer) than OP_WINDOW_S by the
worker's clock is refused, and its nonce is claimed in Redis (SET NX) for twice that long,
so a copied message is refused the second time. Run messages are neither: see
`verify_run`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

from app.core import keys
from app.core.errors import MessageNotAuthentic
from app.core.identity import Actor, stack_owner

if TYPE_CHECKING:
    import redis

log = logging.getLogger("gpuq.security")

OP_PURPOSE = "gpuq.op"
RUN_PURPOSE = "gpuq.run"
# How far an operation's timestamp may be from the worker's clock: longer than any client
# waits for an answer (GPUQ_OP_TIMEOUT_S, 30 s by default), plus clock skew between hosts.
OP_WINDOW_S = 300
_FIELDS = {"args": str, "owner": str, "admin": bool, "ts": int, "nonce": str, "mac": str}
SETTING = "GPUQ_SECRET"


def derive_key(secret: str, purpose: str) -> bytes:
    """The key of one purpose, derived from the shared secret: the raw secret signs nothing."""
    return hmac.new(secret.encode(), f"gpuq key for: {purpose}".encode(),
                    hashlib.sha256).digest()


def canonical_json(value: Any) -> str:
    """One text for one value: sorted keys, no spaces, ASCII only; anything JSON has no
    type for (a path) as its text, which is what the operation validates anyway. The text
    itself travels, signed, so the receiver never has to re-encode what it got."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      default=str)


def _mac(secret: str, purpose: str, name: str, auth: dict[str, Any]) -> str:
    signed = canonical_json([purpose, name, auth["args"], auth["owner"], auth["admin"],
                             auth["ts"], auth["nonce"]])
    return hmac.new(derive_key(secret, purpose), signed.encode(), hashlib.sha256).hexdigest()


def sign(secret: str, purpose: str, name: str, arguments: Any, actor: Actor) -> dict[str, Any]:
    """The `auth` object of a message: its arguments (as canonical JSON), whom it acts for
    (a name and whether an admin: the dashboard sends a named user's operations this way),
    when, a nonce, and their MAC."""
    auth: dict[str, Any] = {"args": canonical_json(arguments), "owner": actor.name,
                            "admin": actor.admin, "ts": int(time.time()),
                            "nonce": secrets.token_hex(16)}
    auth["mac"] = _mac(secret, purpose, name, auth)
    return auth


def _refuse(purpose: str, why: str) -> MessageNotAuthentic:
    error = MessageNotAuthentic(f"{purpose} message refused: {why}")
    log.warning("%s", error)
    return error


def verify(secret: str | None, purpose: str, name: object, auth: object
           ) -> tuple[Actor, Any]:
    """The actor and arguments of an authentic message; MessageNotAuthentic for one that is
    unsigned (while `secret` is set), signed while no secret is set here, malformed, or
    whose MAC does not verify."""
    if not secret:
        raise _refuse(purpose, f"it is signed, but {SETTING} is not set here; set the same "
                      "secret on every client and worker")
    if auth is None:
        raise _refuse(purpose, f"it is not signed, and this worker has {SETTING} set; send it "
                      f"with gpuq (its client, CLI or dashboard) and the same {SETTING}")
    if (not isinstance(auth, dict) or set(auth) != set(_FIELDS) or not isinstance(name, str)
            or not all(type(auth[k]) is t for k, t in _FIELDS.items())):
        raise _refuse(purpose, "its signature is malformed")
    if not hmac.compare_digest(_mac(secret, purpose, name, auth), auth["mac"]):
        raise _refuse(purpose, f"its signature does not verify with {SETTING} (forged, "
                      "altered, or signed with another secret)")
    try:
        arguments = json.loads(auth["args"])
    except ValueError:
        raise _refuse(purpose, "its arguments are not JSON") from None
    return Actor(auth["owner"], auth["admin"]), arguments


def verify_op(r: redis.Redis, secret: str | None, name: object, auth: object,
              now: float | None = None) -> tuple[Actor, Any]:
    """The actor and arguments of an authentic, fresh operation message, seen for the first
    time; MessageNotAuthentic otherwise. The MAC is checked first, so that forged messages
    cannot use up nonces."""
    actor, arguments = verify(secret, OP_PURPOSE, name, auth)
    assert isinstance(auth, dict)
    now = time.time() if now is None else now
    if abs(now - auth["ts"]) > OP_WINDOW_S:
        raise _refuse(OP_PURPOSE, f"it was signed {now - auth['ts']:+.0f} s from this "
                      f"worker's clock, beyond {OP_WINDOW_S} s (replayed, or a clock is wrong: "
                      "keep the hosts' clocks synchronised)")
    if not r.set(keys.op_nonce(auth["nonce"]), 1, nx=True, ex=2 * OP_WINDOW_S):
        raise _refuse(OP_PURPOSE, "its nonce was seen before (a replayed message)")
    return actor, arguments


def run_message(secret: str | None, job_id: int, attempt: int) -> list[Any]:
    """The arguments of a `gpuq.run` message: signed by this process's owner when a secret
    is set."""
    if not secret:
        return [job_id, attempt]
    return [job_id, attempt, sign(secret, RUN_PURPOSE, "run", [job_id, attempt],
                                  stack_owner())]


def verify_run(secret: str | None, job_id: object, attempt: object, auth: object) -> str:
    """The sender's owner name of an authentic run message for this (job id, attempt);
    MessageNotAuthentic otherwise.

    A run message is bound to its (job id, attempt) but has no time window and no one-shot
    nonce: it may wait in its GPU's queue for hours, and the broker may deliver it again
    (a worker that died holding it, a visibility timeout), so either would lose jobs.
    Replaying one gains nothing: the attempt starts only by the database's conditional claim
    of that (job id, attempt), which succeeds once, and a message for a job not dispatched
    with that attempt runs nothing."""
    actor, arguments = verify(secret, RUN_PURPOSE, "run", auth)
    if arguments != [job_id, attempt]:
        raise _refuse(RUN_PURPOSE, "its signature is for another job or attempt")
    return actor.name

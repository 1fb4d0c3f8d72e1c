"""Who is asking: the actor an operation runs for.

The stack's owner (the OS user who runs `gpuq up` or `gpuq worker`) acts through the local
transport and through control messages signed with GPUQ_SECRET, and may touch every job.
Every other user is a named gpuq user who shows a token; such a user sees and touches only
their own jobs unless made an admin. `sees` is that rule, the one every read asks
(app/ops/visibility.py applies it to queries, rows and tables).
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class Actor:
    """A user on whose behalf an operation runs."""

    name: str
    admin: bool = False

    def may_touch(self, owner: str) -> bool:
        """True when this actor may see or change a job owned by `owner`."""
        return sees(self, owner)


def sees_everyone(actor: Actor | None) -> bool:
    """Whether `actor` sees every user's jobs, names and usage: the stack's owner (None
    stands for them) and admins do."""
    return actor is None or actor.admin


def sees(actor: Actor | None, owner: str) -> bool:
    """Whether `actor` may see (and touch) what `owner` owns: a job, a launch, a user's
    usage. A named user who is not an admin sees their own only; of another's jobs they
    learn at most that some exist, never an id, name, command or owner."""
    return sees_everyone(actor) or (actor is not None and owner == actor.name)


@cache
def stack_owner() -> Actor:
    """The OS user this process runs as, with every right over the stack it runs."""
    return Actor(pwd.getpwuid(os.geteuid()).pw_name, admin=True)

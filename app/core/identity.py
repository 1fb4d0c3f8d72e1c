"""Who is asking: the actor an operation runs for.

The stack's owner (the OS user who runs `gpuq up` or `gpuq worker`) acts through the local
transport and through control messages signed with GPUQ_SECRET, and may touch every job.
Every other user is a named gpuq user who shows a token; such a user sees and touches only
their own jobs unless made an admin.
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
        return self.admin or owner == self.name


@cache
def stack_owner() -> Actor:
    """The OS user this process runs as, with every right over the stack it runs."""
    return Actor(pwd.getpwuid(os.geteuid()).pw_name, admin=True)

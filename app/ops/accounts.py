"""Operations on the accounting record (app/store/accounting.py): report."""

from __future__ import annotations

import time
from typing import Any

from app.core.errors import InvalidArguments
from app.core.identity import Actor
from app.ops.registry import operation
from app.ops.rows import Report, iso
from app.ops.visibility import kept_to
from app.runtime import Runtime
from app.store import accounting


@operation
def report(rt: Runtime, since: str = "7d", by: str = "user", actor: Actor | None = None
           ) -> dict[str, Any]:
    """GPU use of the attempts that ended within `since` (7d, 12h, 30m, 90s), added up by
    user, project or launch: GPU-hours, jobs, success rate, mean wait, mean utilisation and
    peak memory. A named user who is not an admin sees their own attempts only."""
    if by not in accounting.GROUPS:
        raise InvalidArguments(f"unknown --by {by!r}; choose one of "
                               f"{', '.join(accounting.GROUPS)}")
    start = max(0.0, time.time() - accounting.seconds(since))  # a span beyond 1970: all
    owner = kept_to(actor)
    with rt.session() as session:
        groups = accounting.report(session, start, by, owner)
    return Report.model_validate({"since": iso(start), "by": by, "groups": groups}).dump()

"""The OS account a named user's jobs run as.

A stack run by root runs each named user's jobs as that user's own OS account, so that one
user's job cannot read another's files nor the stack's secrets. A stack run by anyone else
cannot switch accounts: its named users' jobs run as the stack's own account, which the
owner must choose explicitly (`--same-account`), since such jobs can read GPUQ_HOME.
"""

from __future__ import annotations

import pwd
import shutil
from dataclasses import dataclass, field
from functools import cache

from app.core.errors import InvalidArguments

SAME_ACCOUNT_WARNING = ("{name}'s jobs run as the stack's own OS account ({stack}) and can "
                        "read the stack's secrets (GPUQ_HOME, its database and Redis password)")


LOGIN_DEFS = "/etc/login.defs"
DEFAULT_UMASK = 0o022  # login's own default where login.defs names none


@cache
def login_umask(path: str = LOGIN_DEFS) -> int:
    """The umask a login on this host starts with (login.defs' UMASK): what a job run as
    an account starts with too, whatever the worker's own is."""
    try:
        with open(path) as f:
            for line in f:
                words = line.partition("#")[0].split()
                if len(words) == 2 and words[0] == "UMASK":
                    return int(words[1], 8) & 0o777
    except (OSError, ValueError):
        pass
    return DEFAULT_UMASK


@dataclass(frozen=True)
class RunAs:
    """An OS account to run a job as, as `pwd` knew it when asked, and the umask its jobs
    start with."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str = "/bin/sh"
    umask: int = field(default_factory=login_umask)

    @classmethod
    def of(cls, entry: pwd.struct_passwd) -> RunAs:
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir,
                   entry.pw_shell or "/bin/sh")


def os_account(name: str) -> pwd.struct_passwd | None:
    """The OS account named `name`, or None where there is none."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def choose_account(user: str, os_user: str | None, same_account: bool,
                   as_root: bool) -> str | None:
    """The OS account a new named user's jobs run as (None: the stack's own account, which
    only `same_account` gives). `as_root`: whether the stack runs as root, the only stack
    that can run a job as another account. Refusals name the fix."""
    if same_account:
        if os_user is not None:
            raise InvalidArguments("give --os-user NAME or --same-account, not both")
        return None
    if not as_root:
        raise InvalidArguments(
            f"this stack does not run as root, so it cannot run {user}'s jobs as another OS "
            f"account: run it as root, or add the user with --same-account (their jobs then "
            f"run as the stack's own account and can read its secrets)")
    account = os_user or user
    entry = os_account(account)
    if entry is None:
        fix = f"`useradd {account}`" + ("" if os_user else ", or give --os-user NAME")
        raise InvalidArguments(f"no OS account named {account!r} for {user}'s jobs: {fix}")
    if entry.pw_uid == 0:
        raise InvalidArguments(f"a named user's jobs may not run as root ({account!r} has "
                               "uid 0): give --os-user an unprivileged account")
    return entry.pw_name


@cache
def setpriv_path() -> str | None:
    """util-linux's setpriv, looked up once per process (it runs at every job's start)."""
    return shutil.which("setpriv")


def as_account(account: RunAs) -> list[str]:
    """The argv prefix that runs the rest as `account` (its uid, gid and groups), with
    SIGKILL when its parent dies (it is the job's leader: a worker that dies must not leave
    it running unwatched)."""
    setpriv = setpriv_path()
    if setpriv is None:
        raise OSError("setpriv (util-linux) is missing: a job cannot run as its owner")
    return [setpriv, f"--reuid={account.uid}", f"--regid={account.gid}", "--init-groups",
            "--pdeathsig", "KILL", "--"]


def account_environment(account: RunAs, env: dict[str, str]) -> dict[str, str]:
    """A job's environment with the account's own HOME, USER, LOGNAME and SHELL."""
    return {**env, "HOME": account.home, "USER": account.name, "LOGNAME": account.name,
            "SHELL": account.shell}

"""One error base; each error names a fact and, where there is one, the fix.

Every class is registered by its `code` as it is defined, so that an error that crossed
the remote transport as (code, message) comes back as its own class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from pathlib import Path

ERRORS_BY_CODE: dict[str, type[GpuqError]] = {}


class GpuqError(Exception):
    """Base of every error gpuq raises on purpose."""

    code: ClassVar[str] = "gpuq_error"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "code" not in cls.__dict__:
            raise TypeError(f"{cls.__name__} needs a `code` of its own")
        if cls.code in ERRORS_BY_CODE:
            raise TypeError(f"{cls.__name__}: code {cls.code!r} is taken by "
                            f"{ERRORS_BY_CODE[cls.code].__name__}")
        ERRORS_BY_CODE[cls.code] = cls


ERRORS_BY_CODE[GpuqError.code] = GpuqError


# Bad input


class InvalidJobSpec(GpuqError):
    code = "invalid_job_spec"


class JobsFileError(InvalidJobSpec):
    """A line of the watched jobs file that cannot be read; `lineno` names it."""

    code = "jobs_file_error"

    def __init__(self, message: str, lineno: int | None = None) -> None:
        super().__init__(message if lineno is None else f"line {lineno}: {message}")
        self.lineno = lineno


class InvalidArguments(GpuqError):
    """An operation was called with arguments it does not take."""

    code = "invalid_arguments"


class UnknownOperation(GpuqError):
    code = "unknown_operation"


class DuplicateJob(GpuqError):
    code = "duplicate_job"


class PayloadTooLarge(GpuqError):
    code = "payload_too_large"


class PayloadError(GpuqError):
    """A stored payload that is missing, malformed or of an unknown format."""

    code = "payload_error"


class PayloadNotAuthentic(PayloadError):
    """A payload that does not verify with the shared secret: refused unread."""

    code = "payload_not_authentic"


class MessageNotAuthentic(GpuqError):
    """A control or run message that is unsigned, signed with another secret, stale or
    replayed: refused before anything runs."""

    code = "message_not_authentic"


# Things that are not there


class JobNotFound(GpuqError):
    code = "job_not_found"

    @classmethod
    def for_ids(cls, job_ids: list[int]) -> JobNotFound:
        shown = ", ".join(str(i) for i in job_ids[:10])
        return cls(f"no job with id {shown}; `gpuq queue` lists the jobs there are")


class LaunchNotFound(GpuqError):
    code = "launch_not_found"


class IllegalTransition(GpuqError):
    code = "illegal_transition"


class UserNotFound(GpuqError):
    code = "user_not_found"


# Who may do what


class NotPermitted(GpuqError):
    """A named user asked to see or change what is another user's (a job, a launch)."""

    code = "not_permitted"

    @classmethod
    def for_jobs(cls, user: str, job_ids: list[int]) -> NotPermitted:
        """The refusal of reading, cancelling or running after another user's jobs: the
        same words wherever it is met, and nothing of those jobs but the ids given."""
        shown = ", ".join(map(str, sorted(job_ids)[:10]))
        return cls(f"job {shown} belongs to another user; you ({user}) may see and cancel "
                   "only your own jobs (`gpuq queue` lists them)")


class InvalidToken(GpuqError):
    """A token that names no user, a revoked one's, or a token file others may read."""

    code = "invalid_token"


class UserExists(GpuqError):
    code = "user_exists"


class NoRunAccount(GpuqError):
    """A job whose owner has no OS account to run it as: an unknown or revoked user, or an
    account that is gone (app/store/users.py `run_as`). The job must not run."""

    code = "no_run_account"


class OverLimit(GpuqError):
    """A submission that would put a user or a project over its pending limit."""

    code = "over_limit"


class RemoteError(GpuqError):
    """A function job raised an exception that could not be rebuilt here."""

    code = "remote_error"


# Servers gpuq needs


class BrokerUnavailable(GpuqError):
    code = "broker_unavailable"


class DatabaseUnavailable(GpuqError):
    code = "database_unavailable"


class SchemaOutdated(DatabaseUnavailable):
    """The database's schema is behind this gpuq's: `gpuq db upgrade` brings it up."""

    code = "schema_outdated"


class SchemaTooNew(DatabaseUnavailable):
    """The database's schema is a revision this gpuq does not know: a newer gpuq made it."""

    code = "schema_too_new"


class OperationTimeout(GpuqError):
    code = "operation_timeout"


# Refusals to serve beyond this host unprotected


class EmbeddedRedisExposed(GpuqError):
    """The embedded Redis would listen beyond this host without a password."""

    code = "embedded_redis_exposed"


class FlowerAuthRequired(GpuqError):
    """Flower would listen beyond this host without a password."""

    code = "flower_auth_required"


class SecretRequired(GpuqError):
    """A worker would take messages from a Redis beyond this host without GPUQ_SECRET."""

    code = "secret_required"


def error_from_envelope(code: str, message: str) -> GpuqError:
    """Rebuild an error that crossed the remote transport as (code, message)."""
    return ERRORS_BY_CODE.get(code, GpuqError)(message)


class HostAlreadyRunning(GpuqError):
    """Another `gpuq worker` or `gpuq up` runs this host's GPU workers."""

    code = "host_already_running"


# Where gpuq keeps its state: the home's disk and the SQLite file in it


class HomeNotWritable(GpuqError):
    """GPUQ_HOME is on a read-only file system, or its owner may not write it."""

    code = "home_not_writable"


class DiskFull(GpuqError):
    """The disk GPUQ_HOME is on has no space left."""

    code = "disk_full"


class DatabaseCorrupt(DatabaseUnavailable):
    """The SQLite file is not a database, or a damaged one."""

    code = "database_corrupt"


# SQLite's words for a file that is not (or no longer) a database.
_CORRUPT_WORDS = ("file is not a database", "database disk image is malformed")
# Below this much free space a write to the home is taken to have failed for want of it.
FULL_BELOW_BYTES = 1 << 20


def _causes(error: BaseException) -> list[BaseException]:
    """The error, what it was raised from, and the driver's error a SQLAlchemy one wraps."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__, getattr(e, "orig", None)]
    return seen


def state_fault(error: BaseException, home: Path, database: Path | None) -> GpuqError | None:
    """One line naming the file and the fix when `error` came from the state gpuq keeps on
    disk: a GPUQ_HOME that cannot be written, its disk full, or a SQLite file (`database`,
    None on PostgreSQL) that is not a database. None when it is none of these."""
    import errno
    import os

    causes = _causes(error)
    numbers = {getattr(e, "errno", None) for e in causes if isinstance(e, OSError)}
    text = " ".join(str(e) for e in causes)
    # A write refused (SQLite says so in words): the home is not this user's to write.
    refused = bool(numbers & {errno.EACCES, errno.EPERM}) or any(
        words in text for words in ("readonly database", "unable to open database file"))
    try:
        disk = os.statvfs(home)
        read_only = bool(disk.f_flag & os.ST_RDONLY) or (
            refused and not os.access(home, os.W_OK))
        free_bytes = disk.f_bavail * disk.f_frsize
    except OSError:  # no home yet: nothing of it to diagnose
        read_only, free_bytes = False, FULL_BELOW_BYTES
    if read_only or errno.EROFS in numbers:
        return HomeNotWritable(
            f"GPUQ_HOME {home} cannot be written (a read-only file system, or not yours to "
            "write); gpuq keeps its database, logs and the embedded Redis there: make it "
            "writable (remount it read-write, `chmod u+w`), or set GPUQ_HOME to a directory "
            "you can write")
    if (free_bytes < FULL_BELOW_BYTES or errno.ENOSPC in numbers
            or "database or disk is full" in text):
        return DiskFull(
            f"the disk of GPUQ_HOME {home} is full ({free_bytes:,} bytes free); free space "
            f"there (`df -h {home}`; job logs are in {home / 'logs'}), or set GPUQ_HOME to a "
            "directory on another disk")
    if database is not None and any(words in text for words in _CORRUPT_WORDS):
        return DatabaseCorrupt(
            f"the database {database} is damaged ({next(w for w in _CORRUPT_WORDS if w in text)}"
            f"); restore it from a backup, or move it aside (`mv {database} "
            f"{database}.damaged`) and gpuq starts an empty one: its jobs are then forgotten")
    return None

"""One error base; each error names a fact and, where there is one, the fix.

Every class is registered by its `code` as it is defined, so that an error that crossed
the remote transport as (code, message) comes back as its own class.
"""

from __future__ import annotations

from typing import ClassVar

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


class InvalidToken(GpuqError):
    """A token that names no user, a revoked one's, or a token file others may read."""

    code = "invalid_token"


class UserExists(GpuqError):
    code = "user_exists"


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

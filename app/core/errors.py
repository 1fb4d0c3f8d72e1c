"""One error base; each error names a fact and, where there is one, the fix."""

from __future__ import annotations


class GpuqError(Exception):
    """Base of every error gpuq raises on purpose."""

    code = "gpuq_error"


class InvalidJobSpec(GpuqError):
    code = "invalid_job_spec"


class JobNotFound(GpuqError):
    code = "job_not_found"

    @classmethod
    def for_ids(cls, job_ids: list[int]) -> JobNotFound:
        shown = ", ".join(str(i) for i in job_ids[:10])
        return cls(f"no job with id {shown}; `gpuq queue` lists the jobs there are")


class DuplicateJob(GpuqError):
    code = "duplicate_job"


class PayloadTooLarge(GpuqError):
    code = "payload_too_large"


class RemoteError(GpuqError):
    """A function job raised an exception that could not be rebuilt here."""

    code = "remote_error"


class LaunchNotFound(GpuqError):
    code = "launch_not_found"


class IllegalTransition(GpuqError):
    code = "illegal_transition"


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


class UnknownOperation(GpuqError):
    code = "unknown_operation"


class OperationTimeout(GpuqError):
    code = "operation_timeout"


class InvalidArguments(GpuqError):
    """An operation was called with arguments it does not take."""

    code = "invalid_arguments"


ERRORS_BY_CODE: dict[str, type[GpuqError]] = {
    cls.code: cls
    for cls in (
        GpuqError,
        InvalidJobSpec,
        DuplicateJob,
        JobNotFound,
        PayloadTooLarge,
        RemoteError,
        LaunchNotFound,
        IllegalTransition,
        BrokerUnavailable,
        DatabaseUnavailable,
        SchemaOutdated,
        SchemaTooNew,
        UnknownOperation,
        OperationTimeout,
        InvalidArguments,
    )
}


def error_from_envelope(code: str, message: str) -> GpuqError:
    """Rebuild an error that crossed the remote transport as (code, message)."""
    return ERRORS_BY_CODE.get(code, GpuqError)(message)

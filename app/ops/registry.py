"""The operations registry: every operation by name, called on arguments that may come from
the network (checked first), by either transport.

Every operation takes the process's Runtime and JSON-able keyword arguments and returns a
JSON-able dict, so that the same function serves both transports: called directly in
local mode, or run by the control worker as the `gpuq.op` task in remote mode. An operation
that declares an `actor` parameter is told who calls it (app/core/identity.py); the caller
never gives it as an argument.

Operations load by name: a call imports the one module its operation lives in (MODULES), so
that `gpuq queue` pays for the reads and not for submission, cancelling and accounting.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import typing
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from app.core.errors import InvalidArguments, UnknownOperation
from app.core.identity import Actor, stack_owner

if TYPE_CHECKING:
    from app.runtime import Runtime

log = logging.getLogger(__name__)

Operation = Callable[..., dict[str, Any]]
# The module of each operation. An operation missing here still runs (a call to a name not
# listed loads every module below), only slower; tests/unit/test_import_sets.py keeps it whole.
MODULES: dict[str, str] = {
    "queue": "app.ops.read", "job": "app.ops.read", "launches": "app.ops.read",
    "logs": "app.ops.read", "status": "app.ops.read",
    "submit": "app.ops.submit", "submit_many": "app.ops.submit", "launch": "app.ops.submit",
    "dispatch": "app.ops.submit",
    "cancel": "app.ops.cancel",
    "update": "app.ops.update",
    "report": "app.ops.accounts",
    "why": "app.ops.shares", "limits_table": "app.ops.shares", "set_limits": "app.ops.shares",
    "clear_limits": "app.ops.shares",
    "add_project": "app.ops.projects", "project_members": "app.ops.projects",
    "list_projects": "app.ops.projects",
}
# The operations loaded so far, by name.
OPERATIONS: dict[str, Operation] = {}
# The parameter an operation declares to be told who calls it; never a network argument.
ACTOR = "actor"


def operation(fn: Operation) -> Operation:
    OPERATIONS[fn.__name__] = fn
    return fn


def load_all() -> dict[str, Operation]:
    """Every operation, each module imported."""
    for module in sorted(set(MODULES.values())):
        importlib.import_module(module)
    return OPERATIONS


def _loaded(name: str) -> Operation | None:
    """The operation called `name`, its module imported on first use; None if none is."""
    if name in MODULES:
        importlib.import_module(MODULES[name])
    if name not in OPERATIONS:
        load_all()
    return OPERATIONS.get(name)


def call_local(rt: Runtime, name: object, kwargs: object,
               actor: Actor | None = None) -> dict[str, Any]:
    """Run an operation for `actor` (the stack's owner when None) on arguments that may come
    from the network: an unknown name or arguments the operation does not take are refused
    before anything runs."""
    actor = actor or stack_owner()
    if not isinstance(name, str) or _loaded(name) is None:
        raise UnknownOperation(
            f"unknown operation {name!r}; known: {', '.join(sorted(load_all()))}")
    if not isinstance(kwargs, dict):
        raise InvalidArguments(f"operation {name!r} takes an object of named arguments, not "
                               f"{type(kwargs).__name__}; it takes {_described(name)}")
    model = _arguments(name)
    try:
        checked = model.model_validate(kwargs)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: "
                             f"{err['msg']}" for err in e.errors())
        raise InvalidArguments(f"operation {name!r}: {problems}; it takes "
                               f"{_described(name)}") from None
    given = {field: getattr(checked, field) for field in model.model_fields}
    if _takes_actor(name):
        given[ACTOR] = actor
    return OPERATIONS[name](rt, **given)


@cache
def _takes_actor(name: str) -> bool:
    return ACTOR in inspect.signature(OPERATIONS[name]).parameters


def _parameters(name: str) -> list[inspect.Parameter]:
    """An operation's network arguments: every parameter after the Runtime but the actor."""
    return [p for p in list(inspect.signature(OPERATIONS[name]).parameters.values())[1:]
            if p.name != ACTOR]


@cache
def _arguments(name: str) -> type[BaseModel]:
    """A model of an operation's keyword arguments, from its signature."""
    fn = OPERATIONS[name]
    hints = typing.get_type_hints(fn)
    fields: dict[str, Any] = {
        p.name: (hints[p.name], ... if p.default is inspect.Parameter.empty else p.default)
        for p in _parameters(name)}
    return create_model(f"{name}_arguments", __config__=ConfigDict(extra="forbid"), **fields)


def _described(name: str) -> str:
    params = _parameters(name)
    return ", ".join(p.name if p.default is inspect.Parameter.empty else f"{p.name}="
                     f"{p.default!r}" for p in params) or "no arguments"

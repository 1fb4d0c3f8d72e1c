"""The operations layer: plain functions in one registry, called locally or over Celery.

Importing the package registers every operation; `call_local` runs one by name.
"""

from app.ops import accounts, cancel, read, shares, submit
from app.ops.registry import OPERATIONS, call_local

__all__ = ["OPERATIONS", "accounts", "call_local", "cancel", "read", "shares", "submit"]

"""What a submitting user imports: the client and its job handles."""

from app.client.client import Client, JobHandle, LaunchHandle

__all__ = ["Client", "JobHandle", "LaunchHandle"]

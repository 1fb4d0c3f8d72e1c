"""The system of record (the database) and the cluster's live state (Redis)."""

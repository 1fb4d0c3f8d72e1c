"""The control plane: allocation, reconciliation, the restart policy."""

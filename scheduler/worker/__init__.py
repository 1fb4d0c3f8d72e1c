"""One GPU host's worker side: running attempts, heartbeats, the GPU monitor."""

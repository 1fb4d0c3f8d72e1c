"""gpuq's schema revisions, oldest first: 0001 is the schema of gpuq 0.1."""

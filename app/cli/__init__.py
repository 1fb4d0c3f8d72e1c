"""`gpuq`, the command line."""

"""Process supervision on one host: `gpuq up` and `gpuq worker`, server side only."""

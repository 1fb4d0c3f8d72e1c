"""gpuq's vocabulary: settings, errors, states, keys, paths, payloads. No SQL, no Celery."""

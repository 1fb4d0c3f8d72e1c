"""Batch backends behind one submit / poll / cancel contract, and the universal runner.

Empty on purpose: `python -m adapters.runner` must load only the runner. The backends are
listed in app/core/backends.py and imported on first use.
"""

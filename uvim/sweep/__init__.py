"""Hyper-parameter sweeps over config overrides: plan, run (here or on a cluster), report.

See `python -m uvim.sweep --help` and docs/sweeps.md.
"""

"""Reproductions of the attacks of issue 8, each printing a before/after figure.

Run one against any checkout: ``PYTHONPATH=<checkout> python -m benchmarks.hardening.<name>``
(from this repository's root, so the scripts themselves are found). Loopback only.
"""

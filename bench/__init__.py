"""Benchmarks: devicemem measured against the baselines a user would otherwise run.

Run ``python -m bench [--quick] [--only NAME]``; see bench/README.md. Every configuration
runs in a fresh child process (``bench.child``) under a real memory cap, so each number is
a measurement of one process: wall time around the sampling call, peak RSS via ``wait4``.
"""

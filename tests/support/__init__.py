"""Helpers the test-suite and the benchmarks share (not shipped with the package).

- :mod:`tests.support.child`: run a command in a child process under a real memory cap and
  measure its peak RSS, the basis of every memory claim the tests and bench make.
"""

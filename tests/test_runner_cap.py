"""A real cap: a posterior-predictive workload whose full vectorised batch needs more than twice
the cap. devicemem completes under the cap; plain pyro.infer.Predictive(parallel=True) fails.

The workload (tests/cap_workload.py) draws S=150 samples of a Normal observation site
[1000, 1000] with per-cell latents; devicemem streams its mean/var. Each child re-imports torch
(~0.63 GB of address space), so the RLIMIT_AS cap is 1 GiB.
"""

import os
import sys
from pathlib import Path

import pytest

from tests.support.child import cgroup_unavailable_reason, run_child

CAP = 1 << 30
ROOT = Path(__file__).resolve().parents[1]
WORK = ["1000", "1000", "150"]


def _run(mode: str, cap: int, method: str):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return run_child([sys.executable, "-m", "tests.cap_workload", mode, *WORK], cap_bytes=cap, cap_method=method,
                     env=env, cwd=ROOT, timeout=300)


def _assert_devicemem_completes(result):
    assert result.ok, result.stderr[-3000:]
    _, peak, sizes = result.stdout.split()
    batch_sizes = [int(size) for size in sizes.split(",")]
    assert sum(batch_sizes) == 150 and len(batch_sizes) > 1
    assert int(peak) < CAP and result.peak_rss_bytes < CAP


@pytest.mark.slow
def test_under_rlimit_as_devicemem_completes_and_pyro_fails_even_at_twice_the_cap():
    _assert_devicemem_completes(_run("devicemem", CAP, "rlimit"))
    pyro_run = _run("pyro", 2 * CAP, "rlimit")
    assert not pyro_run.ok
    assert "DefaultCPUAllocator: can't allocate memory" in pyro_run.stderr


@pytest.mark.slow
def test_under_a_memory_cgroup_devicemem_completes_and_pyro_is_killed():
    reason = cgroup_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    result = _run("devicemem", CAP, "cgroup")
    assert result.cap_method.startswith("cgroup")
    _assert_devicemem_completes(result)
    pyro_run = _run("pyro", CAP, "cgroup")
    assert pyro_run.killed and not pyro_run.ok

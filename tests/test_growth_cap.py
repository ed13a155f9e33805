"""Issue 13: a model whose memory grows with the square of the batch (a [B, B, N, T]
intermediate under the sample plate, as bayesDREAM's trans model builds) completes under a
real memory cgroup. Before, the probe drew a line through two small batches, predicted 142 MB
for one batch of all 400 samples, which needed 12.8 GB, and the child was killed at 1.5 GiB.
Now the probe sees the growth, fits a parabola, and the run ramps up from the largest probed
batch; the plan's predicted peak for its batch is checked against the measured one."""

import os
import sys
from pathlib import Path

import pytest

from tests.support.child import cgroup_unavailable_reason, run_child

CAP = 3 << 29  # 1.5 GiB
ROOT = Path(__file__).resolve().parents[1]
WORK = ["100", "100", "400"]  # N, T, S: B samples need about B * B * 40 kB


def _run(mode: str):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return run_child([sys.executable, "-m", "tests.growth_workload", mode, *WORK], cap_bytes=CAP,
                     cap_method="cgroup", env=env, cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_quadratic_growth_completes_under_a_memory_cgroup_with_an_accurate_plan():
    reason = cgroup_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    result = _run("devicemem")
    assert result.ok and not result.killed, result.stderr[-3000:]
    _, batch, predicted, measured, sizes = result.stdout.split()
    batches = [int(size) for size in sizes.split(",")]
    assert sum(batches) == 400 and batches[0] < int(batch) == max(batches), "ramped up to the plan's batch"
    assert 0.9 <= int(predicted) / int(measured) <= 1.3
    assert result.peak_rss_bytes < CAP
    pyro_run = _run("pyro")
    assert pyro_run.killed and not pyro_run.ok, "one vectorised batch of 400 needs about 6.4 GB"

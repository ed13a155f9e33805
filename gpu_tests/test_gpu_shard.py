"""Issue 8's GPU check: the Ray shard path on one GPU returns what the single-device path does.

Needs Ray on the GPU machine (``pip install 'devicemem[ray]'``); skipped with that reason when
it is missing, like every test here without CUDA.
"""

from __future__ import annotations

import pytest
import torch

import devicemem
from bayesDREAM_ext.model import technical_model
from devicemem.options import RayOptions
from devicemem.seeds import batch_seed
from gpu_tests.support import technical_problem

ray = pytest.importorskip("ray", reason="Ray is not installed on this machine: pip install 'devicemem[ray]'")


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance that sees this machine's GPU 0 as its one GPU."""
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("observe", [False, True], ids=["params-only", "posterior-predictive"])
def test_one_gpu_shard_matches_the_single_device_path(local_ray, observe, figures):
    problem = technical_problem(2000, 1500)
    guide = problem.guide()
    args = problem.args  # counts None: observe=True samples y_obs
    num_samples, seed = 120, 7
    sharded = devicemem.Predictive(
        technical_model, guide=guide, num_samples=num_samples, seed=seed, device="cuda",
        backend=RayOptions(num_shards=1), minibatch_size=40, progress=False,
    )
    ours = sharded(*args, observe=observe)
    (record,) = sharded.report
    # One shard starting at sample 0 is a single-device run seeded from batch_seed(seed, 0) with
    # the plan the shard made on its GPU: the same draws, bit for bit.
    single = devicemem.Predictive(
        technical_model, guide=guide, num_samples=num_samples, seed=batch_seed(seed, 0), plan=record.plan,
        progress=False,
    )
    theirs = single(*args, observe=observe)
    figures.record(
        f"8 one-GPU shard vs single device ({'posterior predictive' if observe else 'params only'})",
        shard_device=record.device, shard_node=record.node, shard_wall_s=record.wall_s,
        shard_write_s=record.write_s, single_batches_s=sum(row.wall_s for row in single.report),
        batch_size=record.plan.batch_size, sites=sorted(ours),
    )
    assert record.device.startswith("cuda") and record.plan.device.startswith("cuda"), record
    assert single.plan.device.startswith("cuda")
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    for name in theirs:
        assert ours[name].device.type == "cpu"
        assert torch.equal(ours[name], theirs[name]), name

"""devicemem.Predictive sharded on Ray: one device's results, retried shards, per-device plans."""

import sys

import pytest
import torch

from bayesDREAM_ext.model import technical_model
from devicemem.execute.ray import ShardError, split
from devicemem.options import RayOptions
from devicemem.predictive import Predictive
from devicemem.units import parse_bytes
from tests.distributed_fakes import KillOnce, RegisterFakeGpus, indexed_model
from tests.runner_fakes import expected_from_report, make_plan

try:
    import ray
except ImportError:
    ray = None

needs_ray = pytest.mark.skipif(ray is None, reason="Ray is not installed: pip install 'devicemem[ray]'")
FAKE_GPUS = {"fake:0": parse_bytes("2GiB"), "fake:1": parse_bytes("8MiB")}


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module: 2 CPUs and the two fake GPUs' resources."""
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
        resources={f"devicemem:{name}": 1 for name in FAKE_GPUS},
    )
    yield ray
    ray.shutdown()


def _layout(samples):
    return {name: (tuple(value.shape), value.dtype) for name, value in samples.items()}


def _assert_shards_are_seeded_single_runs(samples, report, seed, model, guide, args):
    """Shard k holds exactly what a one-device run of its batches (at their indices in the whole
    run) draws: every sample index is where it belongs, none repeated, none missing."""
    assert [(r.start, r.size) for r in report] == [(a, b - a) for a, b in split(sum(r.size for r in report), len(report))]
    for record in report:
        assert sum(row.size for row in record.batches) == record.size
        expected = expected_from_report(model, guide, record.batches, seed, args)
        for name, value in expected.items():
            assert torch.equal(samples[name][record.start : record.start + record.size], value), (name, record.shard)


@needs_ray
@pytest.mark.slow
def test_four_shards_return_what_one_device_returns(local_ray, problem):
    args, guide = problem
    num_samples = 400
    runner = Predictive(technical_model, guide=guide, num_samples=num_samples, seed=1, device="cpu",
                        backend=RayOptions(num_shards=4), minibatch_size=40, progress=False)
    ours = runner(*args)
    single = Predictive(technical_model, guide=guide, num_samples=num_samples, seed=2,
                        plan=make_plan(num_samples, 40), progress=False)(*args)
    assert _layout(ours) == _layout(single)
    assert runner.plan is None
    assert [(r.shard, r.start, r.size, r.device, r.plan.device) for r in runner.report] == [
        (k, 100 * k, 100, "cpu", "cpu") for k in range(4)
    ]
    assert all(r.node == ray.util.get_node_ip_address() for r in runner.report)
    for name in single:
        a, b = ours[name].double(), single[name].double()
        error = torch.sqrt((a.var(0) + b.var(0)) / num_samples) + 1e-9
        assert ((a.mean(0) - b.mean(0)).abs() / error).max() < 5.0, name
    _assert_shards_are_seeded_single_runs(ours, runner.report, 1, technical_model, guide, args)


@needs_ray
def test_shards_fill_out_memmaps_and_merge_reducers(local_ray, tmp_path):
    common = dict(posterior_samples={"i": torch.arange(30.0)}, seed=4, device="cpu", minibatch_size=4,
                  progress=False, backend=RayOptions(num_shards=3))
    stored = Predictive(indexed_model, **common)(7)
    on_disk = Predictive(indexed_model, out=tmp_path / "draws", **common)(7)
    reduced = Predictive(indexed_model, reduce={"noise": ("mean", "var"), "index": "var"}, **common)(7)
    assert sorted(p.name for p in (tmp_path / "draws").iterdir()) == ["index.npy", "noise.npy"]
    for name, value in stored.items():
        assert torch.equal(on_disk[name], value), name
    assert set(reduced) == {"noise:mean", "noise:var", "index:var"}
    noise = stored["noise"].double()
    # each batch is reduced where it was drawn, in the samples' float32: float32's resolution
    torch.testing.assert_close(reduced["noise:mean"], noise.mean(0), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(reduced["noise:var"], noise.var(0), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(reduced["index:var"], stored["index"].double().var(0), rtol=1e-6, atol=1e-12)


@needs_ray
def test_a_killed_shard_is_retried_and_written_once(local_ray, tmp_path):
    num_samples = 60
    kill = KillOnce(tmp_path, index=2)
    runner = Predictive(indexed_model, posterior_samples={"i": torch.arange(num_samples, dtype=torch.float32)},
                        seed=0, device="cpu", backend=RayOptions(num_shards=4, worker_setup=kill),
                        progress=False)
    result = runner(5)
    assert kill.attempts() == 1
    assert torch.equal(result["index"].flatten(), torch.arange(num_samples, dtype=torch.float32))
    assert result["noise"].shape == (num_samples, 5)
    assert [(r.start, r.size) for r in runner.report] == [(0, 15), (15, 15), (30, 15), (45, 15)]


@needs_ray
@pytest.mark.slow
def test_a_shard_that_keeps_dying_is_named_in_the_error(local_ray, tmp_path):
    kill = KillOnce(tmp_path, index=1, every_attempt=True)
    runner = Predictive(indexed_model, posterior_samples={"i": torch.arange(10.0)}, device="cpu",
                        backend=RayOptions(num_shards=2, max_retries=1, worker_setup=kill), progress=False)
    with pytest.raises(ShardError, match=r"shard 1 of 2 \(samples 5:10, cpu\) failed after Ray retried it 1 time") as info:
        runner(3)
    assert info.value.shard.index == 1
    assert kill.attempts() == 2


@needs_ray
@pytest.mark.slow
def test_two_fake_gpus_each_plan_their_own_shard(local_ray):
    num_samples, width = 64, 50_000  # a sample of "noise" is 200 kB: 8 MiB holds a few
    runner = Predictive(indexed_model, posterior_samples={"i": torch.arange(float(num_samples))}, seed=3,
                        device=["fake:0", "fake:1"], backend=RayOptions(worker_setup=RegisterFakeGpus(FAKE_GPUS)),
                        progress=False)
    result = runner(width)
    assert [(r.start, r.size, r.device, r.plan.device) for r in runner.report] == [
        (0, 32, "fake:0", "fake:0"), (32, 32, "fake:1", "fake:1")
    ]
    for record in runner.report:
        assert record.plan.budget_bytes <= FAKE_GPUS[record.device]
        assert {row.device for row in record.batches} == {record.device}
    roomy, tight = (record.plan.batch_size for record in runner.report)
    assert roomy == 32 and 1 <= tight < roomy  # the 8 MiB device plans smaller batches
    assert [len(record.batches) for record in runner.report] == [1, -(-32 // tight)]
    assert torch.equal(result["index"].flatten(), torch.arange(float(num_samples)))
    assert result["noise"].shape == (num_samples, width)


@needs_ray
def test_a_device_without_its_ray_resource_fails_before_sampling(local_ray, problem):
    args, guide = problem
    runner = Predictive(technical_model, guide=guide, num_samples=4, device=["cuda:7"], backend="ray", progress=False)
    with pytest.raises(ValueError, match=r"devicemem:cuda:7.*ray start --resources"):
        runner(*args)


def test_bad_backend_and_device_lists_fail_at_construction(problem):
    args, guide = problem
    for kwargs, message in [
        ({"backend": "dask"}, "backend: expected None, 'ray' or"),
        ({"device": ["cpu", "cpu"]}, "names a device twice"),
        ({"device": []}, "device: expected"),
        ({"device": ["all", "cuda:0"]}, "stand alone"),
        ({"device": ["cuda:x"]}, "could not read device"),
        ({"backend": "ray", "plan": make_plan(4, 2)}, "plan"),
    ]:
        with pytest.raises(ValueError, match=message):
            Predictive(technical_model, guide=guide, num_samples=4, **kwargs)
    with pytest.raises(ValueError, match="num_shards"):
        RayOptions(num_shards=0)


def test_without_ray_the_error_says_how_to_install_it(problem, monkeypatch):
    args, guide = problem
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'devicemem\[ray\]'"):
        Predictive(technical_model, guide=guide, num_samples=4, backend="ray")

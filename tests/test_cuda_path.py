"""The CUDA path's device handling, proved on the CPU: the meta device (or a copying mover)
stands in for an accelerator (tensors mixed with CPU ones raise, as CUDA ones do). The
footprint probe, the IAF guide's first SVI step, the results sink and reducer, and a fitted
guide shipped to Ray shards."""

from __future__ import annotations

import functools
import time

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal
from pyro.infer.autoguide.initialization import init_to_value
from pyro.nn import PyroModule, PyroParam
from torch.overrides import TorchFunctionMode

from bayesDREAM_ext.data import prepare_technical
from bayesDREAM_ext.model import build_model_inputs
from bayesDREAM_ext.synthetic import synthetic_data
from bayesDREAM_ext.memory import plan_training
from bayesDREAM_ext.training import SVIOptions, train
from devicemem import placement
from devicemem.backends.base import Backend
from devicemem.footprint import probe_footprint
from devicemem.output.moments import Moments
from devicemem.output.sink import Sink
from devicemem.sampling import PLATE_NAME, Site
from pyro.poutine.runtime import _PYRO_STACK

MB = 10**6


def _batch() -> int:
    return next((frame.size for frame in _PYRO_STACK if getattr(frame, "name", None) == PLATE_NAME), 1)


def model(x: torch.Tensor) -> None:
    """A draw costs launch overhead plus work per sample: 10 ms + 1 ms x batch."""
    time.sleep(0.01 + 0.001 * _batch())
    with pyro.plate("items", x.shape[0], dim=-1):
        pyro.sample("z", dist.Normal(x, 1.0))


class AmortisedGuide(PyroModule):
    """z's location is a learnt weight times the data. Records where its weight's storage is
    at each run: the probe must run it with the weight on the probe's device."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = PyroParam(torch.ones(3))
        self.storages: list[int] = []

    def forward(self, x: torch.Tensor) -> None:
        self.storages.append(self.weight.data_ptr())
        with pyro.plate("items", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(self.weight * x, 1.0))


class ScriptedDevice(Backend):
    """A device whose tensors live on ``torch_device``; its peak grows 1 MB a sample."""

    kind = "cuda"

    def __init__(self, where: str) -> None:
        self.where = torch.device(where)

    def discover(self, probe):
        return []

    def torch_device(self, device):
        return self.where

    def reset_peak(self, device):
        pass

    def current_bytes(self, device):
        return 0

    def peak_bytes(self, device):
        return MB * _last_batch[0]

    def empty_cache(self, device):
        pass

    def is_oom(self, exc):
        return False


_last_batch = [0]


def recording_model(x: torch.Tensor) -> None:
    _last_batch[0] = _batch()
    model(x)


def test_probe_learns_the_guides_shapes_with_its_parameters_on_the_probe_device(monkeypatch):
    # A mover that copies stands in for a move to a GPU: a run with the weight "on the device"
    # sees another storage than the original's.
    monkeypatch.setattr(placement, "parameters_on",
                        functools.partial(placement.parameters_on, mover=lambda tensor, device: tensor.clone()))
    pyro.clear_param_store()
    guide = AmortisedGuide()
    original = guide.weight.data_ptr()
    probe_footprint(recording_model, guide, torch.zeros(3), device="cuda:0", batch_sizes=(4, 8),
                    backend=ScriptedDevice("cpu"))
    assert guide.storages and original not in guide.storages, "a guide run saw its parameters off the probe's device"
    assert guide.weight.data_ptr() == original, "the parameters are put back"


@pytest.mark.parametrize("where, device, capped", [("meta", "cuda:0", False), ("cpu", "cpu", True)])
def test_probe_timings_cap_batches_on_the_host_only(where, device, capped):
    # 10 ms + 1 ms per sample caps a host batch near 20 x 10 / 1 = 200 samples; off the host a
    # draw's time is kernel launches, not work (it runs asynchronously): no cap from timings.
    pyro.clear_param_store()
    posterior = {"z": torch.randn(128, 3)}
    with pyro.validation_enabled(False):  # argument checks would read meta tensors' values
        footprint = probe_footprint(recording_model, None, torch.zeros(3), device=device, batch_sizes=(4, 64),
                                    posterior_samples=posterior, backend=ScriptedDevice(where))
    assert footprint.per_sample_bytes == pytest.approx(1.1 * MB, rel=1e-3)
    assert (footprint.saturation_batch is not None) == capped, footprint


def test_an_iaf_guide_is_built_on_the_training_device_not_the_default_one():
    # The default device is meta; training runs on the CPU. Pyro builds AutoIAFNormal's flow in
    # its first call: on the default device it would meet the CPU data there and raise.
    raw = synthetic_data("negbinom", 60, 5, 2, seed=0)
    data = prepare_technical(raw.counts, raw.groups, distribution="negbinom")
    inputs = build_model_inputs(data)
    plan = plan_training(data.n_cells, data.n_features, data.n_groups, data.n_categories,
                         distribution=data.distribution, device="cpu", guide="iaf", safety_factor=0.8)
    with torch.device("meta"):
        result = train(inputs, plan, SVIOptions(niters=1, lr=1e-3, tolerance=0.0, alpha_ewma=0.05, progress=False))
    assert {param.device.type for param in result.guide.parameters()} == {"cpu"}


# --- results: pageable, reduced per batch; a GPU-fitted guide shipped to shards -------------


def test_results_of_a_gpu_run_are_pageable_host_memory():
    # Batches from a GPU pass through a small pinned staging buffer; the results themselves are
    # pageable (a pinned 33 GiB result would pin 64 GiB for the process's life).
    sink = Sink({"x": Site((4,), torch.float32)}, {}, 10, None, stage=True)
    sink.write(0, {"x": torch.ones(10, 4)})
    (result,) = sink.result().values()
    assert not result.is_pinned() and torch.equal(result, torch.ones(10, 4))
    assert sink.staging is not None and sink.staging.buffer is None, "host batches need no staging"


class _Recorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("batch", [5, 50])
def test_a_batch_is_reduced_where_it_is_and_sent_to_the_host_as_two_tensors(batch):
    moments = Moments()
    with _Recorder() as recorder:
        moments.update(torch.randn(batch, 30))
    assert recorder.calls.count("mean") == 1 and recorder.calls.count("addcmul_") == batch
    assert recorder.calls.count("to") == 2, "mean and sum of squares, whatever the batch size"


def test_batches_merge_to_the_exact_moments_of_all_samples():
    samples = torch.randn(103, 7, dtype=torch.float64) * 3 + 100  # a large mean, a small spread
    moments = Moments()
    for first, last in [(0, 1), (1, 40), (40, 41), (41, 103)]:  # batch sizes 1, 39, 1, 62
        moments.update(samples[first:last])
    torch.testing.assert_close(moments.result("mean"), samples.mean(0), rtol=1e-13, atol=0)
    torch.testing.assert_close(moments.result("var"), samples.var(0), rtol=1e-12, atol=0)


def test_the_probe_reduces_inside_the_measured_window():
    seen: list[int] = []

    class Counting(ScriptedDevice):
        def peak_bytes(self, device):
            seen.append(recorder.calls.count("zeros_like"))  # one per reduced batch (its sum of squares)
            return super().peak_bytes(device)

    pyro.clear_param_store()
    with _Recorder() as recorder:
        probe_footprint(recording_model, None, torch.zeros(3), device="cpu-reduce", batch_sizes=(2, 4),
                        posterior_samples={"z": torch.randn(8, 3)}, return_sites=["z"], reduce=["z"],
                        backend=Counting("cpu"))
    assert seen == [1, 2], "each batch's reduction is in its peak"
    with pytest.raises(ValueError, match=r"reduce: site\(s\) \['y'\] are not among the returned sites"):
        probe_footprint(recording_model, None, torch.zeros(3), device="cpu-unknown", batch_sizes=(2, 4),
                        posterior_samples={"z": torch.randn(8, 3)}, return_sites=["z"], reduce=["y"],
                        backend=Counting("cpu"))


def _tensors_in(obj, seen=None):
    """Every tensor reachable from ``obj`` through containers, attributes and closures."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        children = list(obj)
    elif isinstance(obj, functools.partial):
        children = [obj.args, obj.keywords]
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        children = list(vars(obj).values())
    else:
        return []
    return [tensor for child in children for tensor in _tensors_in(child, seen)]


def test_a_gpu_fitted_guide_ships_to_shards_with_every_tensor_on_the_host():
    import ray

    from devicemem.execute.ray import host_pickle

    pyro.clear_param_store()
    x = torch.zeros(3)
    guide = AutoNormal(model, init_loc_fn=init_to_value(values={"z": torch.ones(3)}))
    guide(x)
    # As if fitted on a GPU: the prototype trace and the init closure hold device tensors (meta
    # stands in for CUDA; the injected mover makes host copies of them).
    def to_meta(value):
        return value.to("meta") if isinstance(value, torch.Tensor) else value

    for node in guide.prototype_trace.nodes.values():
        node.update({key: to_meta(node[key]) for key in ("value",) if key in node})
        node.update({key: tuple(map(to_meta, node[key])) for key in ("args",) if key in node})
    guide.init_loc_fn.keywords["values"]["z"] = torch.ones(3, device="meta")
    assert any(t.device.type == "meta" for t in _tensors_in(guide))
    shipped = ray.cloudpickle.loads(host_pickle(ray, guide, mover=lambda t: torch.full(t.shape, 2.0, dtype=t.dtype)))
    tensors = _tensors_in(shipped)
    assert tensors and {t.device.type for t in tensors} == {"cpu"}
    assert torch.equal(shipped.init_loc_fn.keywords["values"]["z"], torch.full((3,), 2.0))
    assert torch.equal(shipped.locs.z, guide.locs.z), "host tensors travel as they are"


def test_shards_on_an_accelerator_get_a_fresh_ray_worker_each():
    import ray

    from devicemem.execute.ray import _remote

    assert _remote(ray, True, True)._default_options == {"num_gpus": 1, "max_calls": 1}
    assert _remote(ray, False, True)._default_options == {"num_gpus": 0, "max_calls": 1}  # named cuda:<i>
    assert _remote(ray, False, False)._default_options == {"num_gpus": 0, "max_calls": 0}  # warm CPU workers

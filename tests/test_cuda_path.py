"""The CUDA path's device handling, proved on the CPU with the meta device standing in for an
accelerator (tensors mixed with CPU ones raise, as CUDA ones do): the footprint probe, the
IAF guide's first SVI step."""

from __future__ import annotations

import functools
import time

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule, PyroParam

from bayesDREAM_ext.data import prepare_technical
from bayesDREAM_ext.model import build_model_inputs
from bayesDREAM_ext.synthetic import synthetic_data
from bayesDREAM_ext.training import plan_training, train
from devicemem import placement
from devicemem.backends.base import Backend
from devicemem.footprint import probe_footprint
from devicemem.sampling import PLATE_NAME
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
        result = train(inputs, plan, niters=1, lr=1e-3, tolerance=0.0, alpha_ewma=0.05, progress=False)
    assert {param.device.type for param in result.guide.parameters()} == {"cpu"}

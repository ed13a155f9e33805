"""Device-aware SVI: the device and guide decision, the footprint against what Pyro builds and
what a child process measures, the OneCycle schedule, early stop, and the GPU->CPU fallback."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pyro
import pytest
import torch
from pyro.infer.autoguide import AutoIAFNormal, AutoNormal

from bayesDREAM_ext.data import prepare_technical
from bayesDREAM_ext.model import build_model_inputs
from bayesDREAM_ext.synthetic import synthetic_data
from bayesDREAM_ext.memory import (
    FLOAT_BYTES,
    TrainingPlan,
    iaf_hidden_size,
    plan_training,
    technical_latent_size,
    training_footprint,
)
from bayesDREAM_ext.training import SVIOptions, make_guide, train
from devicemem.backends import DeviceMemory, MemoryView, SystemProbe, get_backend, register_backend
from tests.support.child import run_child
from tests.runner_fakes import FakeGpu

GB = 10**9
ROOT = Path(__file__).resolve().parents[1]


def memory(device: str, usable: int | None) -> DeviceMemory:
    return DeviceMemory(device, device, usable, usable, None, usable, ("fake",))


def plan(n_cells=2000, n_features=1000, n_groups=2, *, gpus=(), host=20 * GB, device="auto", guide="normal", safety=0.8):
    view = MemoryView.read(probe=SystemProbe(listing=(memory("cpu", host), *gpus)))  # a fake machine
    return plan_training(
        n_cells, n_features, n_groups, distribution="negbinom", device=device, guide=guide, safety_factor=safety,
        view=view,
    )


def inputs_for(distribution="negbinom", n_cells=200, n_features=20, n_groups=2):
    data = synthetic_data(distribution, n_cells, n_features, n_groups, seed=1)
    prepared = prepare_technical(data.counts, data.groups, distribution=distribution, denominator=data.denominator)
    return prepared, build_model_inputs(prepared)


def test_auto_trains_on_the_roomiest_gpu_when_it_fits():
    need = training_footprint(2000, 1000, 2)
    chosen = plan(gpus=[memory("cuda:0", 2 * need), memory("cuda:1", 4 * need)])
    assert (chosen.device, chosen.guide) == ("cuda:1", "normal")
    assert chosen.predicted_peak_bytes == need and chosen.budget_bytes == int(0.8 * 4 * need)
    assert "SVI on cuda:1" in chosen.reasons[0]


def test_a_gpu_too_small_for_a_full_step_trains_in_chunks():
    need = training_footprint(2000, 1000, 2)
    chosen = plan(gpus=[memory("cuda:0", need)])
    assert chosen.device == "cuda:0" and chosen.data_on_device
    assert 1000 <= chosen.chunk_cells < 2000 and chosen.chunks_per_step == 2
    assert chosen.predicted_peak_bytes <= chosen.budget_bytes
    assert "chunked steps on cuda:0" in chosen.reasons[-1] and "2 chunk(s) per step" in chosen.reasons[-1]


def test_counts_stay_on_the_host_when_they_do_not_fit_the_gpu():
    counts = 20000 * 1000 * 4
    chosen = plan(20000, 1000, gpus=[memory("cuda:0", 150 * 10**6)])
    assert chosen.device == "cuda:0" and not chosen.data_on_device
    assert chosen.host_bytes >= counts and chosen.predicted_peak_bytes <= chosen.budget_bytes
    assert "counts kept on the host" in chosen.reasons[-1]


def test_auto_falls_back_to_the_cpu_and_says_why():
    chosen = plan(gpus=[memory("cuda:0", 50 * 10**6)])
    assert chosen.device == "cpu"
    assert "does not fit cuda:0 even one cell per chunk" in chosen.reasons[0]
    assert plan().reasons[0] == "no GPU visible; SVI on the CPU"


def test_no_device_fits_one_cell_per_chunk_is_an_error_before_training():
    with pytest.raises(ValueError, match="even one cell per chunk needs"):
        plan(host=50 * 10**6)


def test_explicit_device_is_used_or_rejected():
    assert plan(device="cpu", gpus=[memory("cuda:0", 100 * GB)]).device == "cpu"
    with pytest.raises(ValueError, match="not visible"):
        plan(device="cuda:3")


def test_iaf_only_when_its_real_footprint_fits():
    latent = technical_latent_size(300, 2)
    iaf_need = training_footprint(500, 300, 2, guide="iaf")
    assert iaf_need > 9 * latent * iaf_hidden_size(latent) // 3 * FLOAT_BYTES
    roomy = plan(500, 300, host=2 * iaf_need, guide="auto")
    assert (roomy.guide, roomy.predicted_peak_bytes) == ("iaf", iaf_need)
    tight = plan(500, 300, host=iaf_need, guide="auto")
    assert tight.guide == "normal" and "using AutoNormal" in tight.reasons[-1]
    with pytest.raises(ValueError, match="AutoIAFNormal .* does not fit"):
        plan(500, 300, host=iaf_need, guide="iaf")


@pytest.mark.parametrize("distribution", ["negbinom", "normal", "binomial", "multinomial"])
def test_latent_size_is_what_autonormal_builds(distribution):
    data, inputs = inputs_for(distribution, n_groups=3)
    pyro.clear_param_store()
    guide = AutoNormal(inputs.model)
    guide(**inputs.kwargs)
    built = sum(loc.numel() for loc in guide.locs.parameters())
    assert technical_latent_size(data.n_features, 3, data.n_categories, distribution) == built


def test_iaf_weights_are_counted_with_the_default_hidden_size():
    data, inputs = inputs_for(n_features=6)
    latent = technical_latent_size(data.n_features, 2)
    pyro.clear_param_store()
    guide = AutoIAFNormal(inputs.model, hidden_dim=[iaf_hidden_size(latent)])
    guide(**inputs.kwargs)
    weights = sum(p.numel() for name, p in guide.named_parameters() if "loc" not in name and "scale" not in name)
    hidden = iaf_hidden_size(latent)
    assert weights == latent * hidden + hidden * 2 * latent + hidden + 2 * latent


def _cpu_plan(data, guide="normal") -> TrainingPlan:
    return plan_training(data.n_cells, data.n_features, data.n_groups, data.n_categories, distribution=data.distribution,
                         device="cpu", guide=guide, safety_factor=0.8)


def test_one_cycle_schedule_steps_every_iteration():
    data, inputs = inputs_for()
    result = train(inputs, _cpu_plan(data), SVIOptions(niters=40, lr=1e-3, tolerance=0.0, alpha_ewma=0.05, progress=False))
    rates = result.learning_rates
    assert len(result.losses) == len(rates) == 40
    assert rates[0] == pytest.approx(0.4e-3)
    peak = rates.index(max(rates))
    assert peak == 0.1 * 40 - 1 and max(rates) == pytest.approx(1e-2)  # OneCycleLR's warm-up ends at step 3
    assert all(a < b for a, b in zip(rates[: peak + 1], rates[1 : peak + 1]))
    assert all(a > b for a, b in zip(rates[peak:], rates[peak + 1 :]))
    assert rates[-1] < 1e-5


def _bayesdreams_own_loop(inputs, plan, niters, lr, tolerance, alpha_ewma, seed):
    """bayesDREAM's fit_technical loop (fitting/technical.py:1544-1599 at 8dd6414), written out:
    its PyroLRScheduler(OneCycleLR) built and never stepped, svi.step only, its EWMA stop."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = make_guide(inputs, "normal", plan.latent_size, torch.device("cpu"))
    optimizer = pyro.optim.PyroLRScheduler(torch.optim.lr_scheduler.OneCycleLR, {
        "optimizer": torch.optim.Adam, "optim_args": {"lr": lr, "betas": (0.9, 0.999)}, "max_lr": lr * 10,
        "total_steps": niters, "pct_start": 0.1, "div_factor": 25, "final_div_factor": 1e4,
    }, clip_args={"clip_norm": 10.0})
    svi = pyro.infer.SVI(inputs.model, guide, optimizer, loss=pyro.infer.TraceMeanField_ELBO(max_plate_nesting=2))
    losses, smoothed = [], None
    for _ in range(niters):
        loss = svi.step(**inputs.kwargs)
        losses.append(loss)
        if smoothed is None:
            smoothed = loss
        else:
            if abs(alpha_ewma * (loss - smoothed)) < tolerance:
                break
            smoothed = alpha_ewma * loss + (1 - alpha_ewma) * smoothed
    return losses, [float(s.get_last_lr()[0]) for s in optimizer.optim_objs.values()]


@pytest.mark.parametrize("tolerance", [0.0, 0.1])
def test_bayesdream_schedule_is_bayesdreams_own_loop(tolerance):
    data, inputs = inputs_for()
    options = SVIOptions(niters=60, lr=2e-3, tolerance=tolerance, alpha_ewma=0.05, progress=False, seed=3, schedule="bayesdream")
    result = train(inputs, _cpu_plan(data), options)
    losses, rates = _bayesdreams_own_loop(inputs, result.plan, 60, 2e-3, tolerance, 0.05, seed=3)
    assert result.losses == losses  # the same steps, bit for bit, and the same stopping step
    assert (len(losses) == 60) == (tolerance == 0.0) and result.converged == (tolerance > 0)  # 0.1: stops at step 25
    assert result.learning_rates == [pytest.approx(0.4 * 2e-3)] * len(losses) and rates == [pytest.approx(0.4 * 2e-3)] * len(rates)
    assert result.schedule == "bayesdream"
    with pytest.raises(ValueError, match="schedule"):
        SVIOptions(schedule="cosine")


def test_early_stop_needs_a_full_ewma_window_then_follows_the_tolerance():
    data, inputs = inputs_for()
    loose = train(inputs, _cpu_plan(data), SVIOptions(niters=100, lr=1e-3, tolerance=1.0, alpha_ewma=0.05, progress=False))
    assert loose.converged and len(loose.losses) == 21  # the EWMA compared with itself 1 / 0.05 steps earlier
    late = train(inputs, _cpu_plan(data), SVIOptions(niters=300, lr=1e-3, tolerance=1.0, alpha_ewma=0.5, progress=False))
    assert late.converged and len(late.losses) == 31  # not before the 10% warm-up
    strict = train(inputs, _cpu_plan(data), SVIOptions(niters=30, lr=1e-3, tolerance=0.0, alpha_ewma=0.05, progress=False))
    assert not strict.converged and len(strict.losses) == 30


def test_training_learns_and_records_its_first_step_peak():
    data, inputs = inputs_for()
    result = train(inputs, _cpu_plan(data), SVIOptions(niters=100, lr=1e-3, tolerance=0.0, alpha_ewma=0.05, progress=False, seed=0))
    assert sum(result.losses[-20:]) < sum(result.losses[:20])
    assert result.plan.measured_peak_bytes is not None  # tiny here: the step reuses resident heap
    assert result.guide.locs.log2_alpha_y.device.type == "cpu"


class PeakyGpu(FakeGpu):
    """The runner tests' fake "cuda:0" (computes on the CPU) reporting a chosen peak."""

    def __init__(self, peak: int = 0) -> None:
        super().__init__()
        self.peak = peak

    def peak_bytes(self, device):
        return self.peak


@pytest.fixture
def fake_gpu():
    real = get_backend("cuda")
    gpu = PeakyGpu()
    register_backend("cuda", gpu)
    try:
        yield gpu
    finally:
        register_backend("cuda", real)


def _gpu_plan(data, budget: int) -> TrainingPlan:
    need = training_footprint(data.n_cells, data.n_features, data.n_groups)
    return TrainingPlan("cuda:0", "normal", technical_latent_size(data.n_features, 2), need, budget, 0.8, ("fake",))


def test_a_first_gpu_step_over_budget_moves_training_to_chunks_on_the_gpu(fake_gpu):
    data, inputs = inputs_for()
    fake_gpu.peak = 4 * 10**6
    result = train(inputs, _gpu_plan(data, budget=10**6), SVIOptions(niters=5, lr=1e-3, tolerance=0.0, alpha_ewma=0.05, progress=False), fallback_to_host=True)
    assert result.plan.device == "cuda:0" and len(result.losses) == 5
    assert "over the budget" in result.plan.reasons[-2] and "in chunks of 45 cells" in result.plan.reasons[-2]  # 200 x 0.9 / 4
    assert result.plan.chunk_cells == 10 and "chunks of 10 cells from now on" in result.plan.reasons[-1]  # measured again
    assert fake_gpu.emptied_after_release == [True]


def _observed_cells(kwargs) -> int | None:
    return kwargs["counts"].shape[0] if kwargs.get("observe", True) and kwargs.get("counts") is not None else None


def test_a_first_gpu_step_out_of_memory_moves_training_to_chunks_on_the_gpu(fake_gpu):
    data, inputs = inputs_for()
    calls = []

    def runs_out_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return inputs.model(*args, **kwargs)

    failing = dataclasses.replace(inputs, model=runs_out_once)
    result = train(failing, _gpu_plan(data, budget=10**12), SVIOptions(niters=3, lr=1e-3, tolerance=0.0, alpha_ewma=0.05, progress=False), fallback_to_host=True)
    assert result.plan.device == "cuda:0" and result.plan.chunk_cells == 100
    assert "ran out of memory on cuda:0" in result.plan.reasons[-1] and "chunks of 100 cells" in result.plan.reasons[-1]


def test_a_gpu_out_of_memory_even_in_one_cell_chunks_moves_training_to_the_cpu(fake_gpu):
    data, inputs = inputs_for()
    full_steps = []

    def gpu_always_runs_out(*args, **kwargs):
        cells = _observed_cells(kwargs)
        if cells == data.n_cells:
            full_steps.append(1)
        if cells is not None and (cells < data.n_cells or len(full_steps) == 1):  # the CPU's full steps succeed
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return inputs.model(*args, **kwargs)

    result = train(dataclasses.replace(inputs, model=gpu_always_runs_out), _gpu_plan(data, budget=10**12), SVIOptions(niters=2, lr=1e-3, tolerance=0.0, alpha_ewma=0.05, progress=False), fallback_to_host=True)
    assert result.plan.device == "cpu" and len(result.losses) == 2
    assert "even in chunks" in result.plan.reasons[-1]


def test_without_fallback_a_gpu_peak_over_budget_is_only_reported(fake_gpu):
    data, inputs = inputs_for()
    fake_gpu.peak = 10**9
    result = train(inputs, _gpu_plan(data, budget=10**6), SVIOptions(niters=2, lr=1e-3, tolerance=0.0, alpha_ewma=0.05, progress=False))
    assert result.plan.device == "cuda:0" and result.plan.measured_peak_bytes == 10**9


@pytest.mark.slow
@pytest.mark.parametrize("n_cells, n_features, n_groups, guide", [(3000, 3000, 2, "normal"), (200, 400, 2, "iaf")])
def test_footprint_covers_the_measured_peak_of_training(tmp_path, n_cells, n_features, n_groups, guide):
    """A fresh child (tests.support.child.run_child) trains 3 steps; the CPU backend measures
    what training added to its RSS (VmHWM after clear_refs, exact). The footprint less the
    data, which was resident before, must cover it without being wildly high. (The child's
    ru_maxrss is no use here: it starts from this, much larger, process's high-water mark.)"""
    data = synthetic_data("negbinom", n_cells, n_features, n_groups, seed=0)
    np.savez(tmp_path / "data.npz", counts=data.counts, groups=data.groups)
    child = [sys.executable, str(ROOT / "tests" / "ext_train_child.py"), str(tmp_path / "data.npz"), "negbinom", guide, "3"]
    trained = run_child(child, env={"PYTHONPATH": str(ROOT)}, timeout=300)
    assert trained.ok, trained.stderr
    predicted, measured = map(int, trained.stdout.split())
    assert predicted == training_footprint(n_cells, n_features, n_groups, guide=guide)
    assert 0.9 <= (predicted - n_cells * n_features * FLOAT_BYTES) / measured <= 1.5, (predicted, measured)

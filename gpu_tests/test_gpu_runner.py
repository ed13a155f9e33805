"""Issue 7, points 4-6: the runner on a real GPU: batches within a budget, real OOM recovery,
and the same distribution as on the CPU."""

from __future__ import annotations

from statistics import NormalDist

import pytest
import torch

import devicemem
from bayesDREAM_ext.model import technical_model
from devicemem.units import format_bytes, parse_bytes
from gpu_tests.support import GIB, MIB, occupy_gpu, technical_problem


def _contiguous(report, num_samples: int) -> bool:
    """Batches cover 0..num_samples in order, none repeated or skipped."""
    starts = [row.start for row in report]
    ends = [row.start + row.size for row in report]
    return starts == [0] + ends[:-1] and ends[-1] == num_samples


def test_posterior_predictive_batches_on_the_gpu_within_a_budget(figures):
    # One sample with the observation site holds ~3 [N, T] float32 tensors (240 MB here), so
    # 48 samples (~12 GB) cannot fit the 4 GiB this test allows the GPU.
    cap, num_samples = parse_bytes("4GiB"), 48
    problem = technical_problem(4000, 5000)
    guide = problem.guide()
    runner = devicemem.Predictive(
        technical_model, guide=guide, num_samples=num_samples, return_sites=["y_obs"],
        reduce={"y_obs": ("mean", "var")}, device="cuda", max_memory={"cuda": cap}, seed=0, progress=False,
    )
    base = torch.cuda.memory_allocated(0)
    result = runner(*problem.args)
    plan = runner.plan
    peaks = [row.peak_bytes - base for row in runner.report]
    ratio = result["y_obs:mean"].sum().item() / problem.expected_counts_total()
    figures.record(
        "4 posterior predictive under a GPU budget", cap_bytes=cap, device=plan.device,
        batch_size=plan.batch_size, n_batches=plan.n_batches, budget_bytes=plan.budget_bytes,
        predicted_peak_bytes=plan.predicted_peak_bytes, measured_peak_bytes=max(peaks),
        predicted_over_measured=plan.predicted_peak_bytes / max(peaks), mean_total_over_expected=ratio,
        batches=[(row.start, row.size, row.device, row.wall_s, row.retries) for row in runner.report],
    )
    assert plan.device.startswith("cuda"), plan.reasons
    assert plan.batch_size < num_samples and plan.n_batches > 1, "the full batch should not fit 4 GiB"
    assert plan.budget_bytes <= cap
    assert all(row.device == plan.device and row.retries == 0 for row in runner.report)
    assert _contiguous(runner.report, num_samples)
    assert max(peaks) <= plan.budget_bytes, f"peak {format_bytes(max(peaks))} over {format_bytes(plan.budget_bytes)}"
    assert result["y_obs:mean"].shape == (4000, 5000) and bool(torch.isfinite(result["y_obs:var"]).all())
    assert abs(ratio - 1) < 0.03, "GPU counts should average to the model's expected counts"


def _warm_kernels() -> None:
    """Run the workload once at a tiny size, so every CUDA kernel module is loaded before the
    GPU is filled (lazy module loading needs device memory too)."""
    tiny = technical_problem(64, 32)
    devicemem.Predictive(technical_model, guide=tiny.guide(), num_samples=4, device="cuda", seed=0,
                         progress=False)(*tiny.args)


def _planned_full_batch(problem, guide, num_samples: int, sites: list[str]):
    """The planner's plan for one batch of ``num_samples`` on the GPU, made while it is empty."""
    plan = devicemem.plan_predictive(
        technical_model, guide, num_samples, *problem.args, device="cuda", minibatch_size=num_samples,
        return_sites=sites,
    )
    assert plan.device.startswith("cuda") and plan.batch_size == num_samples, plan.reasons
    return plan


def _assert_every_sample_written(samples: dict, num_samples: int) -> None:
    mu = samples["mu_ntc"].flatten(1)
    assert mu.shape[0] == num_samples and bool((mu > 0).all()), "an unwritten sample would not be positive"
    assert torch.unique(mu, dim=0).shape[0] == num_samples, "a sample was repeated"
    assert bool((samples["y_obs"].flatten(1).sum(1) > 0).all())


def test_real_oom_bisects_the_batch_and_completes_on_the_gpu(figures):
    # Planned on an empty GPU; then another "job" leaves 3 GiB: a batch of 32 needs ~8 GB.
    num_samples, sites = 32, ["y_obs", "mu_ntc"]
    problem = technical_problem(4000, 5000)
    _warm_kernels()
    guide = problem.guide()
    plan = _planned_full_batch(problem, guide, num_samples, sites)
    with occupy_gpu(leave_bytes=3 * GIB) as left:
        runner = devicemem.Predictive(technical_model, guide=guide, num_samples=num_samples, return_sites=sites,
                                      plan=plan, seed=0, progress=False)
        samples = runner(*problem.args)
    rows = runner.report
    figures.record(
        "5 real OOM: bisect on the GPU", free_left_bytes=left, planned_batch=plan.batch_size,
        batches=[(row.start, row.size, row.device, row.retries) for row in rows],
    )
    assert rows[0].retries >= 1 and rows[0].size < num_samples, "the planned batch cannot have fit"
    assert all(row.device == plan.device for row in rows), "3 GiB holds smaller batches: stay on the GPU"
    assert _contiguous(rows, num_samples)
    _assert_every_sample_written(samples, num_samples)


def test_real_oom_on_a_nearly_full_gpu_falls_back_to_the_cpu(figures):
    # 64 MiB left cannot hold one sample (~3 x 32 MB [N, T] tensors): move to the host.
    num_samples, sites = 4, ["y_obs", "mu_ntc"]
    problem = technical_problem(2000, 4000)
    _warm_kernels()
    guide = problem.guide()
    plan = _planned_full_batch(problem, guide, num_samples, sites)
    with occupy_gpu(leave_bytes=64 * MIB) as left:
        runner = devicemem.Predictive(technical_model, guide=guide, num_samples=num_samples, return_sites=sites,
                                      plan=plan, seed=0, progress=False)
        samples = runner(*problem.args)
    rows = runner.report
    figures.record(
        "5 real OOM: fall back to the CPU", free_left_bytes=left,
        batches=[(row.start, row.size, row.device, row.retries) for row in rows],
    )
    assert rows[-1].device == "cpu" and sum(row.retries for row in rows) >= 1
    assert _contiguous(rows, num_samples)
    _assert_every_sample_written(samples, num_samples)
    assert all(param.device.type == "cpu" for param in guide.parameters()), "guide parameters restored"


def _z_limit(n_tests: int, alpha: float = 1e-4) -> float:
    """Two-sided normal quantile with a Bonferroni correction over ``n_tests`` comparisons."""
    return NormalDist().inv_cdf(1 - alpha / (2 * n_tests))


@pytest.mark.parametrize("observe", [False, True], ids=["params-only", "posterior-predictive"])
def test_gpu_and_cpu_draw_the_same_distribution(observe, figures):
    num_samples = 2000
    problem = technical_problem(100, 100)
    guide = problem.guide()
    draws = {
        device: devicemem.Predictive(technical_model, guide=guide, num_samples=num_samples, device=device, seed=1,
                                     progress=False)(*problem.args, observe=observe)
        for device in ("cuda", "cpu")
    }
    gpu, cpu = draws["cuda"], draws["cpu"]
    assert {n: (v.shape, v.dtype) for n, v in gpu.items()} == {n: (v.shape, v.dtype) for n, v in cpu.items()}
    limit = _z_limit(sum(value[0].numel() for value in gpu.values()))
    worst = {}
    for name in gpu:
        a, b = gpu[name].double(), cpu[name].double()
        error = torch.sqrt((a.var(0) + b.var(0)) / num_samples)
        z = ((a.mean(0) - b.mean(0)).abs() / error.clamp_min(1e-12)).max().item()
        worst[name] = z
    figures.record(f"6 gpu vs cpu ({'with' if observe else 'without'} y_obs)", z_limit=limit, worst_z=worst)
    assert max(worst.values()) < limit, f"site means differ beyond Monte Carlo error: {worst}"
    if observe:
        ratio = (gpu["y_obs"].double().var(0).mean() / cpu["y_obs"].double().var(0).mean()).item()
        assert abs(ratio - 1) < 0.05, f"y_obs variance differs: GPU / CPU = {ratio:.3f}"

"""Issue 12 on a real GPU: chunked SVI with the counts kept on the host (cuda:0 capped below
the data's size) follows the CPU's losses, and a real CUDA OOM inside a chunk is recovered by
a smaller chunk without losing the step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bayesDREAM_ext.data import prepare_technical
from bayesDREAM_ext.model import ModelInputs, build_model_inputs
from bayesDREAM_ext.synthetic import synthetic_technical
from bayesDREAM_ext.memory import plan_training
from bayesDREAM_ext.training import SVIOptions, train
from gpu_tests.support import GIB, MIB, occupy_gpu, release_cuda

N_CELLS, N_FEATURES = 30_000, 2_000  # 240 MB of float32 counts
SVI = dict(lr=1e-3, tolerance=0.0, alpha_ewma=0.05, seed=0, progress=False)


@pytest.fixture(scope="module")
def problem() -> ModelInputs:
    data = synthetic_technical(N_CELLS, N_FEATURES, 2, seed=0)
    return build_model_inputs(prepare_technical(data.counts, data.groups, data.sum_factors))


def _plan(device: str, **options):
    return plan_training(N_CELLS, N_FEATURES, 2, device=device, safety_factor=0.8, **options)


def test_chunked_svi_with_host_kept_counts_follows_the_cpu(problem, figures):
    cap = 200 * MIB  # below the 240 MB of counts
    plan = _plan("cuda:0", max_memory={"cuda:0": cap})
    assert not plan.data_on_device and plan.chunk_cells is not None and plan.chunks_per_step > 1, plan.reasons
    release_cuda()
    torch.cuda.reset_peak_memory_stats(0)
    base = torch.cuda.memory_allocated(0)
    gpu = train(problem, plan, SVIOptions(niters=20, **SVI))
    peak = torch.cuda.max_memory_allocated(0) - base
    cpu = train(problem, _plan("cpu"), SVIOptions(niters=20, **SVI))
    figures.record(
        "12 chunked SVI, counts on the host", chunk_cells=plan.chunk_cells, chunks_per_step=plan.chunks_per_step,
        predicted_peak_bytes=plan.predicted_peak_bytes, budget_bytes=plan.budget_bytes, measured_peak_bytes=peak,
        gpu_ms_per_step=gpu.steady_ms_per_step, cpu_ms_per_step=cpu.steady_ms_per_step,
        max_relative_loss_difference=float(np.max(np.abs(np.subtract(gpu.losses, cpu.losses)) / np.abs(cpu.losses))),
    )
    assert gpu.guide.locs.mu_ntc.device.type == "cuda"
    assert peak <= plan.budget_bytes
    np.testing.assert_allclose(gpu.losses, cpu.losses, rtol=1e-3)


def test_a_real_cuda_oom_inside_a_chunk_is_recovered_by_a_smaller_chunk(problem, figures):
    plan = _plan("cuda:0", chunk_cells=N_CELLS)  # one chunk of every cell: about 4 GB of activations
    with occupy_gpu(leave_bytes=int(1.5 * GIB)):
        result = train(problem, plan, SVIOptions(niters=3, **SVI))
    figures.record("12 CUDA OOM inside a chunk", planned_chunk=N_CELLS, final_chunk=result.plan.chunk_cells,
                   reasons=list(result.plan.reasons[-4:]))
    assert result.plan.chunk_cells < N_CELLS and any("ran out of memory" in r for r in result.plan.reasons)
    assert len(result.losses) == 3 and np.isfinite(result.losses).all()

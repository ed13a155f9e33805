"""Issue 17: what its CPU tests on fakes cannot show, on a real GPU. Findings 2 (an IAF guide
trains on the GPU), 3 (real out-of-memory errors outside the caching allocator count as OOM),
4 (results stay pageable; pinned memory is one small staging buffer), 5 (the torch device's
NVML reading, the context not yet created, the per-process fraction) and 8 (the probe does not
cap GPU batches by launch timings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import devicemem
from bayesDREAM_ext.model import build_model_inputs, technical_model
from bayesDREAM_ext.synthetic import synthetic_data
from bayesDREAM_ext.memory import plan_training
from bayesDREAM_ext.training import SVIOptions, train
from devicemem.backends.cuda import CUDA_CONTEXT_BYTES
from devicemem.output.sink import STAGING_BYTES, Sink
from devicemem.sampling import Site
from gpu_tests.support import GIB, MIB, occupy_gpu, technical_problem

REPO = Path(__file__).resolve().parents[1]
MARKER = "RESULT "


def child(code: str, **env: str) -> dict:
    """Run ``code`` in a fresh Python (no CUDA context, no pinned cache yet); its ``RESULT`` line."""
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(next(line for line in run.stdout.splitlines() if line.startswith(MARKER))[len(MARKER):])


# --- finding 2 -------------------------------------------------------------------------------


def test_an_iaf_guide_trains_on_the_gpu(figures):
    # bayesDREAM_ext.data needs scipy, which the GPU node lacks: the technical data by hand.
    raw = synthetic_data("negbinom", 300, 40, 2, seed=0)
    counts = torch.as_tensor(raw.counts, dtype=torch.float32)
    totals = counts.sum(1)
    data = SimpleNamespace(counts=counts, groups=torch.as_tensor(raw.groups, dtype=torch.int64), n_groups=2,
                           distribution="negbinom", sum_factors=totals / totals.mean())
    plan = plan_training(300, 40, 2, 1, distribution="negbinom", device="cuda:0", guide="iaf", safety_factor=0.8)
    result = train(build_model_inputs(data), plan, SVIOptions(niters=20, lr=1e-3, tolerance=0.0, alpha_ewma=0.05, progress=False))
    figures.record("2 IAF on the GPU", steps=len(result.losses), last_loss=result.losses[-1],
                   measured_peak_bytes=result.plan.measured_peak_bytes)
    assert result.plan.device == "cuda:0" and len(result.losses) == 20
    assert {p.device.type for p in result.guide.parameters()} == {"cuda"}
    assert all(torch.isfinite(torch.tensor(result.losses)))


# --- finding 3 -------------------------------------------------------------------------------

CUBLAS_OOM = r"""
import json, torch
from devicemem.backends.cuda import CudaBackend
a = torch.ones(64, 64, device="cuda")  # a context, no cuBLAS handle yet
hog = []
for chunk in (1 << 30, 64 << 20, 2 << 20):  # fill the device through the caching allocator
    try:
        while True:
            hog.append(torch.empty(chunk, dtype=torch.uint8, device="cuda"))
    except torch.OutOfMemoryError:
        pass
free = torch.cuda.mem_get_info()[0]
try:
    (a @ a).sum().item()
    outcome = {"error": None}
except Exception as exc:
    outcome = {"error": type(exc).__name__, "message": str(exc).strip().splitlines()[0],
               "is_oom": CudaBackend().is_oom(exc)}
print("RESULT " + json.dumps({**outcome, "free_bytes": free}))
"""


def test_a_cublas_time_out_of_memory_error_is_an_oom(figures):
    outcome = child(CUBLAS_OOM)
    figures.record("3 cuBLAS on a full GPU", **outcome)
    if outcome["error"] is None:
        pytest.skip(f"the first matmul found memory ({outcome['free_bytes']} bytes free): no cuBLAS OOM to show")
    assert outcome["is_oom"], f"{outcome['error']}: {outcome['message']} is not recognised as out of memory"


CONTEXT_OOM = r"""
import json, torch
from devicemem.backends.cuda import CudaBackend
try:
    torch.zeros(1, device="cuda")
    outcome = {"error": None}
except Exception as exc:
    outcome = {"error": type(exc).__name__, "message": str(exc).strip().splitlines()[0],
               "is_oom": CudaBackend().is_oom(exc)}
print("RESULT " + json.dumps(outcome))
"""


def test_creating_a_context_on_a_full_gpu_is_an_oom(figures):
    with occupy_gpu(leave_bytes=32 * MIB) as left:
        outcome = child(CONTEXT_OOM)
    figures.record("3 CUDA context on a full GPU", free_left_bytes=left, **outcome)
    if outcome["error"] is None:
        pytest.skip(f"a context fitted in {left} bytes: no context-creation OOM to show")
    assert outcome["is_oom"], f"{outcome['error']}: {outcome['message']} is not recognised as out of memory"


# --- finding 4 -------------------------------------------------------------------------------

PINNED = r"""
import json, torch, devicemem
from bayesDREAM_ext.model import technical_model
from gpu_tests.support import technical_problem
problem = technical_problem(2000, 3000)
runner = devicemem.Predictive(technical_model, guide=problem.guide(), num_samples=64, return_sites=["y_obs"],
                              device="cuda", seed=0, progress=False)
result = runner(*problem.args)["y_obs"]
stats = torch.cuda.host_memory_stats()
print("RESULT " + json.dumps({
    "result_bytes": result.numel() * result.element_size(), "pinned": result.is_pinned(),
    "pinned_peak_bytes": stats.get("allocated_bytes.peak", 0), "batches": len(runner.report),
    "all_written": bool((result.flatten(1).sum(1) > 0).all()),
}))
"""


def test_results_stay_pageable_and_pinned_memory_is_one_staging_buffer(figures):
    outcome = child(PINNED)
    figures.record("4 pinned host memory of a GPU run", staging_bytes=STAGING_BYTES, **outcome)
    assert outcome["result_bytes"] > GIB and not outcome["pinned"] and outcome["all_written"]
    assert outcome["pinned_peak_bytes"] <= STAGING_BYTES, (
        f"{outcome['pinned_peak_bytes']} bytes pinned for a {outcome['result_bytes']}-byte result"
    )


def test_staging_copies_a_large_gpu_batch_exactly():
    value = torch.randn(3, (100 << 20) // 12, device="cuda")  # 100 MiB: two pieces of the buffer
    sink = Sink({"x": Site(tuple(value.shape[1:]), value.dtype)}, {}, 5, None, stage=True)
    sink.write(1, {"x": value})
    stored = sink.result()["x"]
    assert torch.equal(stored[1:4], value.cpu()) and not stored.is_pinned()


# --- finding 5 -------------------------------------------------------------------------------

CONTEXT = r"""
import json, torch
from devicemem.backends import device_memory
before = device_memory("cuda:0")  # no context yet: NVML only
torch.zeros(1, device="cuda:0")
after = device_memory("cuda:0")
print("RESULT " + json.dumps({
    "uuid": str(torch.cuda.get_device_properties(0).uuid), "before_sources": before.sources,
    "before_free": before.free_bytes, "before_usable": before.usable_bytes, "after_free": after.free_bytes,
    "after_usable": after.usable_bytes, "after_sources": after.sources, "limit": after.limit_bytes,
    "total": after.total_bytes,
}))
"""


def test_the_context_a_fresh_process_will_create_is_counted(figures):
    outcome = child(CONTEXT)
    context = outcome["before_free"] - outcome["after_free"]
    figures.record("5 CUDA context", assumed_bytes=CUDA_CONTEXT_BYTES, measured_bytes=context, **outcome)
    assert outcome["before_sources"][0] == "nvml-cuda context" and outcome["after_sources"][0].startswith("nvml")
    assert outcome["before_usable"] == outcome["before_free"] - CUDA_CONTEXT_BYTES
    assert 0 < context <= 4 * CUDA_CONTEXT_BYTES, f"a context took {context} bytes"
    assert abs(outcome["after_usable"] - outcome["before_usable"]) <= 256 * MIB + abs(context - CUDA_CONTEXT_BYTES)


def test_the_alloc_conf_fraction_limits_usable_memory(figures):
    outcome = child(CONTEXT, PYTORCH_CUDA_ALLOC_CONF="per_process_memory_fraction:0.25")
    figures.record("5 per-process fraction 0.25", **outcome)
    assert outcome["limit"] == int(0.25 * outcome["total"])
    assert outcome["before_usable"] <= outcome["limit"] and outcome["after_usable"] <= outcome["limit"]


# --- finding 8 -------------------------------------------------------------------------------


def test_gpu_batches_are_not_capped_by_launch_timings(figures):
    problem = technical_problem(2000, 2000)
    guide = problem.guide()
    plan = devicemem.plan_predictive(technical_model, guide, 256, *problem.args, device="cuda",
                                     return_sites=["y_obs"])
    figures.record("8 probe plan on the GPU", batch_size=plan.batch_size, n_batches=plan.n_batches,
                   reasons=list(plan.reasons))
    assert plan.device.startswith("cuda")
    assert not any("Capping batches" in reason for reason in plan.reasons), plan.reasons
    assert plan.batch_size == 256, "256 samples of 2000 x 2000 (~12 GB) fit an H200 in one batch"

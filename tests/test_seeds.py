"""Seeds are a contract (issue 15): a seeded call leaves the global RNG alone, an unseeded one
repeats after ``pyro.set_rng_seed``, latents depend on (seed, sample index) only, and a seeded
plan does not follow the probe's timings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch

from bayesDREAM_ext.model import technical_model
from devicemem.planner import plan_predictive
from devicemem.predictive import Predictive
from tests.test_planner import GB, fp, memory, resources

ROOT = Path(__file__).resolve().parents[1]
LATENTS = ("log2_alpha_y", "o_y", "mu_ntc", "beta_o")


def fresh_model(*args, **kwargs):
    """A model object the planner's probe cache has not seen: every call probes again."""
    return technical_model(*args, **kwargs)


def test_a_seeded_call_that_probes_leaves_the_global_rng_untouched(problem):
    args, guide = problem
    before = torch.get_rng_state()
    runner = Predictive(fresh_model, guide=guide, num_samples=40, seed=0, progress=False)
    runner(*args)
    assert "probe" in " ".join(runner.plan.reasons)
    assert torch.equal(torch.get_rng_state(), before)


def test_an_unseeded_call_after_set_rng_seed_repeats(problem):
    args, guide = problem

    def model(*a, **k):
        return technical_model(*a, **k)

    draws = []
    for _ in range(2):  # the first call probes, the second finds the probe cached
        pyro.set_rng_seed(7)
        draws.append(Predictive(model, guide=guide, num_samples=40, progress=False)(*args))
    for name in draws[0]:
        assert torch.equal(draws[0][name], draws[1][name]), name


def test_latents_do_not_depend_on_the_batch_size(problem):
    args, guide = problem
    runs = {
        size: Predictive(technical_model, guide=guide, num_samples=30, seed=0, minibatch_size=size, progress=False)
        for size in (1, 13, None)
    }
    results = {size: runner(*args) for size, runner in runs.items()}
    assert [runs[size].plan.batch_size for size in (1, 13)] == [1, 10]
    for name in LATENTS:
        assert torch.equal(results[1][name], results[13][name]), name
        assert torch.equal(results[1][name], results[None][name]), name
    assert not torch.equal(results[1]["y_obs"], results[13]["y_obs"])  # the likelihood follows the batches


def test_a_seeded_plan_is_not_capped_by_the_probes_timings():
    listing = [memory("cpu", 10 * GB)]
    for reproducible, batch in ((False, 8), (True, 100)):
        res, _ = resources(listing, {"cpu": fp(GB, 10**6, saturation=8)})
        plan = plan_predictive(lambda: None, lambda: None, 100, device="cpu", **res, reproducible=reproducible)
        assert plan.batch_size == batch
        assert any("Not capping batches at 8" in reason for reason in plan.reasons) == reproducible


@pytest.mark.slow
def test_seeded_calls_under_max_memory_are_identical_across_fresh_processes():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    outputs = [
        subprocess.run([sys.executable, str(ROOT / "tests" / "seed_child.py")], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=300, check=True).stdout.split()
        for _ in range(3)
    ]
    assert all(int(batch) < 200 for batch, _ in outputs), outputs  # the cap made it batch
    assert len({digest for _, digest in outputs}) == 1, outputs

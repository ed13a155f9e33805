"""One memory account (issue 15): the runner follows the plan the planner made from its own
reading of host memory, planner and runner agree on a user minibatch_size, and advice never
names an option already in use."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

import devicemem.results as results_module
from devicemem.backends import DeviceMemory
from devicemem.predictive import Predictive
from tests.runner_fakes import cell_model, make_plan

SIZE = 500  # cell_model [500, 500]: ~3 MB per vectorised sample with the observation
CAP = "cpu=150MB"


@pytest.fixture
def guide():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(cell_model)
    guide(torch.randn(SIZE, SIZE), SIZE, SIZE)
    yield guide
    pyro.clear_param_store()


def test_a_lower_second_reading_does_not_refuse_the_planners_own_plan(guide, monkeypatch):
    def lower_reading(device, max_memory=None, probe=None):  # the probe's leftovers cut what is usable
        return DeviceMemory("cpu", "host RAM", None, 60 * 10**6, None, 60 * 10**6, ("fake",))

    monkeypatch.setattr(results_module, "device_memory", lower_reading)
    runner = Predictive(cell_model, guide=guide, num_samples=60, seed=0, max_memory=CAP, progress=False,
                        reduce={"x": ("mean", "var")})
    result = runner(None, SIZE, SIZE)
    assert runner.plan.predicted_peak_bytes > 60 * 10**6  # what the second reading used to refuse
    assert result["x:mean"].shape == (SIZE, SIZE)


def test_an_oversized_minibatch_is_kept_by_the_planner_and_run_by_the_runner(guide):
    runner = Predictive(cell_model, guide=guide, num_samples=60, seed=0, max_memory=CAP, minibatch_size=60,
                        progress=False, reduce={"x": ("mean", "var")})
    result = runner(None, SIZE, SIZE)
    assert "Using user-specified minibatch_size=60" in " ".join(runner.plan.reasons)
    assert [row.size for row in runner.report] == [60]
    assert result["x:mean"].shape == (SIZE, SIZE)


@pytest.mark.parametrize("use_out", [False, True])
def test_results_that_do_not_fit_get_advice_without_options_in_use(guide, tmp_path, use_out):
    runner = Predictive(cell_model, guide=guide, num_samples=4, plan=make_plan(4, 2), max_memory="cpu=1KB",
                        reduce={"x": ("mean", "var")}, out=tmp_path if use_out else None, progress=False)
    with pytest.raises(ValueError, match=r"\[MEMORY\] the results need") as error:
        runner(None, SIZE, SIZE)
    assert "reduce={" not in str(error.value)
    assert ("out=DIR" in str(error.value)) != use_out

"""One memory account (issues 15 and 20): a call reads the machine and parses max_memory once, and
plans, admits its results and falls back against that one reading; planner and runner agree on a
user minibatch_size, and advice never names an option already in use."""

from __future__ import annotations

import dataclasses

import pyro
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

from backend_fakes import GiB, probe, write_tree
from devicemem.backends import MAX_MEMORY_ENV
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


class Machine:
    """A fake machine whose host memory shrinks at every reading (as the planner's own probe
    batches would leave less behind), counting its readings: psutil's, and the environment's
    DEVICEMEM_MAX_MEMORY."""

    def __init__(self, tmp_path, available: int) -> None:
        self.readings = 0
        self.environment_reads = 0
        self.available = available
        machine = self

        class Environ(dict):
            def get(self, key, default=None):
                machine.environment_reads += key == MAX_MEMORY_ENV
                return super().get(key, default)

        class Psutil:
            @staticmethod
            def virtual_memory():
                machine.readings += 1
                free, machine.available = machine.available, machine.available // 10
                return type("vm", (), {"total": 64 * GiB, "available": free})

        self.probe = dataclasses.replace(probe(write_tree(tmp_path, {}), psutil=Psutil()), environ=Environ())


class Caps(dict):
    """A max_memory mapping that counts how often it is parsed."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.parsed = 0

    def items(self):
        self.parsed += 1
        return super().items()


def test_a_call_reads_the_machine_and_parses_max_memory_once(guide, tmp_path):
    machine = Machine(tmp_path, available=600 * 10**6)
    caps = Caps({"cpu": "150MB"})
    runner = Predictive(cell_model, guide=guide, num_samples=60, seed=0, max_memory=caps, progress=False,
                        reduce={"x": ("mean", "var")}, probe=machine.probe)
    result = runner(None, SIZE, SIZE)
    assert (machine.readings, machine.environment_reads, caps.parsed) == (1, 1, 1)
    assert "Available CPU RAM: 150.00 MB usable" in runner.plan.reasons[0]
    # a second reading would have seen 60 MB and refused the planner's own plan; there is none
    assert runner.plan.predicted_peak_bytes > 60 * 10**6
    assert result["x:mean"].shape == (SIZE, SIZE)
    runner(None, SIZE, SIZE)
    assert (machine.readings, machine.environment_reads, caps.parsed) == (2, 2, 1)  # parsed once, at construction


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


def test_fit_technical_reads_the_machine_and_parses_max_memory_once(tmp_path):
    from bayesDREAM_ext.fit import fit_technical
    from bayesDREAM_ext.synthetic import synthetic_technical

    data = synthetic_technical(60, 12, 2, seed=0)
    machine = Machine(tmp_path, available=20 * GiB)
    caps = Caps({"cpu": "4GB"})
    fit = fit_technical(data.counts, data.groups, data.sum_factors, device="auto", niters=3, nsamples=10, seed=0,
                        progress=False, max_memory=caps, probe=machine.probe)
    # training planned, trained, Predictive planned and drawn against one reading of the host
    assert (machine.readings, machine.environment_reads, caps.parsed) == (1, 1, 1)
    assert fit.svi_plan.budget_bytes == fit.predictive_plan.budget_bytes + fit.predictive_plan.output_bytes == int(0.8 * 4e9)

"""Issue 15 on devicemem: no silent NaN, bad input named before work, numpy integers and
torch.device accepted, a one-device list runs here, and threads serialised, not corrupted."""

from __future__ import annotations

import dataclasses
import json
import threading

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

from bayesDREAM_ext.model import technical_model
from devicemem.checks import check_finite
from bayesDREAM_ext.cli import main as ext_main
from bayesDREAM_ext.memory import plan_technical
from devicemem.planner import Plan
from devicemem.predictive import Predictive
from tests.runner_fakes import make_plan


def vector_model(n: int = 3):
    x = pyro.sample("x", dist.Normal(torch.zeros(n), 1.0).to_event(1))
    return pyro.sample("y", dist.Normal(x, 1.0).to_event(1))


def diverged_guide(bad_value: float) -> AutoNormal:
    pyro.clear_param_store()
    guide = AutoNormal(vector_model)
    guide()
    with torch.no_grad():
        guide.locs.x[1] = bad_value
    return guide


# --- non-finite draws ------------------------------------------------------------------------


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_a_diverged_guide_raises_naming_the_site_and_sample(bad_value):
    guide = diverged_guide(bad_value)
    with pytest.raises(ValueError, match=r"site 'x': sample 0 holds (nan|inf) .*allow_nonfinite=True"):
        Predictive(vector_model, guide=guide, num_samples=5, progress=False)()
    kept = Predictive(vector_model, guide=guide, num_samples=5, progress=False, allow_nonfinite=True)()
    assert not torch.isfinite(kept["x"][:, 1]).any()
    pyro.clear_param_store()


def test_the_first_bad_sample_is_named_in_a_later_batch():
    posterior = {"x": torch.zeros(10, 3)}
    posterior["x"][7, 2] = float("nan")
    runner = Predictive(vector_model, posterior_samples=posterior, plan=make_plan(10, 4), progress=False)
    with pytest.raises(ValueError, match=r"site 'y': sample 7 holds nan"):
        runner()


def test_the_check_passes_finite_values_whose_float32_sum_would_overflow():
    check_finite({"big": torch.full((4, 1000), 3e38), "ints": torch.tensor([[1, 2]])}, first=0)
    with pytest.raises(ValueError, match="site 'big': sample 5 holds -inf"):
        check_finite({"big": torch.tensor([[1.0], [-float("inf")]])}, first=4)


# --- bad input, named, before work ---------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("batch_size", 0, "Plan.batch_size: expected an integer >= 1"),
        ("num_samples", -1, "Plan.num_samples"),
        ("n_batches", 2, r"Plan.n_batches: 10 samples in batches of 4 make 3 batch\(es\); got 2"),
        ("device", "", "Plan.device"),
        ("vectorized", "yes", "Plan.vectorized"),
        ("predicted_peak_bytes", -5, "Plan.predicted_peak_bytes"),
        ("safety_factor", 0, "Plan.safety_factor"),
        ("reasons", "why", "Plan.reasons"),
    ],
)
def test_a_hand_made_plan_no_run_could_follow_is_rejected(field, value, message):
    fields = dataclasses.asdict(make_plan(10, 4))
    fields[field] = value
    with pytest.raises(ValueError, match=message):
        Plan(**fields)


def test_tiny_max_memory_says_what_is_short():
    with pytest.raises(ValueError) as error:
        plan_technical(100, 100, 2, 10, max_memory="cpu=10")
    assert "the results alone need 20.04 KB of host memory but only 10 B is usable" in str(error.value)
    assert "only 0 B is usable" not in str(error.value)


def test_cli_plan_rejects_categories_without_multinomial(capsys):
    shape = ["plan-predictive", "--cells", "10", "--features", "10", "--groups", "2", "--samples", "5"]
    with pytest.raises(SystemExit) as exit_info:
        ext_main([*shape, "--categories", "3"])
    assert exit_info.value.code == 2
    assert "n_categories: only the multinomial distribution has categories; got 3 with 'negbinom'" in capsys.readouterr().err
    assert ext_main([*shape, "--categories", "3", "--distribution", "multinomial"]) == 0


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"return_sites": 42}, TypeError, "return_sites: expected a list, tuple or set of site names; got int 42"),
        ({"return_sites": "beta_o"}, TypeError, "return_sites: expected a list"),
        ({"out": 12345}, TypeError, "out: expected a directory path"),
        ({"seed": -1}, ValueError, "seed: expected an integer >= 0"),
    ],
)
def test_wrong_types_are_named_errors(problem, options, error, message):
    _, guide = problem
    with pytest.raises(error, match=message):
        Predictive(technical_model, guide=guide, num_samples=3, **options)


def test_numpy_integers_and_torch_devices_are_accepted(problem):
    args, guide = problem
    plain = Predictive(technical_model, guide=guide, num_samples=6, minibatch_size=4, seed=1, device="cpu",
                       progress=False)
    numpy = Predictive(technical_model, guide=guide, num_samples=np.int64(6), minibatch_size=np.int32(4),
                       seed=np.uint8(1), device=torch.device("cpu"), progress=False)
    expected, got = plain(*args), numpy(*args)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    assert type(numpy.plan.batch_size) is int and numpy.plan.batch_size == 3
    plan = plan_technical(np.int64(50), np.int32(20), np.int64(2), np.int64(10), minibatch_size=np.int64(4),
                          device=torch.device("cpu"))
    assert json.loads(json.dumps(dataclasses.asdict(plan)))["batch_size"] == 4


def test_a_one_device_list_runs_here_not_on_ray(problem):
    args, guide = problem
    listed = Predictive(technical_model, guide=guide, num_samples=5, seed=2, device=["cpu"], progress=False)
    assert listed.memory_options.sharding is None
    expected = Predictive(technical_model, guide=guide, num_samples=5, seed=2, device="cpu", progress=False)(*args)
    got = listed(*args)
    assert listed.plan.device == "cpu"
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


# --- threads -------------------------------------------------------------------------------------


def test_two_threads_calling_predictive_get_correct_results(problem):
    args, guide = problem
    calls = 50

    def draw(seed: int) -> dict[str, torch.Tensor]:
        return Predictive(technical_model, guide=guide, num_samples=4, seed=seed, plan=make_plan(4, 2),
                          progress=False)(*args)

    expected = [draw(seed) for seed in range(calls)]
    results: dict[int, object] = {}

    def worker(seeds: range) -> None:
        for seed in seeds:
            try:
                results[seed] = draw(seed)
            except Exception as exc:  # recorded, so the assertion below reports it
                results[seed] = exc

    threads = [threading.Thread(target=worker, args=(range(k, calls, 2),)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    correct = sum(
        isinstance(results[seed], dict) and results[seed].keys() == expected[seed].keys()
        and all(torch.equal(results[seed][name], expected[seed][name]) for name in expected[seed])
        for seed in range(calls)
    )
    assert correct == calls

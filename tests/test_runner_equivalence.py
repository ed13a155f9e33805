"""devicemem.Predictive returns what pyro.infer.Predictive(parallel=True) returns: the same
keys, shapes and dtypes, draws from the same distribution, deterministic sites exactly."""

import pyro
import pytest
import torch
from pyro.infer.autoguide import AutoDiagonalNormal

from bayesDREAM_ext.model import technical_model
from devicemem.predictive import Predictive
from tests.runner_fakes import cell_model, cell_problem, expected_from_report, make_plan, technical_problem

def _diagonal_problem():
    """cell_model with a guide outside the closed-form ones: drawn by tracing the guide."""
    args, _ = cell_problem(steps=0)
    guide = AutoDiagonalNormal(pyro.poutine.block(cell_model, hide=["x"]))
    guide(*args)
    return args, guide


PROBLEMS = {
    "technical_nb": (technical_model, technical_problem),
    "cell_plate_latents": (cell_model, cell_problem),
    "traced_guide": (cell_model, _diagonal_problem),
}


@pytest.fixture(params=sorted(PROBLEMS))
def problem(request):
    model, build = PROBLEMS[request.param]
    args, guide = build()
    yield model, args, guide
    pyro.clear_param_store()


def _layout(samples):
    return {name: (tuple(value.shape), value.dtype, value.device.type) for name, value in samples.items()}


def test_batches_are_seeded_draws_in_order(problem):
    model, args, guide = problem
    runner = Predictive(model, guide=guide, num_samples=23, seed=5, plan=make_plan(23, 6), progress=False)
    ours = runner(*args)
    assert [(row.start, row.size) for row in runner.report] == [(0, 6), (6, 6), (12, 6), (18, 5)]
    expected = expected_from_report(model, guide, runner.report, 5, args)
    assert _layout(ours) == _layout(expected)
    for name in expected:
        assert torch.equal(ours[name], expected[name]), name


def test_means_agree_with_pyro_within_monte_carlo_error(problem):
    model, args, guide = problem
    num_samples = 400
    ours = Predictive(model, guide=guide, num_samples=num_samples, seed=1, plan=make_plan(num_samples, 64),
                      progress=False)(*args)
    pyro.set_rng_seed(123)
    theirs = pyro.infer.Predictive(model, guide=guide, num_samples=num_samples, parallel=True)(*args)
    assert _layout(ours) == _layout(theirs)
    for name in theirs:
        a, b = ours[name].double(), theirs[name].double()
        error = torch.sqrt((a.var(0) + b.var(0)) / num_samples) + 1e-9
        z = (a.mean(0) - b.mean(0)).abs() / error
        assert z.max() < 5.5, f"{name}: largest |difference| is {z.max():.1f} standard errors"


def test_return_sites_and_return_value_like_pyro():
    args, guide = cell_problem()
    sites = ["z", "_RETURN", "x"]
    ours = Predictive(cell_model, guide=guide, num_samples=9, return_sites=sites, seed=2, plan=make_plan(9, 4),
                      progress=False)(*args)
    theirs = pyro.infer.Predictive(cell_model, guide=guide, num_samples=9, return_sites=sites, parallel=True)(*args)
    assert _layout(ours) == _layout(theirs)


def test_posterior_samples_like_pyro():
    args, guide = technical_problem()
    torch.manual_seed(0)
    posterior = {
        name: value.detach()
        for name, value in pyro.infer.Predictive(technical_model, guide=guide, num_samples=10, parallel=True)(*args).items()
        if name in ("log2_alpha_y", "beta_o", "o_y", "mu_ntc")
    }
    runner = Predictive(technical_model, posterior_samples=posterior, seed=4, plan=make_plan(10, 3), progress=False)
    ours = runner(*args)
    theirs = pyro.infer.Predictive(technical_model, posterior_samples=posterior, parallel=True)(*args)
    assert _layout(ours) == _layout(theirs)
    assert set(ours) == {"y_obs", "alpha_y_mul", "delta_y_add"}
    for name in ("alpha_y_mul", "delta_y_add"):
        assert torch.equal(ours[name], theirs[name]), "deterministic sites follow the posterior samples in order"


def test_sequential_plan_gives_pyro_shapes():
    args, guide = technical_problem()
    runner = Predictive(technical_model, guide=guide, num_samples=7, seed=0, plan=make_plan(7, 3, vectorized=False),
                        progress=False)
    ours = runner(*args)
    theirs = pyro.infer.Predictive(technical_model, guide=guide, num_samples=7, parallel=True)(*args)
    assert _layout(ours) == _layout(theirs)
    assert [row.size for row in runner.report] == [3, 3, 1]


def test_same_seed_same_plan_same_draws_and_global_rng_untouched():
    args, guide = technical_problem()
    torch.manual_seed(77)
    state = torch.get_rng_state()
    first = Predictive(technical_model, guide=guide, num_samples=12, seed=9, plan=make_plan(12, 5), progress=False)(*args)
    assert torch.equal(torch.get_rng_state(), state)
    second = Predictive(technical_model, guide=guide, num_samples=12, seed=9, plan=make_plan(12, 5), progress=False)(*args)
    other = Predictive(technical_model, guide=guide, num_samples=12, seed=9, plan=make_plan(12, 4), progress=False)(*args)
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["y_obs"], other["y_obs"])


def test_planned_run_records_the_planners_plan():
    args, guide = technical_problem()
    runner = Predictive(technical_model, guide=guide, num_samples=30, device="cpu", seed=0, progress=False)
    ours = runner(*args)
    theirs = pyro.infer.Predictive(technical_model, guide=guide, num_samples=30, parallel=True)(*args)
    assert _layout(ours) == _layout(theirs)
    assert runner.plan.device == "cpu" and runner.plan.num_samples == 30 and runner.plan.reasons
    sizes = [row.size for row in runner.report]
    assert sum(sizes) == 30 and len(sizes) == runner.plan.n_batches and max(sizes) == runner.plan.batch_size

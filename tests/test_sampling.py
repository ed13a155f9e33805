"""devicemem.sampling: vectorised draws with Pyro's Predictive semantics, the model traced once."""

from __future__ import annotations

from pathlib import Path

import pyro
import pytest
import torch
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoDelta, AutoDiagonalNormal, AutoNormal

from bayesDREAM_ext.data import prepare_technical
from bayesDREAM_ext.model import build_model_inputs
from bayesDREAM_ext.synthetic import synthetic_data
from devicemem.sampling import Sampler, closed_form, select_sites
from tests.runner_fakes import cell_model, cell_problem

NUM = 2000


def _technical(distribution: str, guide_class=AutoNormal):
    synthetic = synthetic_data(distribution, 50, 30, 3, n_categories=3, seed=0)
    data = prepare_technical(synthetic.counts, synthetic.groups, synthetic.sum_factors,
                             distribution=distribution, denominator=synthetic.denominator)
    inputs = build_model_inputs(data)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = guide_class(inputs.model)
    with torch.no_grad():
        guide(**inputs.kwargs)
    observe = dict(inputs.kwargs, observe=True)
    if distribution != "multinomial":  # its likelihood is a factor on the observed counts
        observe["counts"] = None
    return inputs.model, guide, observe


def _assert_same_distribution(ours: dict, theirs: dict, num: int) -> None:
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    for name in theirs:
        a, b = ours[name].double(), theirs[name].double()
        if a.numel() == 0:
            continue
        z = (a.mean(0) - b.mean(0)).abs() / (torch.sqrt((a.var(0) + b.var(0)) / num) + 1e-9)
        assert z.max() < 5.5, f"{name}: largest |difference| is {z.max():.1f} standard errors"


@pytest.mark.parametrize("distribution", ["negbinom", "normal", "studentt", "binomial", "multinomial"])
def test_every_technical_distribution_draws_like_pyro(distribution):
    # multinomial's Dirichlet site has an event dim: it must line up with the plates, not the event
    model, guide, kwargs = _technical(distribution)
    sampler = Sampler(model, guide, (), kwargs)
    assert sampler.closed_form
    torch.manual_seed(0)
    ours = sampler.draw(NUM, (), kwargs, select_sites(sampler.sites, (), True, None))
    theirs = Predictive(model, guide=guide, num_samples=NUM, parallel=True)(**kwargs)
    _assert_same_distribution(ours, theirs, NUM)


def test_a_traced_guide_draws_like_pyro():
    args, _ = cell_problem(steps=0)
    guide = AutoDiagonalNormal(pyro.poutine.block(cell_model, hide=["x"]))
    guide(*args)
    sampler = Sampler(cell_model, guide, args, {})
    assert not sampler.closed_form
    ours = sampler.draw(NUM, args, {}, select_sites(sampler.sites, (), True, None))
    theirs = Predictive(cell_model, guide=guide, num_samples=NUM, parallel=True)(*args)
    _assert_same_distribution(ours, theirs, NUM)


def test_each_draw_runs_the_model_and_guide_once_vectorised():
    args, guide = cell_problem(steps=0)
    calls = []

    def counted(*a):
        calls.append(a)
        return cell_model(*a)

    traced = AutoDiagonalNormal(pyro.poutine.block(cell_model, hide=["x"]))
    traced(*args)
    guide_calls = []

    def counted_guide(*a):
        guide_calls.append(a)
        return traced(*a)

    sampler = Sampler(counted, counted_guide, args, {})
    assert (len(calls), len(guide_calls)) == (1, 1), "learning the shapes: one unvectorised run each"
    for _ in range(3):
        sampler.draw(5, args, {}, ["x"])
    assert (len(calls), len(guide_calls)) == (4, 4), "then one run of each per draw (Pyro's Predictive: three)"


def test_auto_delta_draws_are_its_point():
    model, guide, kwargs = _technical("negbinom", AutoDelta)
    sampler = Sampler(model, guide, (), kwargs)
    assert sampler.closed_form
    draws = sampler.draw(7, (), kwargs, ["log2_alpha_y", "o_y"])
    assert torch.equal(draws["o_y"][3].flatten(), guide.o_y.detach().flatten())
    assert torch.equal(draws["log2_alpha_y"][0], draws["log2_alpha_y"][6])


def test_closed_form_only_for_fitted_auto_normal_and_auto_delta():
    args, guide = cell_problem(steps=0)
    assert not closed_form(guide), "not yet run: no prototype to draw from"
    guide(*args)
    assert closed_form(guide)

    class Custom(AutoNormal):
        pass

    custom = Custom(cell_model)
    custom(*args)
    assert not closed_form(custom), "a subclass may change forward(): it is traced"
    assert not closed_form(lambda *a: None)


def test_return_sites_follow_pyro_defaults():
    args, guide = cell_problem(steps=0)
    sites = Sampler(cell_model, guide, args, {}).sites
    assert set(select_sites(sites, (), True, None)) == {"scale", "w", "z", "x"}
    assert set(select_sites(sites, ("z", "_RETURN"), True, None)) == {"z", "_RETURN"}
    posterior = {"scale": torch.ones(3), "w": torch.zeros(3, 8)}
    assert set(select_sites(sites, (), False, posterior)) == {"z", "x"}


def test_closed_form_draws_go_into_the_given_buffers_unchanged():
    args, guide = cell_problem()
    sampler = Sampler(cell_model, guide, args, {})
    returned = select_sites(sampler.sites, (), True, None)
    torch.manual_seed(3)
    plain = sampler.draw(6, args, {}, returned)
    out = {"w": torch.full((6,) + sampler.sites["w"].shape, float("nan")), "scale": torch.empty(6, 1, 1)}
    torch.manual_seed(3)
    direct = sampler.draw(6, args, {}, returned, out=out)
    for name in out:  # scale: exp then an affine map, in place; w: the identity
        assert direct[name].data_ptr() == out[name].data_ptr(), name
    assert all(torch.equal(direct[name], plain[name]) for name in plain)


def _scaled(n: int):
    sigma = pyro.sample("sigma", pyro.distributions.LogNormal(0.0, 1.0))
    with pyro.plate("n", n):
        return pyro.sample("y", pyro.distributions.Normal(0.0, sigma))


def test_draws_skip_pyros_argument_checks_unless_validate():
    from devicemem import Predictive
    from tests.runner_fakes import make_plan

    bad = {"sigma": torch.tensor([1.0, -1.0, 2.0])}  # a scale Pyro's checks reject
    options = dict(posterior_samples=bad, plan=make_plan(3, 3), progress=False)
    with pyro.validation_enabled(True):
        drawn = Predictive(_scaled, **options)(4)
        assert drawn["y"].shape == (3, 4)
        with pytest.raises(ValueError, match="scale"):
            Predictive(_scaled, validate=True, **options)(4)


def test_a_run_does_not_import_sympy():
    # torch.broadcast_shapes (and Transform.forward_shape) import torch.fx's symbolic shapes and
    # sympy: about a second of a fresh process, more than the whole params-only run it is in.
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from tests.runner_fakes import cell_model, cell_problem, make_plan\n"
        "from devicemem import Predictive\n"
        "args, guide = cell_problem(steps=0)\n"
        "guide(*args)\n"
        "assert 'sympy' not in sys.modules\n"
        "Predictive(cell_model, guide=guide, num_samples=8, plan=make_plan(8, 8), progress=False)(*args)\n"
        "Predictive(cell_model, guide=guide, num_samples=8, device='cpu', progress=False)(*args)\n"
        "print('sympy' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[1]
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.strip().splitlines()[-1] == "False"

"""devicemem.Predictive as a drop-in for pyro.infer.Predictive: Pyro's signature and rules, and
the same keys, shapes and dtypes as Pyro in every case; values agree in distribution (a
two-sample Kolmogorov-Smirnov test against Pyro's own draws), not bit for bit."""

import logging

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import AutoNormal
from pyro.infer.reparam import SplitReparam
from scipy import stats

import devicemem
from devicemem import Predictive
from devicemem.sampling import NotVectorised
from tests.runner_fakes import fake_gpu

N, T, G = 20, 4, 6


def plated_model(y=None):
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("t", T, dim=-1):
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        with pyro.plate("n", N, dim=-2):
            return pyro.sample("y", dist.Normal(loc, sigma), obs=y)


def vector_model(y=None):
    """A to_event(1) latent outside the plates, used inside them (the issue's example)."""
    mu = pyro.sample("mu", dist.LogNormal(torch.zeros(T), 1.0).to_event(1))
    with pyro.plate("t", T, dim=-1), pyro.plate("n", N, dim=-2):
        return pyro.sample("y", dist.Normal(mu.log(), 1.0), obs=y)


def item_model():
    """Does not vectorise: a Python float from a latent (``.item()``)."""
    scale = pyro.sample("scale", dist.HalfNormal(1.0))
    with pyro.plate("g", G):
        return pyro.sample("y", dist.Normal(0.0, scale.item()))


def expand_model():
    """Does not vectorise: ``expand(G)`` of a scalar latent, as bayesDREAM's cis model does."""
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    with pyro.plate("g", G):
        return pyro.sample("y", dist.Normal(loc.expand(G), 1.0))


def _layout(samples):
    return {name: (tuple(value.shape), value.dtype) for name, value in samples.items()}


def _same_distribution(ours, theirs, index=(0,)):
    a, b = ours[(slice(None),) + index].double().numpy(), theirs[(slice(None),) + index].double().numpy()
    assert stats.ks_2samp(a, b).pvalue > 1e-3


@pytest.fixture
def data():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield torch.randn(N, T) + 0.5
    pyro.clear_param_store()


@pytest.fixture
def guide(data):
    guide = AutoNormal(plated_model)
    svi = pyro.infer.SVI(plated_model, guide, pyro.optim.Adam({"lr": 0.05}), pyro.infer.Trace_ELBO())
    for _ in range(20):
        svi.step(data)
    return guide


def _posterior(num):
    return {"sigma": torch.rand(num) + 0.5, "loc": torch.randn(num, 1, T)}


@pytest.mark.parametrize("parallel", [True, False, None])
def test_positional_and_keyword_construction_match_pyro(parallel):
    posterior = _posterior(300)
    positional = Predictive(plated_model, posterior, None, None, (), parallel, seed=0, progress=False)()
    keyword = Predictive(plated_model, posterior_samples=posterior, parallel=parallel, seed=0, progress=False)()
    theirs = pyro.infer.Predictive(plated_model, posterior, None, None, (), bool(parallel))()
    assert list(positional) == list(theirs) == ["y"] and _layout(positional) == _layout(theirs)
    assert all(torch.equal(positional[name], keyword[name]) for name in positional)
    _same_distribution(positional["y"], theirs["y"], (3, 1))


@pytest.mark.parametrize("parallel", [True, False])
def test_guide_draws_match_pyro_in_both_modes(guide, data, parallel):
    ours = Predictive(plated_model, guide=guide, num_samples=300, parallel=parallel, progress=False)(None)
    theirs = pyro.infer.Predictive(plated_model, guide=guide, num_samples=300, parallel=parallel)(None)
    assert _layout(ours) == _layout(theirs)
    for name, index in (("sigma", ()), ("loc", (0, 2)), ("y", (5, 2))):
        _same_distribution(ours[name], theirs[name], index)


def test_an_nn_module_with_pyros_methods(guide):
    predictive = Predictive(plated_model, guide=guide, num_samples=5, seed=1, progress=False)
    assert isinstance(predictive, torch.nn.Module)
    assert dict(predictive.named_children()) == {"guide": guide}, "the guide is a submodule, as in Pyro"
    forward = predictive.forward(None)
    assert all(torch.equal(forward[name], value) for name, value in predictive(None).items())
    with pytest.warns(DeprecationWarning, match="`.get_samples` has been deprecated in favor of `.forward`"):
        assert predictive.get_samples(None).keys() == forward.keys()
    assert [value.shape for value in predictive.call(None)] == [forward[name].shape for name in sorted(forward)]


def test_get_vectorized_trace_has_pyros_sites_and_shapes(guide):
    ours = Predictive(plated_model, guide=guide, num_samples=7).get_vectorized_trace(None)
    theirs = pyro.infer.Predictive(plated_model, guide=guide, num_samples=7).get_vectorized_trace(None)
    shapes = {name: tuple(node["value"].shape) for name, node in theirs.nodes.items() if node["type"] == "sample"}
    assert {name: tuple(ours.nodes[name]["value"].shape) for name in shapes} == shapes


def test_prior_predictive_without_guide_or_posterior():
    ours = Predictive(plated_model, num_samples=400, progress=False)()
    theirs = pyro.infer.Predictive(plated_model, num_samples=400, parallel=True)()
    assert _layout(ours) == _layout(theirs) and list(ours) == ["sigma", "loc", "y"]
    for name, index in (("sigma", ()), ("loc", (0, 1)), ("y", (2, 3))):
        _same_distribution(ours[name], theirs[name], index)


def test_vector_latent_from_a_guide(data):
    guide = AutoNormal(vector_model)
    guide(data)
    ours = Predictive(vector_model, guide=guide, num_samples=4, progress=False)(None)
    theirs = pyro.infer.Predictive(vector_model, guide=guide, num_samples=4, parallel=True)(None)
    assert _layout(ours) == _layout(theirs) == {"mu": ((4, 1, 1, T), torch.float32), "y": ((4, N, T), torch.float32)}


@pytest.mark.parametrize("parallel", [True, False])
def test_vector_latents_from_nuts(data, parallel):
    mcmc = MCMC(NUTS(vector_model), num_samples=30, warmup_steps=15, disable_progbar=True)
    mcmc.run(data)
    posterior = mcmc.get_samples()
    assert posterior["mu"].shape == (30, T)
    ours = Predictive(vector_model, posterior, parallel=parallel, progress=False)(None)
    theirs = pyro.infer.Predictive(vector_model, posterior, parallel=parallel)(None)
    assert _layout(ours) == _layout(theirs) == {"y": ((30, N, T), torch.float32)}
    mean = posterior["mu"].log()[:, None, :]
    assert float((ours["y"] - mean).mean()) == pytest.approx(0.0, abs=0.1), "y follows each sample's mu"


@pytest.mark.parametrize("parallel", [True, False, None])
def test_one_sample_posterior(parallel):
    posterior = _posterior(1)
    ours = Predictive(plated_model, posterior, parallel=parallel, progress=False)()
    theirs = pyro.infer.Predictive(plated_model, posterior, parallel=bool(parallel))()
    assert _layout(ours) == _layout(theirs) == {"y": ((1, N, T), torch.float32)}


@pytest.mark.parametrize("parallel", [True, False])
def test_observed_sites_are_a_stride_0_view_of_the_data(data, parallel):
    posterior = _posterior(50)
    sites = ["y", "loc"]
    ours = Predictive(plated_model, posterior, return_sites=sites, parallel=parallel, progress=False)(data)
    theirs = pyro.infer.Predictive(plated_model, posterior, return_sites=sites, parallel=parallel)(data)
    assert _layout(ours) == _layout(theirs)
    assert torch.equal(ours["y"], theirs["y"]) and ours["y"].stride()[0] == 0
    assert ours["y"].untyped_storage().nbytes() == data.numel() * data.element_size(), "one copy, not 50"


def test_lenient_cases_warn_and_continue_as_pyro_does():
    posterior = _posterior(6)
    with pytest.warns(UserWarning, match="leading dimension size 6 is different from the provided 9"):
        predictive = Predictive(plated_model, posterior, num_samples=9, progress=False)
    assert predictive.num_samples == 6 and predictive()["y"].shape[0] == 6
    with pytest.warns(UserWarning, match=r"no site\(s\) \['nope'\]; they are left out"):
        ours = Predictive(plated_model, posterior, return_sites=["y", "nope"], progress=False)()
    assert list(ours) == list(pyro.infer.Predictive(plated_model, posterior, return_sites=["y", "nope"])()) == ["y"]

    def returns_none():
        plated_model()

    with pytest.warns(UserWarning, match="return value is not a tensor; '_RETURN' is left out"):
        ours = Predictive(returns_none, num_samples=3, return_sites=["_RETURN", "y"], progress=False)()
    assert list(ours) == ["y"], "Pyro (parallel=True) returns {'_RETURN': None, 'y': ...}; its default raises"


@pytest.mark.parametrize("return_sites", [None, (), ["loc", "_RETURN"]])
def test_return_sites_select_what_pyro_selects(return_sites):
    posterior = {"sigma": torch.rand(5) + 0.5}
    ours = Predictive(plated_model, posterior, return_sites=return_sites, progress=False)()
    theirs = pyro.infer.Predictive(plated_model, posterior, return_sites=return_sites, parallel=True)()
    assert list(ours) == list(theirs) and _layout(ours) == _layout(theirs)


@pytest.mark.parametrize("model, message", [(item_model, "converted to Scalar"), (expand_model, "expand")])
def test_a_model_that_does_not_vectorise(model, message, caplog):
    pyro.set_rng_seed(1)
    with caplog.at_level(logging.INFO, logger="devicemem"):
        ours = Predictive(model, num_samples=300, progress=False)()
    fallback = [r.getMessage() for r in caplog.records if "does not vectorise" in r.getMessage()]
    assert len(fallback) == 1 and "one at a time" in fallback[0], caplog.text
    theirs = pyro.infer.Predictive(model, num_samples=300)()
    assert _layout(ours) == _layout(theirs)
    _same_distribution(ours["y"], theirs["y"], (2,))
    with pytest.raises(RuntimeError, match=message):
        Predictive(model, num_samples=4, parallel=True, progress=False)()


def test_a_vectorised_site_of_the_wrong_shape_names_the_site():
    # The prior of vector_model: mu's event dim pushes the sample dim left of the plates, so
    # under Pyro's sample plate y comes out [S, S, N, T].
    with pytest.raises(NotVectorised, match="site 'y'"):
        Predictive(vector_model, num_samples=4, parallel=True, progress=False)()
    ours = Predictive(vector_model, num_samples=4, progress=False)()
    assert _layout(ours) == _layout(pyro.infer.Predictive(vector_model, num_samples=4)())


def test_improper_uniform_sites_of_a_split_reparam():
    def model():
        with pyro.plate("p", 3):
            pyro.sample("x", dist.Normal(torch.zeros(3, 4), 1.0).to_event(1))

    split = poutine.reparam(model, {"x": SplitReparam([1, 3], -1)})
    guide = AutoNormal(split)
    guide()
    sites = ["x_split_0", "x_split_1", "x"]
    ours = Predictive(split, guide=guide, num_samples=5, return_sites=sites, progress=False)()
    theirs = pyro.infer.Predictive(split, guide=guide, num_samples=5, return_sites=sites, parallel=True)()
    assert _layout(ours) == _layout(theirs)
    assert torch.equal(ours["x"], torch.cat([ours["x_split_0"], ours["x_split_1"]], -1))


def test_on_device_is_called_with_the_device_before_batches():
    seen = []
    Predictive(plated_model, num_samples=3, device="cpu", progress=False, on_device=seen.append)()
    assert seen == [torch.device("cpu")] * 2, "once before the planner's probe, once before the batches"


def test_routing_makes_pyro_infer_predictive_devicemems_and_restores_it():
    original = pyro.infer.Predictive
    posterior = _posterior(4)
    with pytest.raises(KeyError, match="inside"):
        with devicemem.routing(progress=False, seed=3):
            routed = pyro.infer.Predictive(plated_model, posterior, None, None, (), True)
            assert isinstance(routed, Predictive) and pyro.infer.predictive.Predictive is pyro.infer.Predictive
            assert routed.draw_options.seed == 3 and routed.parallel is True
            with devicemem.routing(seed=4, max_memory="cpu=1GB"):
                inner = pyro.infer.Predictive(plated_model, posterior_samples=posterior)
                assert inner.draw_options.seed == 4 and inner.draw_options.progress is False
            assert pyro.infer.Predictive(plated_model, posterior).draw_options.seed == 3, "the outer route is back"
            assert routed()["y"].shape == (4, N, T)
            raise KeyError("inside")
    assert pyro.infer.Predictive is original and pyro.infer.predictive.Predictive is original
    devicemem.route(progress=False)
    assert pyro.infer.Predictive is not original
    assert devicemem.unroute() and not devicemem.unroute()
    assert pyro.infer.Predictive is original
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['devise'\]"):
        devicemem.route(devise="cpu")
    assert pyro.infer.Predictive is original


def test_sequential_mode_moves_to_the_host_when_the_device_runs_out_of_memory(caplog):
    with fake_gpu() as gpu:
        calls = []

        def model():
            calls.append(gpu.active)
            if gpu.active and len(calls) > 6:
                raise torch.OutOfMemoryError("fake")
            return item_model()

        seen = []
        with caplog.at_level(logging.WARNING, logger="devicemem"):
            predictive = Predictive(model, num_samples=40, parallel=False, device="cuda:0", seed=0, progress=False,
                                    on_device=seen.append)
            samples = predictive()
    assert len(seen) == 2, "on_device: once before the fake GPU's batches, once on the move to the host"
    assert samples["y"].shape == (40, G) and bool(torch.all(samples["y"] != 0))
    devices = [row.device for row in predictive.report]
    assert devices[0] == "cuda:0" and devices[-1] == "cpu" and sum(row.size for row in predictive.report) == 40
    assert "cuda:0 cannot hold one sample; moving the remaining" in caplog.text


def test_routing_names_stay_functions_after_their_module_is_imported():
    import importlib
    import types

    importlib.import_module("devicemem.routes")
    for name in ("routing", "route", "unroute"):
        assert not isinstance(getattr(devicemem, name), types.ModuleType), name


def test_on_device_is_called_before_the_planner_probes_the_model_on_a_device():
    from pyro.infer.autoguide import AutoNormal

    events = []

    def model(y=None):
        events.append("model")
        return plated_model(y)

    guide = AutoNormal(plated_model)
    guide()
    Predictive(model, guide=guide, num_samples=64, device="cpu", progress=False,
               on_device=lambda device: events.append("on_device"))()
    first = events.index("on_device")
    # before it only the shape-learning trace and the two-sample vectorisation check; the probe's
    # batches (two or more) and the run's batches come after
    assert first <= 2 and events.count("model") - first >= 3, events

"""The technical models: bayesDREAM's site names and Predictive shapes, the faster NB log_prob,
and the data-driven initial values."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoNormal
from pyro.infer.autoguide.initialization import init_to_median, init_to_value

from bayesDREAM_ext.data import prepare_technical
from bayesDREAM_ext.model import TechnicalNegativeBinomial, build_model_inputs
from bayesDREAM_ext.synthetic import synthetic_data

S = 5


def inputs_for(distribution: str, n_groups: int, n_cells: int = 60, n_features: int = 7):
    data = synthetic_data(distribution, n_cells, n_features, n_groups, n_categories=3, seed=3)
    prepared = prepare_technical(data.counts, data.groups, distribution=distribution, denominator=data.denominator)
    return prepared, build_model_inputs(prepared)


def predictive_shapes(inputs, **kwargs) -> dict[str, tuple[int, ...]]:
    pyro.clear_param_store()
    guide = AutoNormal(inputs.model, init_loc_fn=init_to_value(values=inputs.init_values, fallback=init_to_median))
    guide(**inputs.kwargs)
    samples = Predictive(inputs.model, guide=guide, num_samples=S, parallel=True)(**kwargs)
    return {name: tuple(value.shape) for name, value in samples.items()}


def test_negbinom_log_prob_and_gradients_equal_pyros():
    torch.manual_seed(0)
    counts = torch.poisson(torch.full((30, 6), 4.0))
    phi0, mu0 = torch.rand(6) + 0.5, torch.rand(30, 6) * 5 + 0.1
    results = []
    for cls in (dist.NegativeBinomial, TechnicalNegativeBinomial):
        phi, mu = phi0.clone().requires_grad_(), mu0.clone().requires_grad_()
        log_prob = cls(total_count=phi, logits=mu.log() - phi.log()).expand([30, 6]).log_prob(counts)
        log_prob.sum().backward()
        results.append((log_prob.detach(), phi.grad, mu.grad))
    for ours, pyros in zip(results[1], results[0]):
        torch.testing.assert_close(ours, pyros, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n_groups", [2, 3])
def test_negbinom_predictive_shapes_are_bayesdreams(n_groups):
    data, inputs = inputs_for("negbinom", n_groups)
    T, C = data.n_features, n_groups
    assert predictive_shapes(inputs, **inputs.params_only()) == {
        "log2_alpha_y": (S, C - 1, T),
        "alpha_y_mul": (S, C - 1, T),
        "delta_y_add": (S, C - 1, T),
        "beta_o": (S, 1, 1),
        "o_y": (S, 1, T),
        "mu_ntc": (S, 1, T),
    }


def test_negbinom_samples_counts_without_data():
    data, inputs = inputs_for("negbinom", 2)
    shapes = predictive_shapes(inputs, **{**inputs.kwargs, "counts": None})
    assert shapes["y_obs"] == (S, data.n_cells, data.n_features)


@pytest.mark.parametrize(
    "distribution, expected",
    [
        ("normal", {"log2_alpha_y", "alpha_y_mul", "delta_y_add", "sigma_y", "mu_ntc"}),
        ("studentt", {"log2_alpha_y", "alpha_y_mul", "delta_y_add", "sigma_y", "mu_ntc"}),
        ("binomial", {"log2_alpha_y", "alpha_y_mul", "delta_y_add", "mu_ntc"}),
        ("multinomial", {"alpha_logits_y", "alpha_logits_y_centered", "probs_baseline_raw", "probs_baseline"}),
    ],
)
def test_other_distributions_have_bayesdreams_sites(distribution, expected):
    data, inputs = inputs_for(distribution, 3)
    shapes = predictive_shapes(inputs, **inputs.params_only())
    assert set(shapes) == expected
    T, K = data.n_features, data.n_categories
    if distribution == "multinomial":
        assert shapes["alpha_logits_y"] == shapes["alpha_logits_y_centered"] == (S, 2, T, K)
        assert shapes["probs_baseline_raw"] == shapes["probs_baseline"] == (S, 1, 1, T, K)
    else:
        assert shapes["log2_alpha_y"] == shapes["delta_y_add"] == (S, 2, T)
        assert shapes["mu_ntc"] == (S, 1, T)


@pytest.mark.parametrize("distribution", ["negbinom", "normal", "binomial", "multinomial"])
def test_a_single_group_has_no_effect_site(distribution):
    _, inputs = inputs_for(distribution, 1)
    shapes = predictive_shapes(inputs, **inputs.params_only())
    assert not {"log2_alpha_y", "alpha_y_mul", "delta_y_add", "alpha_logits_y"} & set(shapes)


def test_multinomial_effects_are_centred_and_zero_on_masked_categories():
    data, inputs = inputs_for("multinomial", 2)
    mask = inputs.kwargs["zero_cat_mask"].clone()
    mask[0, 2] = True
    pyro.set_rng_seed(0)
    trace = pyro.poutine.trace(inputs.model).get_trace(**{**inputs.params_only(), "zero_cat_mask": mask})
    centred = trace.nodes["alpha_logits_y_centered"]["value"]
    assert centred[:, 0, 2].abs().max() == 0
    torch.testing.assert_close(centred.sum(dim=-1), torch.zeros(1, data.n_features), atol=1e-5, rtol=0)
    probs = trace.nodes["probs_baseline"]["value"]
    assert probs[0, 2] == 0
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(data.n_features))


def test_initial_effects_come_from_the_group_means():
    data, inputs = inputs_for("negbinom", 3)
    normalised = data.counts.dense() / data.sum_factors[:, None]
    means = [normalised[data.groups == g].mean(dim=0) for g in range(3)]
    expected = torch.stack([torch.log2(means[g] / means[0]) for g in (1, 2)])
    torch.testing.assert_close(inputs.init_values["log2_alpha_y"], expected, rtol=1e-4, atol=1e-4)
    data, inputs = inputs_for("normal", 2)
    counts = data.counts.dense()
    shift = counts[data.groups == 1].mean(dim=0) - counts[data.groups == 0].mean(dim=0)
    torch.testing.assert_close(inputs.init_values["log2_alpha_y"], shift[None])


def test_params_only_drops_the_data_matrices():
    _, inputs = inputs_for("binomial", 2)
    params = inputs.params_only()
    assert params["counts"] is None and params["denominator"] is None and params["observe"] is False
    assert np.all([value is not None for key, value in params.items() if key not in ("counts", "denominator")])


@pytest.mark.parametrize("n_groups", [1, 2])
def test_vectorised_multinomial_likelihood_grows_linearly_with_the_batch(n_groups):
    data, inputs = inputs_for("multinomial", n_groups)
    batch = 4
    vectorised = pyro.plate("samples", batch, dim=-4)(inputs.model)
    trace = pyro.poutine.trace(vectorised).get_trace(**inputs.kwargs)
    trace.compute_log_prob()
    assert trace.nodes["y_obs"]["log_prob"].shape == (batch, 1, data.n_cells, data.n_features)

"""fit_technical end to end: recovery of known effects for every distribution, bayesDREAM's
names and shapes for C = 1, 2, 3, excluded features scattered back, save/load, and resuming
from the trained guide when Predictive fails."""

from __future__ import annotations

import json
import tempfile

import numpy as np
import pandas as pd
import pytest
import torch

import bayesDREAM_ext.fit as fit_module
from bayesDREAM_ext.fit import PredictiveFailedError, fit_technical
from bayesDREAM_ext.records import TechnicalFit
from bayesDREAM_ext.synthetic import synthetic_data, synthetic_technical
from tests.runner_fakes import fake_gpu

QUIET = dict(progress=False, seed=0)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def test_negbinom_recovers_the_true_log2_effects():
    data = synthetic_technical(600, 120, 2, seed=0)
    fit = fit_technical(data.counts, data.groups, data.sum_factors, niters=200, nsamples=200, **QUIET)
    enough = data.mu_true * data.sum_factors.mean() >= 1.0
    recovered = fit.posterior_samples["log2_alpha_y"].mean(dim=0).numpy()
    assert enough.sum() >= 60
    assert pearson(recovered[0, enough], data.log2_alpha_true[0, enough]) >= 0.95
    assert fit.predictive_plan.device == "cpu" and fit.predictive_plan.num_samples == 200
    assert fit.svi_plan.device == "cpu" and fit.svi_plan.measured_peak_bytes is not None  # 0 when the step reuses resident heap


def test_auto_trains_and_samples_on_a_gpu_that_fits():
    data = synthetic_technical(60, 8, 2, seed=9)
    with fake_gpu():
        fit = fit_technical(data.counts, data.groups, data.sum_factors, niters=10, nsamples=6, **QUIET)
    assert fit.svi_plan.device == "cuda:0" and "SVI on cuda:0" in fit.svi_plan.reasons[0]
    assert fit.predictive_plan.device == "cuda:0"
    assert fit.posterior_samples["log2_alpha_y"].device.type == "cpu"


@pytest.mark.parametrize(
    "distribution, n_groups",
    [("normal", 3), ("studentt", 2), ("binomial", 3), ("multinomial", 2)],
)
def test_other_distributions_recover_their_effects(distribution, n_groups):
    data = synthetic_data(distribution, 300, 30, n_groups, seed=4)
    fit = fit_technical(data.counts, data.groups, distribution=distribution, denominator=data.denominator,
                        niters=100, nsamples=100, **QUIET)
    site = "alpha_logits_y_centered" if distribution == "multinomial" else "log2_alpha_y"
    recovered = fit.posterior_samples[site].mean(dim=0).numpy()
    assert fit.feature_mask.all()
    assert pearson(recovered, data.effects_true) >= 0.9


@pytest.mark.parametrize("n_groups", [1, 2, 3])
def test_negbinom_names_and_shapes(n_groups):
    data = synthetic_technical(60, 9, n_groups, seed=2)
    fit = fit_technical(data.counts, data.groups, data.sum_factors, niters=15, nsamples=7, **QUIET)
    S, C, T = 7, n_groups, 9
    samples = fit.posterior_samples
    assert {name: tuple(value.shape) for name, value in samples.items()} == {
        "log2_alpha_y": (S, C - 1, T),
        "alpha_y_mul": (S, C - 1, T),
        "delta_y_add": (S, C - 1, T),
        "beta_o": (S, 1, 1),
        "o_y": (S, 1, T),
        "mu_ntc": (S, 1, T),
        "alpha_y_mult": (S, C, T),
        "alpha_y_add": (S, C, T),
    }
    assert all(value.device.type == "cpu" for value in samples.values())
    assert torch.equal(samples["alpha_y_mult"][:, 0], torch.ones(S, T))
    assert torch.equal(samples["alpha_y_add"][:, 0], torch.zeros(S, T))
    assert torch.equal(samples["alpha_y_mult"][:, 1:], samples["alpha_y_mul"])
    assert torch.equal(samples["alpha_y_add"][:, 1:], samples["delta_y_add"])
    torch.testing.assert_close(samples["alpha_y_mul"], 2.0 ** samples["log2_alpha_y"])


@pytest.mark.parametrize("n_groups", [1, 2])
def test_multinomial_names_and_shapes(n_groups):
    data = synthetic_data("multinomial", 40, 5, n_groups, n_categories=4, seed=3)
    fit = fit_technical(data.counts, data.groups, distribution="multinomial", niters=15, nsamples=6, **QUIET)
    S, C, T, K = 6, n_groups, 5, 4
    assert {name: tuple(value.shape) for name, value in fit.posterior_samples.items()} == {
        "alpha_logits_y": (S, C - 1, T, K),
        "alpha_logits_y_centered": (S, C - 1, T, K),
        "probs_baseline_raw": (S, 1, 1, T, K),
        "probs_baseline": (S, 1, 1, T, K),
        "alpha_y_add": (S, C, T, K),
    }
    assert torch.equal(fit.posterior_samples["alpha_y_add"][:, 0], torch.zeros(S, T, K))


def test_excluded_features_get_no_effect_and_nan_baselines():
    data = synthetic_technical(80, 8, 2, seed=5)
    counts = data.counts.copy()
    counts[:, 2] = 0
    counts[:, 5] = 4
    fit = fit_technical(counts, data.groups, data.sum_factors, niters=15, nsamples=5, **QUIET)
    samples, out, kept = fit.posterior_samples, [2, 5], [0, 1, 3, 4, 6, 7]
    assert fit.feature_mask.tolist() == [i in kept for i in range(8)]
    assert fit.excluded == {"zero NTC counts": 1, "zero std": 1}
    for name in ("log2_alpha_y", "delta_y_add", "alpha_y_add"):
        assert (samples[name][..., out] == 0).all(), name
    for name in ("alpha_y_mul", "alpha_y_mult"):
        assert (samples[name][..., out] == 1).all(), name
    for name in ("mu_ntc", "o_y"):
        assert samples[name][..., out].isnan().all() and samples[name][..., kept].isfinite().all(), name
    assert (samples["log2_alpha_y"][..., kept] != 0).all()


def test_feature_names_and_genes_by_cells_input():
    data = synthetic_technical(40, 6, 2, seed=6)
    frame = pd.DataFrame(data.counts.T, index=[f"gene{i}" for i in range(6)], columns=[f"cell{i}" for i in range(40)])
    labels = np.where(data.groups == 0, "laneA", "laneB")
    fit = fit_technical(frame, labels, data.sum_factors, cells_axis=1, niters=10, nsamples=4, **QUIET)
    assert fit.feature_names == tuple(f"gene{i}" for i in range(6))
    assert fit.group_levels == ("laneA", "laneB")


def test_save_and_load_round_trip(tmp_path):
    data = synthetic_technical(60, 7, 3, seed=7)
    fit = fit_technical(data.counts, data.groups, data.sum_factors, niters=12, nsamples=5, schedule="bayesdream", **QUIET)
    assert fit.schedule == "bayesdream" and fit.learning_rates == [pytest.approx(0.4e-3)] * len(fit.losses)
    path = tmp_path / "fit.pt"
    fit.save(path)
    loaded = TechnicalFit.load(path)
    assert loaded.posterior_samples.keys() == fit.posterior_samples.keys()
    for name, value in fit.posterior_samples.items():
        assert torch.equal(loaded.posterior_samples[name], value)
    assert torch.equal(loaded.feature_mask, fit.feature_mask)
    assert loaded.losses == fit.losses and loaded.learning_rates == fit.learning_rates
    assert loaded.svi_plan == fit.svi_plan and loaded.predictive_plan == fit.predictive_plan
    assert loaded.group_levels == (0, 1, 2) and loaded.timings == fit.timings and loaded.schedule == "bayesdream"
    stored = torch.load(path, weights_only=True)
    stored["metadata"] = json.dumps({k: v for k, v in json.loads(stored["metadata"]).items() if k != "schedule"})
    torch.save(stored, tmp_path / "older.pt")  # written before the schedule was recorded
    assert TechnicalFit.load(tmp_path / "older.pt").schedule is None
    torch.save({"something": torch.zeros(1), "metadata": '{"format": "other"}'}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a saved TechnicalFit"):
        TechnicalFit.load(tmp_path / "other.pt")


class FailingPredictive:
    """Stands in for devicemem.Predictive and fails like an out-of-memory run would."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory (injected)")


def test_a_failed_predictive_keeps_the_trained_guide_for_a_resume(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the recovery file goes
    data = synthetic_technical(100, 10, 2, seed=8)
    args = (data.counts, data.groups, data.sum_factors)
    options = dict(niters=25, nsamples=20, **QUIET)
    uninterrupted = fit_technical(*args, **options)
    with monkeypatch.context() as patch:
        patch.setattr(fit_module, "Predictive", FailingPredictive)
        with pytest.raises(PredictiveFailedError, match="guide_state") as failure:
            fit_technical(*args, **options)
    state = failure.value.guide_state
    assert len(state.losses) == len(uninterrupted.losses)

    def no_training(*a, **k):
        raise AssertionError("resuming must not train again")

    monkeypatch.setattr(fit_module, "train", no_training)
    resumed = fit_technical(*args, guide_state=state, **options)
    for name, value in uninterrupted.posterior_samples.items():
        torch.testing.assert_close(resumed.posterior_samples[name], value, equal_nan=True)
    assert resumed.losses == uninterrupted.losses
    with pytest.raises(ValueError, match="guide_state: it was trained on other data"):
        fit_technical(data.counts[:, :8], data.groups, data.sum_factors, guide_state=state, **options)


def test_iaf_guide_when_asked_and_it_fits():
    data = synthetic_technical(60, 6, 2, seed=10)
    fit = fit_technical(data.counts, data.groups, data.sum_factors, guide="iaf", niters=15, nsamples=4, **QUIET)
    assert fit.svi_plan.guide == "iaf" and "AutoIAFNormal (hidden size 58)" in fit.svi_plan.reasons[-1]
    assert fit.predictive_plan.reasons[-1].startswith("Will use one vectorised batch of 4")
    assert fit.posterior_samples["log2_alpha_y"].shape == (4, 1, 6)

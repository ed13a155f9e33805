"""summary(): columns and values against the posterior; describe() and convergence()."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bayesDREAM_ext.summary import Convergence, convergence, describe, summary
from tests.fit_fixtures import FEATURES, SAMPLES, fake_negbinom, small_fit

COLUMNS = ["feature", "group", "baseline", "effect_scale", "effect_mean", "effect_sd", "effect_q05", "effect_q95",
           "mu_ntc_mean", "dispersion_mean", "fitted"]


def test_columns_and_rows_run_feature_by_feature():
    fit = fake_negbinom(features=7, groups=3)
    table = summary(fit)
    assert list(table.columns) == COLUMNS
    assert len(table) == 7 * 2
    assert list(table["feature"][:4]) == ["g0", "g0", "g1", "g1"]
    assert list(table["group"][:4]) == ["b", "c", "b", "c"]
    assert set(table["baseline"]) == {"ctrl"} and set(table["effect_scale"]) == {"log2"}
    assert "negative binomial" in table.attrs["dispersion"]


def test_values_are_the_posterior_statistics():
    fit = fake_negbinom(samples=50, features=7, groups=3)
    table = summary(fit).set_index(["feature", "group"])
    effect = fit.posterior_samples["log2_alpha_y"].numpy()
    for t in (0, 4, 6):
        for c, group in enumerate(("b", "c")):
            row = table.loc[(f"g{t}", group)]
            draws = effect[:, c, t]
            assert row["effect_mean"] == pytest.approx(draws.astype(np.float64).mean(), rel=1e-12)
            assert row["effect_sd"] == pytest.approx(draws.astype(np.float64).std(ddof=1), rel=1e-12)
            assert row["effect_q05"] == pytest.approx(np.quantile(draws, 0.05), rel=1e-6)
            assert row["effect_q95"] == pytest.approx(np.quantile(draws, 0.95), rel=1e-6)
            assert row["effect_q05"] < row["effect_mean"] < row["effect_q95"]
            o_y = fit.posterior_samples["o_y"].numpy()[:, 0, t].astype(np.float64)
            assert row["dispersion_mean"] == pytest.approx((1.0 / o_y**2).mean(), rel=1e-12)
            mu = fit.posterior_samples["mu_ntc"].numpy()[:, 0, t].astype(np.float64)
            assert row["mu_ntc_mean"] == pytest.approx(mu.mean(), rel=1e-12)


def test_excluded_features_have_nan_effects_and_fitted_false():
    table = summary(fake_negbinom()).set_index("feature")
    excluded = table.loc["g2"]
    assert not excluded["fitted"].any()
    assert excluded[["effect_mean", "effect_sd", "effect_q05", "effect_q95", "mu_ntc_mean", "dispersion_mean"]].isna().all().all()
    assert table.drop(index="g2")["effect_mean"].notna().all()


def test_interval_names_follow_the_probability():
    table = summary(fake_negbinom(), interval=0.95)
    assert {"effect_q2.5", "effect_q97.5"} <= set(table.columns)
    with pytest.raises(ValueError, match="interval"):
        summary(fake_negbinom(), interval=1.0)


def test_without_feature_names_the_positions_name_them():
    fit = fake_negbinom(features=4)
    fit.feature_names = None
    assert list(summary(fit)["feature"].unique()) == ["0", "1", "2", "3"]


def test_multinomial_has_a_row_per_category():
    fit = fake_negbinom(samples=10, features=3, groups=2)
    rng = np.random.default_rng(1)
    fit.distribution = "multinomial"
    fit.posterior_samples = {
        "alpha_logits_y_centered": torch.from_numpy(rng.normal(size=(10, 1, 3, 4)).astype(np.float32)),
        "probs_baseline": torch.from_numpy(rng.dirichlet(np.ones(4), size=(10, 1, 1, 3)).astype(np.float32)),
    }
    table = summary(fit)
    assert list(table["category"][:5]) == [0, 1, 2, 3, 0]
    assert len(table) == 3 * 4
    row = table[(table["feature"] == "g1") & (table["category"] == 2)].iloc[0]
    effect = fit.posterior_samples["alpha_logits_y_centered"][:, 0, 1, 2].double()
    assert row["effect_mean"] == pytest.approx(effect.mean().item(), rel=1e-12)
    assert row["mu_ntc_mean"] == pytest.approx(fit.posterior_samples["probs_baseline"][:, 0, 0, 1, 2].double().mean().item(), rel=1e-12)
    assert table["dispersion_mean"].isna().all()


def test_a_single_group_gives_an_empty_table_with_the_columns():
    fit = fake_negbinom(groups=2)
    fit.group_levels = ("ctrl",)
    fit.posterior_samples["log2_alpha_y"] = fit.posterior_samples["log2_alpha_y"][:, :0]
    table = summary(fit)
    assert len(table) == 0 and list(table.columns) == COLUMNS


def test_a_real_fit_matches_its_posterior():
    fit = small_fit()
    table = summary(fit)
    assert len(table) == FEATURES * 2
    assert set(table["group"]) == {"lane2", "lane3"} and set(table["baseline"]) == {"lane1"}
    assert list(table.loc[~table["fitted"], "feature"].unique()) == ["gene3", "gene9"]
    samples = fit.posterior_samples["log2_alpha_y"].numpy()
    row = table[(table["feature"] == "gene5") & (table["group"] == "lane3")].iloc[0]
    assert row["effect_mean"] == pytest.approx(samples[:, 1, 5].astype(np.float64).mean(), rel=1e-12)
    assert row["effect_q95"] == pytest.approx(np.quantile(samples[:, 1, 5], 0.95), rel=1e-6)
    assert samples.shape[0] == SAMPLES


def test_describe_is_a_few_lines_without_tensors():
    text = describe(small_fit())
    assert len(text.splitlines()) <= 8
    assert "tensor(" not in text
    assert "16 features (14 fitted; excluded: 2 zero NTC counts)" in text
    assert "lane1 (baseline), lane2, lane3" in text


def _record(losses, converged=None):
    fit = fake_negbinom()
    fit.losses = list(losses)
    if converged is not None:
        fit.converged = converged
    return fit


def test_convergence_of_a_flat_loss_and_of_a_falling_one():
    rng = np.random.default_rng(0)
    flat = convergence(_record(1000.0 * np.exp(-np.arange(400) / 20.0) + 5000.0 + rng.normal(0, 0.5, 400)))
    assert flat.stopped_early and flat.judged and flat.converged and flat.status() == "converged"
    falling = convergence(_record(10000.0 - 5.0 * np.arange(400) + rng.normal(0, 0.5, 400)))
    assert falling.still_falling and not falling.converged
    assert falling.status() == "NOT converged"
    assert "more steps" in falling.text()


def test_a_rule_that_fired_while_the_loss_still_falls_is_called_out():
    state = convergence(_record(36000.0 - 2.0 * np.arange(200), converged=True))
    assert isinstance(state, Convergence) and not state.judged
    assert state.status() == "stopped early, loss still falling"

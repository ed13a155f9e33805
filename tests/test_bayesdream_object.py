"""fit_technical on a bayesDREAM object: its NTC cells in, the results written back where
bayesDREAM's fit_cis / fit_trans read them (checked by the fakes' readers)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

from bayesDREAM_ext.fit import fit_technical
from tests.bayesdream_fakes import FLAGS, FakeModality, MissingTechnicalFit, make_object

QUICK = dict(niters=20, nsamples=8, progress=False, seed=0)
S, C, T = 8, 2, 30
CIS = 3


@pytest.fixture(scope="module")
def fitted():
    obj = make_object()
    return obj, fit_technical(obj, sum_factor_col="sum_factor", **QUICK)


def test_fit_cis_and_fit_trans_run_on_the_written_back_object(fitted):
    obj, _ = fitted
    cis = obj.fit_cis(nsamples=5)
    trans = obj.fit_trans(nsamples=5)
    assert cis["x_obs"].shape == (5, 120) and trans["y_obs"].shape == (5, 120, T - 1)


def test_the_cis_gene_goes_to_the_object_and_the_cis_modality(fitted):
    obj, fit = fitted
    full = fit.posterior_samples
    assert obj.alpha_x_type == "posterior"
    assert torch.equal(obj.alpha_x_prefit, full["alpha_y_mult"][..., CIS])
    cis = obj.get_modality("cis").posterior_samples_technical
    assert tuple(cis["alpha_x_mult"].shape) == (S, C, 1) and tuple(cis["log2_alpha_x"].shape) == (S, C - 1, 1)
    assert torch.equal(cis["o_x"], full["o_y"][..., CIS : CIS + 1])
    assert torch.equal(cis["alpha_x_add"][:, 0], torch.zeros(S, 1))


def test_the_gene_modality_gets_every_site_without_the_cis_gene(fitted):
    obj, fit = fitted
    gene = obj.get_modality("gene")
    keep = [t for t in range(T) if t != CIS]
    assert gene.alpha_y_type == "posterior" and gene.alpha_y_prefit_add is None
    assert torch.equal(gene.alpha_y_prefit_mult, fit.posterior_samples["alpha_y_mult"][..., keep])
    shapes = {name: tuple(value.shape) for name, value in gene.posterior_samples_technical.items()}
    assert shapes == {
        "log2_alpha_y": (S, C - 1, T - 1), "alpha_y_mul": (S, C - 1, T - 1), "delta_y_add": (S, C - 1, T - 1),
        "beta_o": (S, 1, 1), "o_y": (S, 1, T - 1), "mu_ntc": (S, 1, T - 1),
        "alpha_y_mult": (S, C, T - 1), "alpha_y_add": (S, C, T - 1), "alpha_y": (S, C, T - 1),
    }
    assert gene.loss_technical == fit.losses and len(gene.loss_technical) >= 1


def test_feature_flags_mark_the_gene_without_ntc_counts(fitted):
    obj, fit = fitted
    flags = obj.counts_meta
    assert list(flags.index) == list(obj.counts.index) and all(column in flags for column in FLAGS)
    assert flags["ntc_zero_count"].tolist() == [False] * (T - 1) + [True]
    assert flags["ntc_excluded_from_fit"].tolist() == (~fit.feature_mask).tolist()
    assert (flags["technical_correction_applied"] == ~flags["ntc_excluded_from_fit"]).all()


def test_the_fake_readers_reject_an_object_without_a_technical_fit():
    obj = make_object()
    with pytest.raises(MissingTechnicalFit, match="alpha_x_prefit"):
        obj.fit_cis()
    with pytest.raises(MissingTechnicalFit, match="alpha_y_prefit"):
        obj.fit_trans()


def test_the_fake_readers_reject_results_that_keep_the_cis_gene(fitted):
    obj, fit = fitted
    wrong = make_object()
    wrong.alpha_x_prefit = fit.posterior_samples["alpha_y_mult"]
    wrong.alpha_x_type = "posterior"
    with pytest.raises(MissingTechnicalFit, match=r"not \[S, 2\]"):
        wrong.fit_cis()
    wrong.get_modality("gene").alpha_y_prefit_mult = fit.posterior_samples["alpha_y_mult"]
    wrong.get_modality("gene").alpha_y_type = "posterior"
    with pytest.raises(MissingTechnicalFit, match="not \\[S, 2, 29\\]"):
        wrong.fit_trans()


def test_cells_are_matched_by_name_not_by_meta_order(fitted):
    _, fit = fitted
    obj = make_object()
    obj.meta = obj.meta.sample(frac=1.0, random_state=1).reset_index(drop=True)
    shuffled = fit_technical(obj, **QUICK)
    for name, value in fit.posterior_samples.items():
        torch.testing.assert_close(shuffled.posterior_samples[name], value, equal_nan=True)


def test_a_modality_without_the_objects_counts_keeps_its_flags_in_feature_meta():
    obj = make_object()
    del obj.counts
    fit_technical(obj, modality="gene", **QUICK)
    gene = obj.get_modality("gene")
    assert obj.alpha_x_prefit is None and gene.alpha_y_prefit_mult.shape == (S, C, T - 1)
    assert gene.feature_meta["ntc_zero_count"].tolist() == [False] * (T - 2) + [True]


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda obj: obj.meta.pop("technical_group_code"), "set_technical_groups"),
        (lambda obj: obj.meta.pop("sum_factor"), "sum_factor_col"),
        (lambda obj: obj.meta.__setitem__("target", "GFI1B"), "no NTC cells"),
    ],
)
def test_bad_objects_fail_before_any_fitting(change, match):
    obj = make_object()
    change(obj)
    with pytest.raises(ValueError, match=match):
        fit_technical(obj, **QUICK)
    assert obj.alpha_x_prefit is None


def test_a_group_without_ntc_cells_is_an_error():
    obj = make_object()
    obj.meta.loc[obj.meta["target"] != "ntc", "technical_group_code"] = 2
    with pytest.raises(ValueError, match=r"\[2\] have no NTC cell"):
        fit_technical(obj, **QUICK)


def test_arrays_for_the_object_path_are_refused():
    obj = make_object()
    with pytest.raises(ValueError, match="groups: a bayesDREAM object brings its own"):
        fit_technical(obj, obj.meta["technical_group_code"], **QUICK)


def test_an_additive_modality_gets_alpha_y_prefit_add():
    obj = make_object()
    values = np.random.default_rng(0).normal(5.0, 1.0, size=(6, 120))
    obj.modalities["signal"] = FakeModality("signal", pd.DataFrame(values, columns=obj.meta["cell"]), "normal")
    fit = fit_technical(obj, modality="signal", **QUICK)
    signal = obj.get_modality("signal")
    assert fit.distribution == "normal" and signal.alpha_y_prefit_mult is None
    assert torch.equal(signal.alpha_y_prefit_add, fit.posterior_samples["alpha_y_add"])
    assert signal.alpha_y_prefit_add.shape == (S, C, 6) and signal.posterior_samples_technical["alpha_y"] is signal.alpha_y_prefit_add
    assert signal.feature_meta["technical_correction_applied"].all()
    assert obj.alpha_x_prefit is None and obj.get_modality("gene").alpha_y_prefit_mult is None


def test_a_sparse_modality_matches_its_dense_twin():
    dense, stored = make_object(), make_object()
    del dense.counts, stored.counts
    gene = stored.get_modality("gene")
    gene.counts = sparse.csr_matrix(gene.counts)
    fits = [fit_technical(obj, modality="gene", **QUICK) for obj in (dense, stored)]
    for name, value in fits[0].posterior_samples.items():
        torch.testing.assert_close(fits[1].posterior_samples[name], value, equal_nan=True)

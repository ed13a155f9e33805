"""fit_technical's input checks and conversions: every bad input is a ValueError naming the
problem, raised before any training; every accepted container gives the same data."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

import bayesDREAM_ext.fit as fit_module
from bayesDREAM_ext.data import prepare_technical
from bayesDREAM_ext.fit import fit_technical


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if fit_technical gets as far as planning or running SVI."""

    def forbidden(*args, **kwargs):
        raise AssertionError("training started before the bad input was rejected")

    monkeypatch.setattr(fit_module, "plan_training", forbidden)
    monkeypatch.setattr(fit_module, "train", forbidden)


def counts_groups(n_cells: int = 12, n_features: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(4.0, size=(n_cells, n_features)).astype(np.float32) + np.eye(n_cells, n_features, dtype=np.float32)
    groups = np.array([0, 1] * (n_cells // 2))
    return counts, groups


def _with(counts: np.ndarray, index: tuple, value: float) -> np.ndarray:
    counts = counts.copy()
    counts[index] = value
    return counts


C, G = counts_groups()
BAD_INPUTS = {
    "negative": (dict(counts=_with(C, (0, 0), -1)), "negative"),
    "nan": (dict(counts=_with(C, (1, 2), np.nan)), "NaN or infinite"),
    "inf": (dict(counts=_with(C, (1, 2), np.inf)), "NaN or infinite"),
    "non-integer negbinom": (dict(counts=_with(C, (0, 0), 1.5)), "non-integer"),
    "non-integer binomial": (dict(counts=_with(C, (0, 0), 0.5), distribution="binomial", denominator=C + 3), "non-integer"),
    "non-integer multinomial": (dict(counts=np.stack([C, C + 0.25], axis=-1), distribution="multinomial"), "non-integer"),
    "groups too short": (dict(groups=G[:-1]), "neither axis of counts (ndarray) (12 x 5) has the 11 cells of the group labels"),
    "group with one cell": (dict(groups=np.r_[np.zeros(11, int), 1]), "at least 2 NTC cells"),
    "sum factor zero": (dict(sum_factors=np.r_[np.ones(11), 0.0]), "sum_factors: 1 value(s) are <= 0"),
    "sum factor negative": (dict(sum_factors=np.r_[np.ones(11), -2.0]), "<= 0"),
    "sum factor nan": (dict(sum_factors=np.r_[np.ones(11), np.nan]), "sum_factors: 1 value(s) are NaN"),
    "sum factors wrong length": (dict(sum_factors=np.ones(10)), "sum_factors: expected 12 values"),
    "all zero": (dict(counts=np.zeros_like(C)), "every value is zero"),
    "nothing left": (dict(counts=np.full_like(C, 3.0)), "no feature left to fit"),
    "binomial without denominator": (dict(distribution="binomial"), "needs a denominator"),
    "denominator below counts": (dict(distribution="binomial", denominator=np.maximum(C - 1, 0)), "smaller than the counts"),
    "multinomial 2-D": (dict(distribution="multinomial"), "needs 3-D counts"),
    "negbinom 3-D": (dict(counts=np.stack([C, C], axis=-1)), "needs 2-D counts"),
    "unknown distribution": (dict(distribution="poisson"), "distribution: expected one of"),
    "nsamples zero": (dict(nsamples=0), "nsamples"),
    "nsamples float": (dict(nsamples=10.5), "nsamples"),
    "niters zero": (dict(niters=0), "niters"),
    "minibatch zero": (dict(minibatch_size=0), "minibatch_size"),
    "safety zero": (dict(safety_factor=0.0), "safety_factor"),
    "safety above one": (dict(safety_factor=1.5), "safety_factor"),
    "unknown device": (dict(device="tpu"), "'tpu'"),
    "bad device index": (dict(device="cpu:x"), "device"),
    "cells_axis": (dict(cells_axis=2), "cells_axis"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_a_value_error_before_training(case, no_training):
    overrides, message = BAD_INPUTS[case]
    kwargs = dict(counts=C, groups=G, progress=False) | overrides
    with pytest.raises(ValueError, match=re.escape(message)):
        fit_technical(kwargs.pop("counts"), kwargs.pop("groups"), kwargs.pop("sum_factors", None), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_a_value_error_but_auto_is_not(no_training):
    with pytest.raises(ValueError, match="'cuda' is not visible to this process"):
        fit_technical(C, G, device="cuda", progress=False)
    with pytest.raises(AssertionError, match="training started"):
        fit_technical(C, G, device="auto", progress=False)


def test_containers_and_orientations_give_the_same_data():
    counts, groups = counts_groups(n_cells=10, n_features=6)
    frame = pd.DataFrame(counts, columns=[f"g{i}" for i in range(6)])
    reference = prepare_technical(counts, groups)
    for variant, axis in [
        (frame, 0),
        (sparse.coo_matrix(counts), 0),
        (sparse.csc_matrix(counts.T), 1),
        (counts.T.copy(), 1),
        (torch.from_numpy(counts), 0),
    ]:
        data = prepare_technical(variant, groups, cells_axis=axis)
        assert data.counts.sparse == sparse.issparse(variant)  # sparse input stays sparse
        assert torch.equal(data.counts.dense(), reference.counts.dense())
        assert torch.allclose(data.sum_factors, reference.sum_factors)
    assert prepare_technical(frame, groups).feature_names == tuple(f"g{i}" for i in range(6))


def test_default_sum_factors_are_library_sizes_over_their_mean():
    counts, groups = counts_groups()
    data = prepare_technical(counts, groups)
    totals = counts.sum(axis=1)
    np.testing.assert_allclose(data.sum_factors.numpy(), totals / totals.mean(), rtol=1e-6)
    assert torch.equal(prepare_technical(counts, groups, distribution="normal").sum_factors, torch.ones(12))


def test_first_level_is_the_baseline():
    counts, _ = counts_groups()
    labels = np.array(["lane2", "lane1"] * 6)
    assert prepare_technical(counts, labels).group_levels == ("lane1", "lane2")
    ordered = pd.Categorical(labels, categories=["lane2", "lane1", "unused"])
    data = prepare_technical(counts, pd.Series(ordered))
    assert data.group_levels == ("lane2", "lane1")
    assert data.groups.tolist() == [0, 1] * 6


def test_missing_group_label_is_rejected():
    counts, _ = counts_groups()
    with pytest.raises(ValueError, match="missing group label"):
        prepare_technical(counts, ["a", "b"] * 5 + ["a", None])


def test_zero_count_and_zero_std_features_are_excluded():
    counts, groups = counts_groups(n_cells=12, n_features=6)
    counts[:, 1] = 0
    counts[:, 4] = 7
    data = prepare_technical(counts, groups)
    assert data.feature_mask.tolist() == [True, False, True, True, False, True]
    assert data.excluded == {"zero NTC counts": 1, "zero std": 1}
    assert torch.equal(data.counts.dense(), torch.from_numpy(counts[:, data.feature_mask]))


def test_binomial_excludes_features_stuck_at_a_boundary_in_a_group():
    rng = np.random.default_rng(1)
    denominator = rng.integers(5, 10, size=(12, 4)).astype(np.float32)
    counts = np.floor(denominator / 2)
    counts[::3, :] += 1
    groups = np.array([0, 1] * 6)
    counts[groups == 1, 2] = 0
    counts[groups == 0, 3] = denominator[groups == 0, 3]
    data = prepare_technical(counts, groups, distribution="binomial", denominator=denominator)
    assert data.feature_mask.tolist() == [True, True, False, False]


def test_multinomial_excludes_features_with_one_shared_category():
    rng = np.random.default_rng(2)
    counts = rng.poisson(5.0, size=(12, 3, 3)).astype(np.float32) + 1
    groups = np.array([0, 1] * 6)
    counts[groups == 1, 1, 1:] = 0
    data = prepare_technical(counts, groups, distribution="multinomial")
    assert data.feature_mask.tolist() == [True, False, True]
    assert data.n_categories == 3
    assert prepare_technical(np.swapaxes(counts, 0, 1), groups, distribution="multinomial", cells_axis=1).counts.shape == (12, 2, 3)


def test_anndata_counts_keep_their_feature_names():
    anndata = pytest.importorskip("anndata")
    counts, groups = counts_groups(n_cells=10, n_features=4)
    adata = anndata.AnnData(X=sparse.csr_matrix(counts))
    adata.var_names = ["a", "b", "c", "d"]
    data = prepare_technical(adata, groups)
    assert data.feature_names == ("a", "b", "c", "d")
    assert data.counts.sparse and torch.equal(data.counts.dense(), torch.from_numpy(counts))  # sparse stays sparse

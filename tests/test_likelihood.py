"""The exact likelihoods against Pyro's dense distributions (float64), across inputs, shapes,
extreme parameters and thread counts, and inside an SVI step.

Tolerances come from the precision: ``1e-9`` relative, plus the rounding error the dense
evaluation itself may make, ``K * eps * condition``, where ``condition`` sums the magnitudes
of the terms it adds (times the amplification of rounding in its logits). Where Pyro's formula
cancels (lgamma(phi + y) - lgamma(phi) at phi = 1e9, digamma differences), Pyro's own result is
only that accurate: ``test_negbinom_as_accurate_as_dense`` checks both against a 90-digit
reference.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import scipy.sparse as sp
import torch
from pyro.infer import Predictive, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal

from bayesDREAM_ext.likelihood import (
    BinomialStats, MultinomialStats, NegBinomialStats, NormalStats, StudentTStats, observe_total,
)
from bayesDREAM_ext.likelihood.blocks import Layout
from bayesDREAM_ext.likelihood.negbinom import evaluate
from bayesDREAM_ext.model import technical_model
from tests.likelihood_support import (
    EPS64, F64, K, NB_EPS, RTOL, assert_within, check_nb, fast_technical_model, nb_condition, nb_dense, nb_problem,
    value_and_grads,
)


def _huge(means, gen):
    counts = torch.randint(1_000_000, 100_000_000, means.shape, generator=gen).to(F64)
    return counts * (torch.rand(means.shape, generator=gen) < 0.4)


NB_CASES = {
    "typical": {},
    "one group": {"n_groups": 1},
    "many groups": {"n_cells": 300, "n_groups": 12},
    "tiny means": {"mean": (1e-9, 1e-5)},
    "tiny means, big phi": {"mean": (1e-9, 1e-5), "phi": (1e3, 1e8)},
    "big phi": {"phi": (1e4, 1e9)},
    "small phi": {"phi": (1e-4, 1e-2)},
    "huge counts near their means": {"n_cells": 80, "mean": (1e6, 1e8), "phi": (0.5, 50.0)},
    "huge counts, big phi": {"n_cells": 80, "mean": (1e6, 1e8), "phi": (1e3, 1e7)},
    "huge counts far from their means": {"n_cells": 80, "counts": _huge},
}
FORMATS = {
    "torch": lambda y: y,
    "numpy int64": lambda y: y.numpy().astype(np.int64),
    "csr": lambda y: sp.csr_matrix(y.numpy()),
    "csc": lambda y: sp.csc_matrix(y.numpy()),
    "coo": lambda y: sp.coo_matrix(y.numpy()),
}


@pytest.mark.parametrize("case", list(NB_CASES))
@pytest.mark.parametrize("form", ["torch", "csr"])
def test_negbinom_equals_pyro(case, form):
    y, groups, factors, rate, phi = nb_problem(**NB_CASES[case])
    check_nb(y, groups, factors, rate, phi, FORMATS[form](y))


def test_negbinom_zero_rows_columns_and_empty_group():
    y, groups, factors, rate, phi = nb_problem(n_groups=4)
    y[::7] = 0
    y[:, ::5] = 0
    groups[groups == 2] = 1  # group 2 has no cells
    stats = check_nb(y, groups, factors, rate, phi, sp.csr_matrix(y.numpy()), n_groups=4)
    assert stats.nonzeros.nnz == int((y > 0).sum())


def test_negbinom_all_zero_counts():
    y, groups, factors, rate, phi = nb_problem()
    y.zero_()
    for counts in (y, sp.csr_matrix(y.numpy())):
        assert check_nb(y, groups, factors, rate, phi, counts).nonzeros.nnz == 0


def test_negbinom_statistics_the_same_from_every_format():
    y, groups, factors, _, _ = nb_problem()
    reference = NegBinomialStats.from_counts(y, groups, factors)
    for form, convert in FORMATS.items():
        stats = NegBinomialStats.from_counts(convert(y), groups, factors)
        for name in ("entry_feature", "entry_rate", "hist_indptr", "hist_value", "hist_count", "sum_factors"):
            assert torch.equal(getattr(stats, name), getattr(reference, name)), (form, name)
        assert torch.equal(stats.nonzeros.value, reference.nonzeros.value), form
        assert stats.log_factorial == reference.log_factorial, form


def test_negbinom_sparse_input_is_never_densified():
    """A 100,000 x 100,000 matrix (80 GB dense) with 2,000 counts: statistics of a few MB."""
    rng = np.random.default_rng(0)
    n = 100_000
    rows, cols = rng.integers(0, n, 2_000), rng.integers(0, n, 2_000)
    counts = sp.coo_matrix((rng.integers(1, 50, 2_000), (rows, cols)), shape=(n, n))
    stats = NegBinomialStats.from_counts(counts, rng.integers(0, 3, n), rng.uniform(0.5, 2.0, n))
    assert stats.nonzeros.nnz == len({(r, c) for r, c in zip(rows, cols)})
    assert stats.shape == (n, n)
    assert stats.nbytes < 10 * 2**20


def test_negbinom_same_bits_on_1_2_4_threads():
    """Several feature units, several blocks of cells per group: torch.equal for any thread count."""
    y, groups, factors, rate, phi = nb_problem(n_cells=500, n_features=600, n_groups=3)
    stats = NegBinomialStats.from_counts(y, groups, factors)
    results = {}
    previous = torch.get_num_threads()
    try:
        for torch_threads in (1, 2):
            torch.set_num_threads(torch_threads)
            for threads in (1, 2, 4):
                value, grads = value_and_grads(lambda r, p: stats.log_prob(r, p, threads=threads), rate, phi)
                results[torch_threads, threads] = [value] + grads
    finally:
        torch.set_num_threads(previous)
    first = results[1, 1]
    for key, result in results.items():
        assert all(torch.equal(a, b) for a, b in zip(first, result)), key


def test_negbinom_large_block_layout_and_device_copy():
    """CUDA's layout (one unit, blocks of 2**24 elements, the caller's thread) run on the CPU,
    and statistics moved with .to(), give the same likelihood."""
    y, groups, factors, rate, phi = nb_problem(n_cells=300, n_features=400)
    stats = NegBinomialStats.from_counts(y, groups, factors)
    value, d_rate, d_phi = evaluate(stats, rate, phi, layout=Layout(unit_features=400, block_elements=1 << 24))
    cond_value, cond_rate, cond_phi = nb_condition(y, groups, factors, rate, phi)
    ref_value, ref_rate, ref_phi = evaluate(stats, rate, phi, threads=2)
    assert_within(value, ref_value, cond_value, "value")
    assert_within(d_rate, ref_rate, cond_rate, "d/d rate")
    assert_within(d_phi, ref_phi, cond_phi, "d/d phi")
    moved = evaluate(stats.to("cpu"), rate, phi, threads=2)
    assert all(torch.equal(a, b) for a, b in zip(moved, (ref_value, ref_rate, ref_phi)))


def test_serial_thread_changes_only_its_own_thread():
    import threading

    from bayesDREAM_ext.likelihood.blocks import _openmp, serial_thread

    if _openmp() is None:
        pytest.skip("torch uses no OpenMP runtime here")
    seen = {}

    def worker():
        serial_thread()
        seen["worker"] = torch.get_num_threads()

    previous = torch.get_num_threads()
    torch.set_num_threads(2)  # new threads start with 2: the worker's 1 is serial_thread's doing
    try:
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        assert seen["worker"] == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_negbinom_value_without_gradient_is_the_same_value():
    y, groups, factors, rate, phi = nb_problem()
    stats = NegBinomialStats.from_counts(y, groups, factors)
    with_grad, _ = value_and_grads(lambda r, p: stats.log_prob(r, p), rate, phi)
    with torch.no_grad():
        assert torch.equal(stats.log_prob(rate, phi), with_grad)


def test_negbinom_batch_dims_give_one_total_each():
    y, groups, factors, rate, phi = nb_problem()
    stats = NegBinomialStats.from_counts(y, groups, factors)
    rates = torch.stack([rate, 2 * rate])
    phis = torch.stack([phi, phi / 3])[:, None, :]  # [2, 1, T] as a vectorised o_y gives it
    totals = stats.log_prob(rates, phis)
    assert totals.shape == (2,)
    for k in range(2):
        assert torch.equal(totals[k], stats.log_prob(rates[k], phis[k, 0]))


def test_negbinom_float32_within_float32_precision():
    y, groups, factors, rate, phi = nb_problem()
    stats = NegBinomialStats.from_counts(y, groups, factors)
    value, (d_rate, d_phi) = value_and_grads(lambda r, p: stats.log_prob(r, p), rate.float(), phi.float())
    ref_value, (ref_rate, ref_phi) = value_and_grads(lambda r, p: nb_dense(y, groups, factors, r, p), rate, phi)
    cond_value, cond_rate, cond_phi = nb_condition(y, groups, factors, rate, phi)
    eps32 = torch.finfo(torch.float32).eps
    for actual, expected, condition in ((value, ref_value, cond_value), (d_rate, ref_rate, cond_rate), (d_phi, ref_phi, cond_phi)):
        assert actual.dtype == torch.float32
        assert ((actual.double() - expected).abs() <= K * eps32 * condition).all()


def test_negbinom_as_accurate_as_dense():
    """Against 90 digits: in extreme regimes the fast path errs no more than Pyro's dense one
    (both within the condition bound); in a typical one both are within 1e-12."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 90
    for case, rtol in (("typical", 1e-12), ("big phi", None), ("huge counts near their means", None)):
        y, groups, factors, rate, phi = nb_problem(**{**NB_CASES[case], "n_cells": 25, "n_features": 5})
        stats = NegBinomialStats.from_counts(y, groups, factors)
        fast, _ = value_and_grads(lambda r, p: stats.log_prob(r, p), rate, phi)
        dense, _ = value_and_grads(lambda r, p: nb_dense(y, groups, factors, r, p), rate, phi)
        eps = mp.mpf(NB_EPS)
        exact = mp.mpf(0)
        for n, t in np.ndindex(*y.shape):
            p, count = mp.mpf(float(phi[t])), mp.mpf(float(y[n, t]))
            m = mp.mpf(float(rate[groups[n], t])) * mp.mpf(float(factors[n]))
            total = m + p + 2 * eps
            exact += p * mp.log((p + eps) / total) + count * mp.log((m + eps) / total)
            exact += mp.loggamma(p + count) - mp.loggamma(1 + count) - mp.loggamma(p)
        condition = float(nb_condition(y, groups, factors, rate, phi)[0])
        fast_error, dense_error = abs(float(mp.mpf(float(fast)) - exact)), abs(float(mp.mpf(float(dense)) - exact))
        assert fast_error <= K * EPS64 * condition and dense_error <= K * EPS64 * condition, case
        if rtol is not None:
            assert fast_error <= rtol * abs(float(exact)), case


def test_negbinom_bad_input_is_refused_before_work():
    y, groups, factors, rate, phi = nb_problem()
    with pytest.raises(ValueError, match="non-negative"):
        NegBinomialStats.from_counts(-y, groups, factors)
    with pytest.raises(ValueError, match="whole"):
        NegBinomialStats.from_counts(y + 0.5, groups, factors)
    with pytest.raises(ValueError, match="sum_factors"):
        NegBinomialStats.from_counts(y, groups, -factors)
    with pytest.raises(ValueError, match="groups must lie"):
        NegBinomialStats.from_counts(y, groups, factors, n_groups=2)
    with pytest.raises(ValueError, match="cells="):
        NegBinomialStats.from_counts(y[:-1], groups, factors)
    stats = NegBinomialStats.from_counts(y, groups, factors)
    with pytest.raises(ValueError, match="rate must be"):
        stats.log_prob(rate[:2], phi)
    with pytest.raises(ValueError, match="threads"):
        stats.log_prob(rate, phi, threads=0)


# --- the model: an SVI step with the fast likelihood is the dense model's step ---------------


def _model_args(n_groups=3):
    y, groups, factors, rate, _ = nb_problem(n_cells=90, n_features=25, n_groups=n_groups)
    mean = rate[0] + 1e-6
    return dict(counts=y, groups=groups, sum_factors=factors, mu_prior_mean=mean, mu_prior_sd=0.5 * mean, n_groups=n_groups)


@pytest.fixture
def float64_default():
    """The dense technical model makes some constants in torch's default dtype: float64 for these tests."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    yield
    torch.set_default_dtype(previous)
    pyro.clear_param_store()


def _svi_loss_and_grads(model, kwargs, steps=2):
    """TraceMeanField_ELBO loss and AutoNormal parameter gradients of the first ``steps`` draws."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(model)
    guide(**kwargs)
    params = dict(guide.named_parameters())
    elbo = TraceMeanField_ELBO(max_plate_nesting=2)
    out = []
    for _ in range(steps):
        loss = elbo.differentiable_loss(model, guide, **kwargs)
        grads = torch.autograd.grad(loss, list(params.values()))
        out.append((loss.detach(), dict(zip(params, grads))))
    return out


def test_svi_step_with_exact_likelihood_equals_dense_model(float64_default):
    kwargs = _model_args()
    stats = NegBinomialStats.from_counts(kwargs["counts"], kwargs["groups"], kwargs["sum_factors"])
    dense_steps = _svi_loss_and_grads(technical_model, kwargs)
    fast_steps = _svi_loss_and_grads(fast_technical_model, {**kwargs, "counts": stats})
    pyro_steps = _svi_loss_and_grads(fast_technical_model, kwargs)
    for (dense_loss, dense_grads), (fast_loss, fast_grads), (pyro_loss, pyro_grads) in zip(dense_steps, fast_steps, pyro_steps):
        for reference_loss, reference_grads in ((dense_loss, dense_grads), (pyro_loss, pyro_grads)):
            torch.testing.assert_close(fast_loss, reference_loss, rtol=RTOL, atol=0)
            assert fast_grads.keys() == reference_grads.keys()
            for name, grad in fast_grads.items():
                scale = reference_grads[name].abs().max()
                torch.testing.assert_close(grad, reference_grads[name], rtol=RTOL, atol=RTOL * float(scale), msg=name)


def test_predictive_draws_y_obs_from_the_dense_path(float64_default):
    kwargs = _model_args()
    stats = NegBinomialStats.from_counts(kwargs["counts"], kwargs["groups"], kwargs["sum_factors"])
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(fast_technical_model)
    guide(**{**kwargs, "counts": stats})
    latents = Predictive(fast_technical_model, guide=guide, num_samples=4, parallel=True, return_sites=["mu_ntc", "log2_alpha_y"])
    drawn = latents(**{**kwargs, "counts": stats})
    assert drawn["mu_ntc"].shape == (4, 1, 25) and drawn["log2_alpha_y"].shape == (4, 2, 25)
    predictive = Predictive(fast_technical_model, guide=guide, num_samples=4, parallel=True, return_sites=["y_obs"])
    assert predictive(**{**kwargs, "counts": None})["y_obs"].shape == (4, 90, 25)


def test_observe_total_refuses_a_plate():
    def model():
        with pyro.plate("cells", 3):
            observe_total("y_obs", torch.tensor(-1.0))

    with pytest.raises(ValueError, match="outside the data plates"):
        pyro.poutine.trace(model).get_trace()


# --- sufficient statistics: normal, Student-t, binomial, multinomial --------------------------


def _groups(n_cells, n_groups, seed=0):
    gen = torch.Generator().manual_seed(seed)
    groups = torch.randint(0, n_groups, (n_cells,), generator=gen)
    groups[:n_groups] = torch.arange(n_groups)
    return groups, gen


def _check_against(dense_fn, fast_fn, params, condition):
    """Value within the condition bound, gradients within 1e-9 of the largest (normwise)."""
    value, grads = value_and_grads(fast_fn, *params)
    ref_value, ref_grads = value_and_grads(dense_fn, *params)
    assert_within(value, ref_value, condition, "value")
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, rtol=RTOL, atol=RTOL * float(ref.abs().max()))


GROUPINGS = {"one group": 1, "many groups": 9}


def _gaussian_data(n_groups, sparse):
    groups, gen = _groups(150, n_groups)
    y = torch.randn(150, 30, dtype=F64, generator=gen) * 3 + 1e3
    y[torch.rand(150, 30, generator=gen) < 0.6] = 0
    y[::11] = 0
    y[:, ::7] = 0
    loc = torch.randn(n_groups, 30, dtype=F64, generator=gen) * 50 + 500
    scale = torch.rand(30, dtype=F64, generator=gen) * 100 + 10
    return (sp.csr_matrix(y.numpy()) if sparse else y), y, groups, loc, scale


@pytest.mark.parametrize("groups_case", list(GROUPINGS))
@pytest.mark.parametrize("sparse", [False, True])
def test_normal_equals_pyro(groups_case, sparse):
    data, y, groups, loc, scale = _gaussian_data(GROUPINGS[groups_case], sparse)
    stats = NormalStats.from_values(data, groups, GROUPINGS[groups_case])
    condition = (((y - loc[groups]) / scale) ** 2 + torch.log(scale).abs() + 1).sum()
    _check_against(lambda l, s: dist.Normal(l[groups], s).log_prob(y).sum(), stats.log_prob, (loc, scale), condition)


@pytest.mark.parametrize("groups_case", list(GROUPINGS))
@pytest.mark.parametrize("sparse", [False, True])
def test_studentt_equals_pyro(groups_case, sparse):
    data, y, groups, loc, scale = _gaussian_data(GROUPINGS[groups_case], sparse)
    stats = StudentTStats.from_values(data, groups, GROUPINGS[groups_case])
    df = torch.tensor(3.0, dtype=F64)
    condition = (torch.log1p(((y - loc[groups]) / scale) ** 2 / df) * 2 + torch.log(scale).abs() + 3).sum()
    _check_against(lambda l, s: dist.StudentT(df, l[groups], s).log_prob(y).sum(), lambda l, s: stats.log_prob(df, l, s), (loc, scale), condition)


@pytest.mark.parametrize("groups_case", list(GROUPINGS))
@pytest.mark.parametrize("sparse", [False, True])
def test_binomial_equals_pyro(groups_case, sparse):
    n_groups = GROUPINGS[groups_case]
    groups, gen = _groups(150, n_groups)
    trials = torch.randint(0, 10**6, (150, 30), generator=gen).to(F64)
    trials[::13] = 0
    y = torch.floor(trials * torch.rand(150, 30, dtype=F64, generator=gen))
    y[:, ::5] = 0
    logits = torch.randn(n_groups, 30, dtype=F64, generator=gen) * 3
    to = (lambda m: sp.csr_matrix(m.numpy())) if sparse else (lambda m: m)
    stats = BinomialStats.from_counts(to(y), to(trials), groups, n_groups)
    condition = (3 * torch.lgamma(trials + 1) + trials * (logits[groups].abs() + 1)).sum()
    _check_against(lambda l: dist.Binomial(total_count=trials, logits=l[groups]).log_prob(y).sum(), stats.log_prob, (logits,), condition)


def _multinomial_dense(y, groups, mask, log_p):
    """The technical model's multinomial log-likelihood (model.multinomial_technical_model)."""
    y = y.masked_fill(mask, 0.0)
    per_cell = log_p[groups]
    return (torch.lgamma(y.sum(-1) + 1) - torch.lgamma(y + 1).sum(-1) + torch.where(~mask, y * per_cell, torch.zeros_like(per_cell)).sum(-1)).sum()


@pytest.mark.parametrize("groups_case", list(GROUPINGS))
@pytest.mark.parametrize("sparse", [False, True])
def test_multinomial_equals_the_model(groups_case, sparse):
    n_groups = GROUPINGS[groups_case]
    groups, gen = _groups(150, n_groups)
    y = torch.poisson(torch.rand(150, 20, 4, dtype=F64, generator=gen) * 5, generator=gen)
    y[:, :, 3] = 0
    y[::9] = 0
    mask = (torch.zeros(n_groups, 20, 4, dtype=F64).index_add_(0, groups, y) == 0).any(0)
    logits = torch.randn(n_groups, 20, 4, dtype=F64, generator=gen)
    data = sp.csr_matrix(y.reshape(150, -1).numpy()) if sparse else y
    stats = MultinomialStats.from_counts(data, groups, mask, n_groups)

    def log_p(l):
        return torch.log_softmax(l.masked_fill(mask, float("-inf")), dim=-1)

    condition = (torch.lgamma(y.sum(-1) + 1) + torch.lgamma(y + 1).sum(-1) + (y * 30).sum(-1)).sum()
    _check_against(lambda l: _multinomial_dense(y, groups, mask, log_p(l)), lambda l: stats.log_prob(log_p(l)), (logits,), condition)


def test_groupwise_statistics_hold_no_cells():
    data, _, groups, _, _ = _gaussian_data(3, sparse=True)
    assert NormalStats.from_values(data, groups).nbytes == 8 * (3 + 2 * 3 * 30)

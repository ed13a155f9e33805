"""Shared by tests/test_likelihood.py and gpu_tests/test_gpu_likelihood.py: NB problems, Pyro's
dense likelihood, the rounding bound of its evaluation, and the technical model observing the
exact total. No scipy here (the GPU node has none)."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch

from bayesDREAM_ext.likelihood import NegBinomialStats, observe_total
from bayesDREAM_ext.model import FEATURE_PLATE

F64 = torch.float64
EPS64 = torch.finfo(F64).eps
NB_EPS = 1e-8
RTOL = 1e-9
K = 16  # rounding steps per term the bound allows (both evaluations and their sums)


def _log_uniform(gen: torch.Generator, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
    return torch.exp(torch.rand(shape, dtype=F64, generator=gen) * (math.log(high) - math.log(low)) + math.log(low))


def nb_problem(n_cells=120, n_features=40, n_groups=3, mean=(1e-2, 10.0), phi=(0.1, 20.0), seed=0, counts=None):
    """groups, sum factors, rate [C, T], phi [T] and NB counts drawn from them (or ``counts(mean, gen)``)."""
    gen = torch.Generator().manual_seed(seed)
    groups = torch.randint(0, n_groups, (n_cells,), generator=gen)
    groups[:n_groups] = torch.arange(n_groups)
    factors = torch.rand(n_cells, dtype=F64, generator=gen) + 0.3
    effects = torch.exp(torch.randn(n_groups, n_features, dtype=F64, generator=gen))
    effects[0] = 1.0
    rate = _log_uniform(gen, (n_features,), *mean) * effects
    dispersion = _log_uniform(gen, (n_features,), *phi)
    means = rate[groups] * factors[:, None]
    if counts is None:
        logits = torch.log(means + NB_EPS) - torch.log(dispersion + NB_EPS)
        torch.manual_seed(seed)
        y = dist.NegativeBinomial(total_count=dispersion, logits=logits).sample()
    else:
        y = counts(means, gen)
    return y, groups, factors, rate, dispersion


def nb_dense(y, groups, factors, rate, phi):
    """Pyro's NB log-likelihood as the technical model writes it."""
    means = rate[groups] * factors[:, None]
    return dist.NegativeBinomial(total_count=phi, logits=torch.log(means + NB_EPS) - torch.log(phi + NB_EPS)).log_prob(y).sum()


def nb_condition(y, groups, factors, rate, phi):
    """Magnitudes bounding the dense evaluation's rounding: of the value, d/d rate [C, T], d/d phi [T]."""
    means = rate[groups] * factors[:, None]
    total = means + phi + 2 * NB_EPS
    amplification = 1 + torch.log(means + NB_EPS).abs() + torch.log(phi + NB_EPS).abs()
    hit = (y > 0).to(F64)
    log_q, log_p = torch.log((phi + NB_EPS) / total), torch.log((means + NB_EPS) / total)
    lgammas = torch.lgamma(phi + y).abs() + torch.lgamma(1 + y).abs() + torch.lgamma(phi).abs()
    value = (amplification * (phi * log_q.abs() + y * log_p.abs()) + hit * lgammas).sum()
    d_mean = amplification * (y / (means + NB_EPS) + (phi + y) / total)
    d_rate = torch.zeros_like(rate).index_add_(0, groups, factors[:, None] * d_mean)
    digammas = torch.digamma(phi + y).abs() + torch.digamma(phi).abs()
    d_phi = (amplification * (log_q.abs() + phi / (phi + NB_EPS) + (phi + y) / total) + hit * digammas).sum(0)
    return value, d_rate, d_phi


def assert_within(actual, expected, condition, what):
    """|actual - expected| <= RTOL |expected| + K eps condition, elementwise."""
    bound = RTOL * expected.abs() + K * EPS64 * condition
    excess = ((actual - expected).abs() - bound).max()
    assert excess <= 0, f"{what}: off by up to {float((actual - expected).abs().max()):.3e} beyond the bound"


def value_and_grads(fn, *params):
    leaves = [p.detach().clone().requires_grad_() for p in params]
    value = fn(*leaves)
    value.backward()
    return value.detach(), [leaf.grad for leaf in leaves]


def check_nb(y, groups, factors, rate, phi, counts, threads=2, n_groups=None):
    stats = NegBinomialStats.from_counts(counts, groups, factors, n_groups)
    value, (d_rate, d_phi) = value_and_grads(lambda r, p: stats.log_prob(r, p, threads=threads), rate, phi)
    ref_value, (ref_rate, ref_phi) = value_and_grads(lambda r, p: nb_dense(y, groups, factors, r, p), rate, phi)
    cond_value, cond_rate, cond_phi = nb_condition(y, groups, factors, rate, phi)
    assert_within(value, ref_value, cond_value, "value")
    assert_within(d_rate, ref_rate, cond_rate, "d/d rate")
    assert_within(d_phi, ref_phi, cond_phi, "d/d phi")
    return stats


def fast_technical_model(counts, groups, sum_factors, mu_prior_mean, mu_prior_sd, n_groups, beta_o_alpha=9.0, beta_o_beta=3.0):
    """bayesDREAM_ext.model.technical_model's sites (on ``mu_prior_mean``'s device and dtype);
    ``counts`` a NegBinomialStats observes the exact total outside the plates, a tensor or
    None the dense y_obs as before."""
    like = mu_prior_mean
    features = pyro.plate(FEATURE_PLATE, like.shape[-1], dim=-1)
    with features, pyro.plate("c_plate", n_groups - 1, dim=-2):
        log2_alpha_y = pyro.sample("log2_alpha_y", dist.StudentT(like.new_tensor(3.0), like.new_zeros(()), 20.0))
        pyro.deterministic("alpha_y_mul", 2.0**log2_alpha_y)
        pyro.deterministic("delta_y_add", log2_alpha_y)
    log2_full = torch.cat([torch.zeros_like(log2_alpha_y[..., :1, :]), log2_alpha_y], dim=-2)
    beta_o = pyro.sample("beta_o", dist.Gamma(like.new_tensor(beta_o_alpha), beta_o_beta))
    with features:
        o_y = pyro.sample("o_y", dist.Exponential(beta_o))
        mu_ntc = pyro.sample("mu_ntc", dist.Gamma(mu_prior_mean**2 / mu_prior_sd**2, mu_prior_mean / mu_prior_sd**2))
    phi_y = 1.0 / o_y**2
    if isinstance(counts, NegBinomialStats):
        observe_total("y_obs", counts.log_prob(mu_ntc * 2.0**log2_full, phi_y))
        return
    mu_final = mu_ntc * (2.0**log2_full)[..., groups, :] * sum_factors[:, None]
    logits = torch.log(mu_final + NB_EPS) - torch.log(phi_y + NB_EPS)
    with pyro.plate("cell_plate", groups.shape[0], dim=-2), features:
        pyro.sample("y_obs", dist.NegativeBinomial(total_count=phi_y, logits=logits), obs=counts)

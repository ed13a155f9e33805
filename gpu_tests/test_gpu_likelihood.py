"""Issue 21: the exact NB likelihood on CUDA equals the CPU's (float64) and trains there."""

from __future__ import annotations

import pyro
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal

from bayesDREAM_ext.likelihood import NegBinomialStats
from tests.likelihood_support import assert_within, fast_technical_model, nb_condition, nb_problem, value_and_grads


def test_exact_negbinom_on_cuda_equals_cpu(figures):
    y, groups, factors, rate, phi = nb_problem(n_cells=2000, n_features=700, n_groups=3)
    stats = NegBinomialStats.from_counts(y, groups, factors)
    cpu_value, (cpu_rate, cpu_phi) = value_and_grads(lambda r, p: stats.log_prob(r, p, threads=2), rate, phi)
    on_gpu = stats.to("cuda")
    value, (d_rate, d_phi) = value_and_grads(lambda r, p: on_gpu.log_prob(r, p), rate.cuda(), phi.cuda())
    assert value.device.type == "cuda" and d_rate.device.type == "cuda"
    cond_value, cond_rate, cond_phi = nb_condition(y, groups, factors, rate, phi)
    assert_within(value.cpu(), cpu_value, cond_value, "value")
    assert_within(d_rate.cpu(), cpu_rate, cond_rate, "d/d rate")
    assert_within(d_phi.cpu(), cpu_phi, cond_phi, "d/d phi")
    figures.record("exact_negbinom_cuda", relative_value_difference=float(abs(value.cpu() - cpu_value) / abs(cpu_value)))


def test_exact_negbinom_trains_on_cuda(figures):
    y, groups, factors, rate, _ = nb_problem(n_cells=600, n_features=120, n_groups=2)
    stats = NegBinomialStats.from_counts(y, groups, factors).to("cuda")
    mean = (rate[0] + 1e-6).cuda()
    kwargs = dict(counts=stats, groups=groups.cuda(), sum_factors=factors.cuda(), mu_prior_mean=mean, mu_prior_sd=0.5 * mean, n_groups=2)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(fast_technical_model)
    svi = SVI(fast_technical_model, guide, pyro.optim.ClippedAdam({"lr": 0.02, "clip_norm": 10.0}), TraceMeanField_ELBO(max_plate_nesting=2))
    losses = [svi.step(**kwargs) for _ in range(150)]
    assert all(p.device.type == "cuda" for p in guide.parameters())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    figures.record("exact_negbinom_cuda_training", first_loss=first, last_loss=last)
    assert last < first
    pyro.clear_param_store()

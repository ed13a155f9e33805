"""bayesDREAM's technical model (negative binomial), with bayesDREAM's site names and plates.

Counts are [N cells, T features]; ``groups`` holds each cell's technical group in 0..C-1
(0 = baseline). Plates: ``c_plate`` (C-1 groups except the baseline) at dim -2, the feature
plate at dim -1, the cell plate at dim -2 for the likelihood, so ``max_plate_nesting`` = 2.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

MAX_PLATE_NESTING = 2
EPS = 1e-8


def mu_ntc_prior(counts: Tensor, groups: Tensor, sum_factors: Tensor, epsilon: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Per-feature mean and robust sd of the baseline group's normalised counts.

    m = mean(y / s) over baseline cells; s = max(1.4826 * MAD / sqrt(N) + eps, 0.1 * (m + eps)).
    """
    base = counts[groups == 0] / sum_factors[groups == 0, None]
    m = base.mean(dim=0)
    mad = (base - base.median(dim=0).values).abs().median(dim=0).values
    sd = torch.maximum(1.4826 * mad / base.shape[0] ** 0.5 + epsilon, 0.1 * (m + epsilon))
    return m, sd


def technical_model(
    counts: Tensor | None,
    groups: Tensor,
    sum_factors: Tensor,
    mu_prior_mean: Tensor,
    mu_prior_sd: Tensor,
    n_groups: int,
    beta_o_alpha: float = 9.0,
    beta_o_beta: float = 3.0,
    observe: bool = True,
) -> None:
    """Negative-binomial technical model.

    ``counts=None`` with ``observe=True`` samples the observation site ``y_obs`` [N, T]
    (posterior predictive); ``observe=False`` skips the likelihood (parameters only, what
    bayesDREAM's Predictive step draws).
    """
    n_features = mu_prior_mean.shape[-1]
    n_cells = groups.shape[0]
    with pyro.plate("feature_plate", n_features, dim=-1):
        with pyro.plate("c_plate", n_groups - 1, dim=-2):
            log2_alpha_y = pyro.sample(
                "log2_alpha_y",
                dist.StudentT(torch.tensor(3.0, device=mu_prior_mean.device), 0.0, 20.0),
            )
        alpha_y_mul = pyro.deterministic("alpha_y_mul", 2.0**log2_alpha_y)
        pyro.deterministic("delta_y_add", log2_alpha_y)
    beta_o = pyro.sample(
        "beta_o",
        dist.Gamma(torch.tensor(beta_o_alpha, device=mu_prior_mean.device), beta_o_beta),
    )
    with pyro.plate("feature_plate_o", n_features, dim=-1):
        o_y = pyro.sample("o_y", dist.Exponential(beta_o))
        mu_ntc = pyro.sample(
            "mu_ntc",
            dist.Gamma(mu_prior_mean**2 / mu_prior_sd**2, mu_prior_mean / mu_prior_sd**2),
        )
    if not observe:
        return
    phi_y = 1.0 / o_y**2
    alpha_full_mul = torch.cat([torch.ones_like(alpha_y_mul[..., :1, :]), alpha_y_mul], dim=-2)
    mu_final = mu_ntc * alpha_full_mul[..., groups, :] * sum_factors[:, None]
    logits = torch.log(mu_final + EPS) - torch.log(phi_y + EPS)
    with pyro.plate("cell_plate", n_cells, dim=-2), pyro.plate("feature_plate_y", n_features, dim=-1):
        pyro.sample("y_obs", dist.NegativeBinomial(total_count=phi_y, logits=logits), obs=counts)

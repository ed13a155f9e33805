"""Synthetic technical-model data with known effects, for the demo, tests and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SyntheticTechnical:
    """Counts [N, T] drawn from the negative-binomial technical model with known truth."""

    counts: np.ndarray
    groups: np.ndarray
    sum_factors: np.ndarray
    log2_alpha_true: np.ndarray
    mu_true: np.ndarray
    phi_true: np.ndarray


def synthetic_technical(
    n_cells: int = 2000,
    n_features: int = 1000,
    n_groups: int = 2,
    seed: int = 0,
    effect_sd: float = 0.5,
) -> SyntheticTechnical:
    """Draw a dataset: baseline means log-normal, group effects N(0, effect_sd) on log2 scale."""
    rng = np.random.default_rng(seed)
    groups = np.sort(rng.integers(0, n_groups, size=n_cells))
    groups[: min(n_groups, n_cells)] = np.arange(min(n_groups, n_cells))
    groups.sort()
    sum_factors = rng.lognormal(0.0, 0.3, size=n_cells)
    mu = rng.lognormal(1.0, 1.2, size=n_features)
    log2_alpha = rng.normal(0.0, effect_sd, size=(n_groups - 1, n_features))
    alpha_full = np.vstack([np.ones((1, n_features)), 2.0**log2_alpha])
    phi = rng.gamma(5.0, 2.0, size=n_features)
    mean = mu[None, :] * alpha_full[groups] * sum_factors[:, None]
    counts = rng.negative_binomial(phi[None, :], phi[None, :] / (phi[None, :] + mean))
    return SyntheticTechnical(
        counts=counts.astype(np.float32),
        groups=groups.astype(np.int64),
        sum_factors=sum_factors.astype(np.float32),
        log2_alpha_true=log2_alpha,
        mu_true=mu,
        phi_true=phi,
    )

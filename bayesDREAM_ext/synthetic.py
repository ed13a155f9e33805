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


@dataclass(frozen=True)
class SyntheticData:
    """Data of any technical-model distribution with its true effects.

    ``effects_true`` is [C-1, T] on the model's effect scale (log2 for negbinom, data units for
    normal/studentt, logit for binomial) or [C-1, T, K] centred logits for multinomial.
    """

    distribution: str
    counts: np.ndarray
    groups: np.ndarray
    sum_factors: np.ndarray
    denominator: np.ndarray | None
    effects_true: np.ndarray


def _groups(rng: np.random.Generator, n_cells: int, n_groups: int) -> np.ndarray:
    groups = rng.integers(0, n_groups, size=n_cells)
    groups[: min(n_groups, n_cells)] = np.arange(min(n_groups, n_cells))
    return np.sort(groups).astype(np.int64)


def synthetic_data(
    distribution: str,
    n_cells: int = 400,
    n_features: int = 50,
    n_groups: int = 2,
    *,
    n_categories: int = 3,
    seed: int = 0,
    effect_sd: float = 0.5,
) -> SyntheticData:
    """Draw data from the technical model of ``distribution`` with known effects."""
    if distribution == "negbinom":
        data = synthetic_technical(n_cells, n_features, n_groups, seed, effect_sd)
        return SyntheticData(distribution, data.counts, data.groups, data.sum_factors, None, data.log2_alpha_true)
    rng = np.random.default_rng(seed)
    groups = _groups(rng, n_cells, n_groups)
    ones = np.ones(n_cells, dtype=np.float32)
    if distribution in ("normal", "studentt"):
        mu = rng.normal(5.0, 2.0, size=n_features)
        sigma = rng.gamma(4.0, 0.25, size=n_features)
        shift = rng.normal(0.0, 2 * effect_sd, size=(n_groups - 1, n_features))
        full = np.vstack([np.zeros((1, n_features)), shift])
        noise = rng.standard_t(3, size=(n_cells, n_features)) if distribution == "studentt" else rng.normal(size=(n_cells, n_features))
        counts = mu + full[groups] + sigma * noise
        return SyntheticData(distribution, counts.astype(np.float32), groups, ones, None, shift)
    if distribution == "binomial":
        base = rng.normal(0.0, 1.0, size=n_features)
        shift = rng.normal(0.0, 2 * effect_sd, size=(n_groups - 1, n_features))
        full = np.vstack([np.zeros((1, n_features)), shift])
        denominator = rng.poisson(20.0, size=(n_cells, n_features)) + 1
        p = 1.0 / (1.0 + np.exp(-(base + full[groups])))
        counts = rng.binomial(denominator, p)
        return SyntheticData(distribution, counts.astype(np.float32), groups, ones, denominator.astype(np.float32), shift)
    if distribution == "multinomial":
        base = rng.normal(0.0, 0.5, size=(n_features, n_categories))
        shift = rng.normal(0.0, 2 * effect_sd, size=(n_groups - 1, n_features, n_categories))
        shift -= shift.mean(axis=-1, keepdims=True)
        full = np.concatenate([np.zeros((1, n_features, n_categories)), shift])
        logits = base + full[groups]
        p = np.exp(logits - logits.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        totals = rng.poisson(30.0, size=(n_cells, n_features)) + 1
        counts = rng.multinomial(totals, p)
        return SyntheticData(distribution, counts.astype(np.float32), groups, ones, None, shift)
    raise ValueError(f"distribution: expected negbinom, normal, studentt, binomial or multinomial; got {distribution!r}")

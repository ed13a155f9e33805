"""A small real technical fit shared by the summary and report tests (trained once per process),
and a fake record with chosen posterior values."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import torch

from bayesDREAM_ext.synthetic import synthetic_technical

CELLS, FEATURES, GROUPS, SAMPLES = 120, 16, 3, 40


@functools.lru_cache(maxsize=1)
def small_fit() -> Any:
    """fit_technical on synthetic data: 120 cells x 16 features (two of them all zero, so
    excluded), 3 groups, 40 samples, a few dozen SVI steps."""
    from bayesDREAM_ext.fit import fit_technical

    data = synthetic_technical(CELLS, FEATURES, GROUPS, seed=4)
    counts = data.counts.copy()
    counts[:, [3, 9]] = 0
    names = [f"gene{i}" for i in range(FEATURES)]
    frame = pd.DataFrame(counts, columns=names)
    labels = np.array(["lane1", "lane2", "lane3"])[data.groups]
    return fit_technical(frame, labels, data.sum_factors, niters=60, nsamples=SAMPLES, seed=0, progress=False)


@dataclass
class FakeFit:
    """The fields summary and report read, with a posterior made up by the test."""

    distribution: str
    posterior_samples: dict[str, torch.Tensor]
    feature_mask: torch.Tensor
    group_levels: tuple[Any, ...]
    feature_names: tuple[str, ...] | None
    losses: list[float]
    learning_rates: list[float]
    excluded: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    svi_plan: Any = field(default_factory=lambda: SimpleNamespace(
        device="cpu", guide="normal", chunk_cells=None, predicted_peak_bytes=2_000_000, measured_peak_bytes=1_500_000,
        budget_bytes=8_000_000_000, reasons=("no GPU visible; SVI on the CPU",)))
    predictive_plan: Any = field(default_factory=lambda: SimpleNamespace(
        device="cpu", num_samples=50, batch_size=50, n_batches=1, vectorized=True, predicted_peak_bytes=300_000,
        budget_bytes=8_000_000_000, output_bytes=100_000, reasons=("Will use one vectorised batch of 50 on cpu",)))


def fake_negbinom(samples: int = 50, features: int = 7, groups: int = 3, seed: int = 0) -> FakeFit:
    """A negbinom record with random effects [S, C-1, T], mu_ntc, o_y; feature 2 excluded."""
    rng = np.random.default_rng(seed)
    mask = np.ones(features, dtype=bool)
    mask[2] = False
    effect = rng.normal(np.linspace(-2, 2, features), 0.3, size=(samples, groups - 1, features))
    mu = rng.gamma(2.0, 3.0, size=(samples, 1, features))
    o_y = rng.uniform(0.2, 0.6, size=(samples, 1, features))
    effect[:, :, ~mask] = 0.0
    mu[:, :, ~mask] = np.nan
    o_y[:, :, ~mask] = np.nan
    as_tensor = lambda a: torch.from_numpy(a.astype(np.float32))  # noqa: E731
    losses = list(1000.0 * np.exp(-np.arange(300) / 40.0) + 500.0)
    return FakeFit(
        distribution="negbinom",
        posterior_samples={"log2_alpha_y": as_tensor(effect), "mu_ntc": as_tensor(mu), "o_y": as_tensor(o_y)},
        feature_mask=torch.from_numpy(mask), group_levels=("ctrl", "b", "c")[:groups],
        feature_names=tuple(f"g{i}" for i in range(features)), losses=losses,
        learning_rates=list(np.linspace(1e-3, 1e-2, 300)), excluded={"zero std": 1},
    )

"""Exact likelihoods whose parameters are the same for every cell of a (group, feature) pair.

The normal, Student-t, binomial and multinomial technical models have no per-cell factor: cell
n's parameters for feature t depend on its group g alone. So the sum of the log-likelihood over
the cells of (g, t) is a function of a few statistics of their values, made once:

- normal: n_g, the mean and the sum of squared deviations M2 of each (g, t):
  sum_n log N(y | loc, sigma) = -(M2 + n (mean - loc)^2) / (2 sigma^2) - n (log sigma + log sqrt(2 pi)),
  centred, so nothing cancels when the spread is small against the mean;
- binomial (logits l): the sums of successes Y and trials M:
  l Y - M (max(l, 0) + log1p(exp(-|l|))) plus a data constant (the log binomial coefficients);
- multinomial: the per-group category sums S [C, T, K]: sum(S log p) over the active categories
  plus a data constant;
- Student-t: log1p((y - loc)^2 / (df sigma^2)) does not split, but all zeros of a (g, t) share
  one value: the non-zero values plus one zero per (g, t) weighted by how many cells have it,
  O(nnz + C T) terms instead of N T.

Each ``log_prob`` is plain torch on [C, T]-sized (or O(nnz)) tensors, so autograd gives the
gradients; sums over features run in fixed-size pieces (:func:`~bayesDREAM_ext.likelihood.blocks.fixed_sum`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bayesDREAM_ext.likelihood.blocks import fixed_sum, log1p
from bayesDREAM_ext.likelihood.counts import READ_BLOCK_BYTES, CellGroups, column_blocks, held_bytes, read_nonzeros

LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


def _cell_groups(groups: Any, n_groups: int | None) -> tuple[Tensor, int]:
    """The checked [N] group index (original cell order) and C."""
    cells = CellGroups.from_groups(groups, n_groups)
    index = torch.empty_like(cells.group_of)
    index[cells.order] = cells.group_of
    return index, cells.n_groups


def _group_sums(block: Tensor, index: Tensor, n_groups: int) -> Tensor:
    return torch.zeros((n_groups,) + block.shape[1:], dtype=block.dtype).index_add_(0, index, block)


class _Held:
    @property
    def nbytes(self) -> int:
        """Bytes held (what a planner should count instead of N x T)."""
        return held_bytes(self)


def _whole(block: Tensor, what: str) -> None:
    if bool((block < 0).any()) or not bool((block == block.round()).all()):
        raise ValueError(f"{what} must be non-negative whole numbers")


@dataclass(frozen=True)
class NormalStats(_Held):
    """Per (group, feature): cells ``sizes`` [C, 1], ``mean`` [C, T] and ``m2`` [C, T] (sum of
    squared deviations from the mean), float64."""

    sizes: Tensor
    mean: Tensor
    m2: Tensor

    @classmethod
    def from_values(cls, values: Any, groups: Any, n_groups: int | None = None) -> NormalStats:
        """From [N, T] finite values (dense or scipy.sparse, read in blocks of features)."""
        index, n_groups = _cell_groups(groups, n_groups)
        sizes = torch.bincount(index, minlength=n_groups).to(torch.float64)[:, None]
        sums = torch.cat([_group_sums(b, index, n_groups) for _, b in column_blocks(values, index.numel(), "values")], dim=1)
        mean = torch.where(sizes > 0, sums / sizes.clamp_min(1.0), torch.zeros_like(sums))
        m2 = torch.cat([
            _group_sums((b - mean[:, t0 : t0 + b.shape[1]][index]) ** 2, index, n_groups)
            for t0, b in column_blocks(values, index.numel(), "values")
        ], dim=1)
        return cls(sizes, mean, m2)

    def log_prob(self, loc: Tensor, scale: Tensor) -> Tensor:
        """sum over cells and features of Normal(loc[g], scale).log_prob(y): ``loc`` [..., C, T],
        ``scale`` [..., T] or [..., 1, T]."""
        sizes, mean, m2 = (t.to(loc.device, loc.dtype) for t in (self.sizes, self.mean, self.m2))
        deviation = mean - loc
        squares = m2 + sizes * deviation * deviation
        return fixed_sum(-squares / (2 * scale**2) - sizes * (torch.log(scale) + LOG_SQRT_2PI), dims=2)


@dataclass(frozen=True)
class BinomialStats(_Held):
    """Per (group, feature) sums of ``successes`` and ``trials`` [C, T] (float64) and
    ``log_binomial``: the sum of log C(n, y) over all cells and features."""

    successes: Tensor
    trials: Tensor
    log_binomial: float

    @classmethod
    def from_counts(cls, counts: Any, denominator: Any, groups: Any, n_groups: int | None = None) -> BinomialStats:
        """From [N, T] successes and trials (whole, 0 <= y <= n; dense or scipy.sparse)."""
        index, n_groups = _cell_groups(groups, n_groups)
        successes, trials, constant = [], [], 0.0
        pairs = zip(column_blocks(counts, index.numel(), "counts"), column_blocks(denominator, index.numel(), "denominator"))
        for (_, y), (_, n) in pairs:
            _whole(y, "counts")
            _whole(n, "denominator")
            if y.shape != n.shape or bool((y > n).any()):
                raise ValueError("counts must not exceed the denominator (and have its shape)")
            successes.append(_group_sums(y, index, n_groups))
            trials.append(_group_sums(n, index, n_groups))
            hit = y > 0  # y = 0 gives lgamma(n + 1) - 0 - lgamma(n + 1) = 0 exactly
            y, n = y[hit], n[hit]
            constant += float(np.sum((torch.lgamma(n + 1) - torch.lgamma(y + 1) - torch.lgamma(n - y + 1)).numpy()))
        return cls(torch.cat(successes, dim=1), torch.cat(trials, dim=1), constant)

    def log_prob(self, logits: Tensor) -> Tensor:
        """sum over cells and features of Binomial(n, logits=logits[g]).log_prob(y); ``logits`` [..., C, T]."""
        successes, trials = (t.to(logits.device, logits.dtype) for t in (self.successes, self.trials))
        clamp_by_zero = (logits.clamp(min=0) + logits - logits.clamp(max=0)) / 2  # torch's, gradient 1/2 at 0
        normaliser = trials * clamp_by_zero + trials * torch.log1p(torch.exp(-torch.abs(logits)))
        return fixed_sum(successes * logits - normaliser, dims=2) + self.log_binomial


@dataclass(frozen=True)
class MultinomialStats(_Held):
    """Per-group category sums ``sums`` [C, T, K] over the active categories (float64), the
    ``active`` mask [T, K], and ``log_multinomial``: sum over cells and features of
    lgamma(total + 1) - sum_k lgamma(y_k + 1), masked categories zeroed first."""

    sums: Tensor
    active: Tensor
    log_multinomial: float

    @classmethod
    def from_counts(cls, counts: Any, groups: Any, zero_cat_mask: Tensor, n_groups: int | None = None) -> MultinomialStats:
        """From [N, T, K] counts (dense) or a [N, T * K] matrix (dense or scipy.sparse, the K
        categories of each feature adjacent); ``zero_cat_mask`` [T, K] as the model masks them."""
        index, n_groups = _cell_groups(groups, n_groups)
        n_features, n_categories = zero_cat_mask.shape
        flat = counts.reshape(counts.shape[0], -1) if len(counts.shape) == 3 else counts
        if tuple(flat.shape)[1:] != (n_features * n_categories,):
            raise ValueError(f"counts must be [N, {n_features}, {n_categories}] or [N, {n_features * n_categories}], got {list(counts.shape)}")
        active = (~zero_cat_mask.bool()).reshape(-1)
        width = max(1, (READ_BLOCK_BYTES // (8 * index.numel())) // n_categories) * n_categories
        sums, constant = [], 0.0
        for t0, block in column_blocks(flat, index.numel(), "counts", width):
            _whole(block, "counts")
            block = block * active[t0 : t0 + block.shape[1]]
            sums.append(_group_sums(block, index, n_groups))
            totals = block.reshape(block.shape[0], -1, n_categories).sum(-1)
            constant += float(np.sum(torch.lgamma(totals[totals > 0] + 1).numpy())) - float(np.sum(torch.lgamma(block[block > 0] + 1).numpy()))
        return cls(torch.cat(sums, dim=1).reshape(n_groups, n_features, n_categories), active.reshape(n_features, n_categories), constant)

    def log_prob(self, log_p: Tensor) -> Tensor:
        """sum over cells and features of the model's multinomial log-likelihood for per-group
        log-probabilities ``log_p`` [..., C, T, K] (-inf on masked categories is fine)."""
        sums, active = self.sums.to(log_p.device, log_p.dtype), self.active.to(log_p.device)
        terms = torch.where(active, sums * log_p, torch.zeros_like(log_p)).sum(-1)
        return fixed_sum(terms, dims=2) + self.log_multinomial


@dataclass(frozen=True)
class StudentTStats(_Held):
    """The values as (``key`` = g * T + t, ``value``, ``weight``) entries: every non-zero value
    with weight 1, and one zero per (group, feature) weighted by its cells with a zero; ``n_cells``
    cells, ``n_groups`` x ``n_features``."""

    key: Tensor
    value: Tensor
    weight: Tensor
    n_cells: int
    n_groups: int
    n_features: int

    @classmethod
    def from_values(cls, values: Any, groups: Any, n_groups: int | None = None) -> StudentTStats:
        """From [N, T] finite values (dense or scipy.sparse, never densified)."""
        cells = CellGroups.from_groups(groups, n_groups)
        nonzeros = read_nonzeros(values, cells, "values", integer=False, non_negative=False)
        n_features, n_groups = nonzeros.n_features, cells.n_groups
        key = cells.group_of.index_select(0, nonzeros.cell) * n_features + nonzeros.feature()
        zeros = (cells.sizes[:, None] - torch.bincount(key, minlength=n_groups * n_features).reshape(n_groups, n_features)).reshape(-1)
        zero_keys = zeros.nonzero().squeeze(-1)
        return cls(
            torch.cat([key, zero_keys]), torch.cat([nonzeros.value.to(torch.float64), torch.zeros(zero_keys.numel(), dtype=torch.float64)]),
            torch.cat([torch.ones(key.numel(), dtype=torch.float64), zeros[zero_keys].to(torch.float64)]),
            cells.n_cells, n_groups, n_features,
        )

    def log_prob(self, df: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
        """sum over cells and features of StudentT(df, loc[g], scale).log_prob(y): ``loc``
        [C, T], ``scale`` [T] (or [1, T]), ``df`` a scalar tensor."""
        scale = scale.reshape(-1)
        key, value, weight = (t.to(loc.device) for t in (self.key, self.value, self.weight))
        y = (value.to(loc.dtype) - loc.reshape(-1).index_select(0, key)) / scale.index_select(0, key % self.n_features)
        terms = -0.5 * (df + 1.0) * log1p(y**2.0 / df)
        z = torch.log(scale) + 0.5 * torch.log(df) + 0.5 * math.log(math.pi) + torch.lgamma(0.5 * df) - torch.lgamma(0.5 * (df + 1.0))
        return fixed_sum(weight.to(loc.dtype) * terms, dims=1) - self.n_cells * fixed_sum(z, dims=1)

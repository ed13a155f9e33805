"""The technical negative-binomial log-likelihood, exact, from the non-zero counts.

Pyro's ``NegativeBinomial(total_count=phi, logits=L)`` with L = log(m + eps) - log(phi + eps)
(eps = 1e-8, m = rate[g(n), t] * s[n], rate = mu_ntc * alpha) evaluates per count y

    phi * logsigmoid(-L) + y * logsigmoid(L) + lgamma(phi + y) - lgamma(1 + y) - lgamma(phi).

With x = (m + eps) / (phi + eps) and z = 1 / x, logsigmoid(-L) = -log1p(x) and
logsigmoid(L) = -log1p(z) exactly (sigmoid(L) = (m + eps) / (m + phi + 2 eps)), so the sum over
all counts splits into

- ``-sum_t phi_t sum_n log1p(x_nt)``: every cell, no counts needed (one log per element);
- ``-sum_{y > 0} y log1p(z)``: the non-zero counts only;
- ``sum_t sum_v k_tv (lgamma(phi_t + v) - lgamma(phi_t))``: the distinct non-zero values v of
  feature t with their multiplicities k (zeros give lgamma(phi) - lgamma(phi) = 0);
- ``-sum_{y > 0} lgamma(1 + y)``: a constant of the data.

Both log1p forms are the cancellation-free ones (never log(phi + m) - log(phi), which loses
everything when m << phi). Value and gradients with respect to ``rate`` [C, T] and ``phi`` [T]
come out of the same blocked pass (:mod:`bayesDREAM_ext.likelihood.blocks`):

    d/d rate_gt = sum_n s_n (-phi q / (phi + eps)) + sum_{y > 0} y s z D,
    d/d phi_t = sum_n (-log1p(x) + phi x q / (phi + eps)) - sum_{y > 0} y D
                + sum_v k (digamma(phi + v) - digamma(phi)),

with q = 1 / (1 + x) and D = 1 / (m + phi + 2 eps); the all-cells sums need only
sum_n log1p(x), sum_n q and sum_n s q per (group, feature), since x q = rate c s q + eps c q
with c = 1 / (phi + eps).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bayesDREAM_ext.likelihood.blocks import Layout, log1p, log1p_into, ordered_sum, run_units
from bayesDREAM_ext.likelihood.counts import CellGroups, Nonzeros, held_bytes, read_nonzeros

EPS = 1e-8  # bayesDREAM's guard in log(mu + eps) - log(phi + eps)


def _histogram(nonzeros: Nonzeros) -> tuple[Tensor, Tensor, Tensor]:
    """Distinct (feature, value) pairs of the non-zero counts, feature-major: the CSR-like
    pointer [T + 1], the values and their multiplicities (float64)."""
    feature, value = nonzeros.feature().to(torch.int64), nonzeros.value
    if value.dtype == torch.int32:
        span = int(value.max()) + 1 if value.numel() else 1
        keys, multiplicity = torch.unique(feature * span + value, return_counts=True)
        distinct_feature, distinct_value = keys // span, (keys % span).to(torch.float64)
    else:
        pairs, multiplicity = torch.unique(torch.stack([feature.to(torch.float64), value], dim=1), dim=0, return_counts=True)
        distinct_feature, distinct_value = pairs[:, 0].to(torch.int64), pairs[:, 1].contiguous()
    per_feature = torch.bincount(distinct_feature, minlength=nonzeros.n_features)
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), per_feature.cumsum(0)])
    return indptr, distinct_value, multiplicity.to(torch.float64)


@dataclass(frozen=True)
class NegBinomialStats:
    """What the exact NB likelihood needs from counts y [N, T], groups [N] and sum factors [N],
    made once (:meth:`from_counts`); memory O(nnz + N + C T).

    ``cells``: cells in group order; ``sum_factors`` [N] float64 in that order; ``nonzeros``:
    the non-zero counts feature by feature, with ``entry_feature`` and ``entry_rate`` (the flat
    index g * T + t of each entry's rate); ``hist_*``: distinct non-zero values per feature and
    their multiplicities; ``log_factorial``: sum of lgamma(1 + y) over the non-zero counts.
    """

    cells: CellGroups
    sum_factors: Tensor
    nonzeros: Nonzeros
    entry_feature: Tensor
    entry_rate: Tensor
    hist_indptr: Tensor
    hist_value: Tensor
    hist_count: Tensor
    log_factorial: float

    @classmethod
    def from_counts(cls, counts: Any, groups: Any, sum_factors: Any, n_groups: int | None = None) -> NegBinomialStats:
        """From [N, T] non-negative whole counts (torch, numpy or scipy.sparse, never
        densified), a [N] group index in 0..C-1 and [N] positive sum factors."""
        cells = CellGroups.from_groups(groups, n_groups)
        factors = cells.sorted_values(sum_factors, "sum_factors", positive=True)
        nonzeros = read_nonzeros(counts, cells, "counts")
        feature = nonzeros.feature()
        n_features = nonzeros.n_features
        index_dtype = torch.int32 if cells.n_groups * n_features <= 2**31 - 1 else torch.int64
        entry_rate = cells.group_of.index_select(0, nonzeros.cell) * n_features + feature
        hist_indptr, hist_value, hist_count = _histogram(nonzeros)
        log_factorial = float(np.sum((hist_count * torch.lgamma(hist_value + 1.0)).numpy()))
        return cls(
            cells, factors, nonzeros, feature, entry_rate.to(index_dtype), hist_indptr, hist_value, hist_count, log_factorial
        )

    @property
    def shape(self) -> tuple[int, int]:
        """(N, T) of the counts."""
        return self.nonzeros.n_cells, self.nonzeros.n_features

    @property
    def n_groups(self) -> int:
        return self.cells.n_groups

    @property
    def nbytes(self) -> int:
        """Bytes held (what a planner should count instead of N x T)."""
        return held_bytes(self)

    def to(self, device: torch.device | str) -> NegBinomialStats:
        """A copy with every tensor on ``device`` (the group offsets stay host-side numbers)."""
        moved = {
            f.name: getattr(self, f.name).to(device)
            for f in fields(self) if isinstance(getattr(self, f.name), Tensor) and not f.name.endswith("indptr")
        }
        nonzeros = replace(self.nonzeros, cell=self.nonzeros.cell.to(device), value=self.nonzeros.value.to(device))
        cells = replace(self.cells, order=self.cells.order.to(device), group_of=self.cells.group_of.to(device))
        return replace(self, cells=cells, nonzeros=nonzeros, **moved)

    def log_prob(self, rate: Tensor, phi: Tensor, threads: int | None = None) -> Tensor:
        """sum over all counts of NB(total_count=phi, logits=log(rate[g] s + eps) - log(phi + eps)).log_prob(y).

        ``rate`` [..., C, T] (mu_ntc * alpha, before the sum factor), ``phi`` [..., T] or
        [..., 1, T]; leading batch dims give one total per batch element. Differentiable in
        both (a fused value-and-gradient pass); ``threads`` defaults to torch's thread count.
        """
        threads = torch.get_num_threads() if threads is None else int(threads)
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        n_features = self.shape[1]
        if rate.dtype != phi.dtype or not rate.is_floating_point():
            raise ValueError(f"rate and phi must share one floating dtype, got {rate.dtype} and {phi.dtype}")
        if rate.shape[-2:] != (self.n_groups, n_features):
            raise ValueError(f"rate must be [..., {self.n_groups}, {n_features}], got {list(rate.shape)}")
        phi = phi.squeeze(-2) if phi.dim() >= 2 and phi.shape[-2] == 1 else phi
        batch = torch.broadcast_shapes(rate.shape[:-2], phi.shape[:-1])
        rate, phi = rate.expand(batch + rate.shape[-2:]), phi.expand(batch + phi.shape[-1:])
        if not batch:
            return _NegBinomialLogLik.apply(rate, phi, self, threads)
        totals = [_NegBinomialLogLik.apply(r, p, self, threads) for r, p in zip(rate.reshape((-1,) + rate.shape[-2:]), phi.reshape(-1, n_features))]
        return torch.stack(totals).reshape(batch)


class _Pass:
    """One evaluation: the per-evaluation tensors and the three partial passes of a unit."""

    def __init__(self, stats: NegBinomialStats, rate: Tensor, phi: Tensor, grad: bool, layout: Layout | None) -> None:
        self.stats, self.rate, self.phi, self.grad = stats, rate, phi, grad
        self.layout = layout or Layout.for_device(rate.device, stats.shape[1], stats.n_groups, rate.element_size())
        self.offsets = stats.cells.offsets.tolist()
        self.s = stats.sum_factors.to(rate.device, rate.dtype)
        self.phi_eps = phi + EPS
        self.c = 1.0 / self.phi_eps
        self.rate_c = rate * self.c
        self.eps_c = EPS * self.c
        self.entry_grad_rate = torch.zeros(rate.numel(), dtype=rate.dtype, device=rate.device) if grad else None
        self.entry_grad_phi = torch.zeros_like(phi) if grad else None
        self.grad_rate = torch.empty_like(rate) if grad else None
        self.grad_phi = torch.empty_like(phi) if grad else None

    def cells(self, t0: int, t1: int) -> Tensor:
        """[3, C, w]: sum_n log1p(x), sum_n q, sum_n s q per group over features t0:t1."""
        width = t1 - t0
        rows = min(self.layout.rows(width), max(int(self.stats.cells.sizes.max()), 1))
        acc = torch.zeros((3, self.stats.n_groups, width), dtype=self.rate.dtype, device=self.rate.device)
        buffers = torch.empty((4, rows * width), dtype=self.rate.dtype, device=self.rate.device)
        eps_c = self.eps_c[t0:t1]
        for g in range(self.stats.n_groups):
            rate_c = self.rate_c[g, t0:t1]
            for n0 in range(self.offsets[g], self.offsets[g + 1], rows):
                s = self.s[n0 : min(n0 + rows, self.offsets[g + 1]), None]
                x, u, q, log_x = buffers[:, : s.shape[0] * width].view(4, s.shape[0], width).unbind(0)
                torch.addcmul(eps_c, s, rate_c, out=x)
                torch.reciprocal(torch.add(x, 1.0, out=u), out=q)
                acc[0, g] += log1p_into(x, u, q, log_x).sum(0)
                if self.grad:
                    acc[1, g] += q.sum(0)
                    acc[2, g] += q.mul_(s).sum(0)
        return acc

    def nonzeros(self, t0: int, t1: int) -> Tensor:
        """-sum y log1p(z) over the non-zero counts of features t0:t1; gradients into the entry accumulators."""
        nz, total = self.stats.nonzeros, torch.zeros((), dtype=self.rate.dtype, device=self.rate.device)
        n_features = self.stats.shape[1]
        start, stop = int(nz.indptr[t0]), int(nz.indptr[t1])
        rate = self.rate.reshape(-1)
        for e0 in range(start, stop, self.layout.block_elements):
            block = slice(e0, min(e0 + self.layout.block_elements, stop))
            feature, where = self.stats.entry_feature[block], self.stats.entry_rate[block]
            s = self.s.index_select(0, nz.cell[block])
            y = nz.value[block].to(self.rate.dtype)
            m_eps = rate.index_select(0, where).mul_(s).add_(EPS)
            phi_eps = self.phi_eps.index_select(0, feature)
            z = phi_eps / m_eps
            total -= (y * log1p(z)).sum()
            if self.grad:
                # entries of one (group, feature) are adjacent: sum each run, then scatter the runs
                keys, lengths = torch.unique_consecutive(where, return_counts=True)
                y_d = torch.div(y, m_eps.add_(phi_eps))
                by_phi = torch.segment_reduce(y_d, "sum", lengths=lengths)
                by_rate = torch.segment_reduce(y_d.mul_(z).mul_(s), "sum", lengths=lengths)
                self.entry_grad_phi.index_add_(0, keys % n_features, by_phi, alpha=-1.0)
                self.entry_grad_rate.index_add_(0, keys, by_rate)
        return total

    def histogram(self, t0: int, t1: int) -> Tensor:
        """sum k (lgamma(phi + v) - lgamma(phi)) over the distinct non-zero values of features t0:t1."""
        stats, total = self.stats, torch.zeros((), dtype=self.rate.dtype, device=self.rate.device)
        start, stop = int(stats.hist_indptr[t0]), int(stats.hist_indptr[t1])
        if start == stop:
            return total
        phi = self.phi[t0:t1]
        counts = stats.hist_indptr[t0 + 1 : t1 + 1] - stats.hist_indptr[t0:t1]
        local = torch.repeat_interleave(torch.arange(t1 - t0, device=phi.device), counts.to(phi.device))
        lgamma_phi = torch.lgamma(phi)
        digamma_phi = torch.digamma(phi) if self.grad else None
        for e0 in range(start, stop, self.layout.block_elements):
            block = slice(e0, min(e0 + self.layout.block_elements, stop))
            where = local[block.start - start : block.stop - start]
            k = stats.hist_count[block].to(phi.dtype)
            a = phi.index_select(0, where) + stats.hist_value[block].to(phi.dtype)
            total += (k * (torch.lgamma(a) - lgamma_phi.index_select(0, where))).sum()
            if self.grad:
                self.entry_grad_phi.index_add_(0, where + t0, k * (torch.digamma(a) - digamma_phi.index_select(0, where)))
        return total

    def unit(self, t0: int, t1: int) -> Tensor:
        """The log-likelihood's share of features t0:t1 (less the constant); their gradient slices written."""
        log1p_x, q, s_q = self.cells(t0, t1)
        phi, c = self.phi[t0:t1], self.c[t0:t1]
        total = -(phi * log1p_x.sum(0)).sum() + self.nonzeros(t0, t1) + self.histogram(t0, t1)
        if self.grad:
            phi_c = phi * c
            entry_rate = self.entry_grad_rate.view_as(self.rate)[:, t0:t1]
            self.grad_rate[:, t0:t1] = -phi_c * s_q + entry_rate
            x_q = self.rate_c[:, t0:t1] * s_q + self.eps_c[t0:t1] * q
            self.grad_phi[t0:t1] = (phi_c * x_q - log1p_x).sum(0) + self.entry_grad_phi[t0:t1]
        return total


def evaluate(
    stats: NegBinomialStats, rate: Tensor, phi: Tensor, threads: int = 1, grad: bool = True, layout: Layout | None = None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(log-likelihood, d/d rate, d/d phi) for [C, T] ``rate`` and [T] ``phi`` (no autograd);
    the gradients are None without ``grad``. The same bits for any ``threads``; ``layout``
    defaults to the device's (:meth:`Layout.for_device`)."""
    run = _Pass(stats, rate, phi, grad, layout)
    parts = run_units(run.unit, run.layout.units(stats.shape[1]), threads, rate.device)
    total = ordered_sum(parts) - stats.log_factorial
    return total, run.grad_rate, run.grad_phi


class _NegBinomialLogLik(torch.autograd.Function):
    """The fused pass as an autograd node: forward computes value and gradients together,
    backward scales the saved gradients."""

    @staticmethod
    def forward(ctx: Any, rate: Tensor, phi: Tensor, stats: NegBinomialStats, threads: int) -> Tensor:
        grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        total, grad_rate, grad_phi = evaluate(stats, rate.detach(), phi.detach(), threads, grad)
        if grad:
            ctx.save_for_backward(grad_rate, grad_phi)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        grad_rate, grad_phi = ctx.saved_tensors
        return grad_output * grad_rate, grad_output * grad_phi, None, None

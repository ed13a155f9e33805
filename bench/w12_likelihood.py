"""W12: the exact NB likelihood (``bayesDREAM_ext.likelihood``) against Pyro's dense log_prob.

Run by hand (not yet part of ``python -m bench``)::

    python -m bench.w12_likelihood            # N x T = 3000 x 2000 and 20000 x 10000
    python -m bench.w12_likelihood --quick    # 3000 x 2000 only
    python -m bench.w12_likelihood --sizes 3000x2000 --reps 5 --threads 1 2

Data: single-cell-like sparse NB counts (feature means log-normal with median ~0.1, dispersion
Gamma(2, 1): ~90% zeros, reported), drawn a block of cells at a time into a CSR matrix, two
technical groups, log-normal sum factors. Everything runs in float32, as training does.

Measured side by side in one process, repetitions round-robin, median reported, with the load
average before each measurement, for each thread count k:

- ``dense``: the technical model's likelihood, ``TechnicalNegativeBinomial(phi, logits).log_prob(y).sum()``
  forward + backward from the latent sites (mu_ntc, log2_alpha_y, o_y); at sizes whose dense
  step would not fit the process budget (``--dense-bytes``), on a slice of cells and scaled by
  N / slice (its cost is linear in cells), and said so;
- ``fast``: ``NegBinomialStats.log_prob`` forward + backward from the same sites;
- ``guide+adam``: one SVI step of the parameters-only model (AutoNormal draw, priors, guide
  entropy terms, backward, Adam with gradient clipping at norm 10, as training): what a step
  costs besides the likelihood;
- ``step fast``: a whole SVI step with the likelihood observed through ``observe_total``, torch
  at one thread and the likelihood's pool at k; ``step dense``: the same with the dense model
  and torch at k threads where it fits, else estimated as guide+adam + dense.

Times are wall-clock medians; the ratios in brackets are of process CPU time, less sensitive to
a shared machine's load. ns/count divides by N x T (every cell and feature, zeros included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyro
import pyro.distributions as dist
import scipy.sparse as sp
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal

from bayesDREAM_ext.likelihood import NegBinomialStats, observe_total
from bayesDREAM_ext.model import EPS, FEATURE_PLATE, TechnicalNegativeBinomial, technical_model

RESULTS = Path(__file__).resolve().parent / "results"
# Bytes per [N, T] value one dense forward + backward holds: training's STEP_BYTES_PER_VALUE for
# negbinom (measured there, issue 12), not imported so the bench survives issue 20's moves.
DENSE_BYTES_PER_VALUE = 64


@dataclass(frozen=True)
class Data:
    counts: sp.csr_matrix
    groups: np.ndarray
    sum_factors: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return self.counts.shape

    @property
    def zero_fraction(self) -> float:
        return 1.0 - self.counts.nnz / (self.shape[0] * self.shape[1])


def sparse_counts(n_cells: int, n_features: int, n_groups: int = 2, seed: int = 0) -> Data:
    """Single-cell-like NB counts as CSR, drawn 2**22 values at a time."""
    rng = np.random.default_rng(seed)
    groups = np.sort(np.arange(n_cells) % n_groups)
    factors = rng.lognormal(0.0, 0.3, size=n_cells)
    mu = rng.lognormal(-2.6, 1.3, size=n_features)
    effects = np.vstack([np.ones((1, n_features)), 2.0 ** rng.normal(0.0, 0.5, size=(n_groups - 1, n_features))])
    phi = rng.gamma(2.0, 1.0, size=n_features) + 0.05
    blocks = []
    step = max(1, 2**22 // n_features)
    for start in range(0, n_cells, step):
        rows = slice(start, min(start + step, n_cells))
        mean = mu[None, :] * effects[groups[rows]] * factors[rows, None]
        blocks.append(sp.csr_matrix(rng.negative_binomial(phi[None, :], phi[None, :] / (phi[None, :] + mean)).astype(np.float32)))
    return Data(sp.vstack(blocks, format="csr"), groups, factors.astype(np.float32))


def _latents(n_features: int, n_groups: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Latent values near a fit (the likelihood's cost does not depend on them)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "mu_ntc": torch.exp(torch.randn(n_features, generator=gen) - 2.0),
        "log2_alpha_y": 0.5 * torch.randn(n_groups - 1, n_features, generator=gen),
        "o_y": 0.5 + torch.rand(n_features, generator=gen),
    }


def _rate_phi(latents: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    log2 = latents["log2_alpha_y"]
    log2_full = torch.cat([torch.zeros_like(log2[:1]), log2])
    return latents["mu_ntc"] * 2.0**log2_full, 1.0 / latents["o_y"] ** 2


def dense_likelihood(counts: torch.Tensor, groups: torch.Tensor, factors: torch.Tensor) -> Callable[[dict], torch.Tensor]:
    """The technical model's dense likelihood as a function of the latents."""

    def total(latents: dict[str, torch.Tensor]) -> torch.Tensor:
        rate, phi = _rate_phi(latents)
        mean = rate[groups] * factors[:, None]
        logits = torch.log(mean + EPS) - torch.log(phi + EPS)
        return TechnicalNegativeBinomial(total_count=phi, logits=logits, validate_args=False).log_prob(counts).sum()

    return total


def fast_likelihood(stats: NegBinomialStats, threads: int) -> Callable[[dict], torch.Tensor]:
    def total(latents: dict[str, torch.Tensor]) -> torch.Tensor:
        return stats.log_prob(*_rate_phi(latents), threads=threads)

    return total


def forward_backward(total: Callable[[dict], torch.Tensor], latents: dict[str, torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        leaves = {name: value.detach().requires_grad_() for name, value in latents.items()}
        total(leaves).backward()

    return run


def fast_model(stats: Any, mu_prior_mean: torch.Tensor, mu_prior_sd: torch.Tensor, n_groups: int, observe: bool = True, threads: int = 1) -> None:
    """The technical model's sites (as ``technical_model``) observing the exact total."""
    features = pyro.plate(FEATURE_PLATE, mu_prior_mean.shape[-1], dim=-1)
    with features, pyro.plate("c_plate", n_groups - 1, dim=-2):
        log2_alpha_y = pyro.sample("log2_alpha_y", dist.StudentT(torch.tensor(3.0), torch.zeros(()), 20.0))
        pyro.deterministic("alpha_y_mul", 2.0**log2_alpha_y)
        pyro.deterministic("delta_y_add", log2_alpha_y)
    beta_o = pyro.sample("beta_o", dist.Gamma(torch.tensor(9.0), 3.0))
    with features:
        o_y = pyro.sample("o_y", dist.Exponential(beta_o))
        mu_ntc = pyro.sample("mu_ntc", dist.Gamma(mu_prior_mean**2 / mu_prior_sd**2, mu_prior_mean / mu_prior_sd**2))
    if observe:
        rate, phi = _rate_phi({"mu_ntc": mu_ntc, "log2_alpha_y": log2_alpha_y, "o_y": o_y})
        observe_total("y_obs", stats.log_prob(rate, phi, threads=threads))


def svi_step(model: Callable, kwargs: dict[str, Any]) -> Callable[[], None]:
    """One SVI step as training runs it (AutoNormal, TraceMeanField_ELBO, bayesDREAM's optimiser)."""
    pyro.clear_param_store()
    guide = AutoNormal(model)
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 0.01, "clip_norm": 10.0}), TraceMeanField_ELBO(max_plate_nesting=2))
    svi.step(**kwargs)  # builds the guide
    return lambda: svi.step(**kwargs)


def _timed(run: Callable[[], None]) -> tuple[float, float, float]:
    """(wall s, process CPU s, 1-minute load before)."""
    load = os.getloadavg()[0]
    start, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - start, time.process_time() - cpu, load


def _cases(data: Data, stats: NegBinomialStats, threads: tuple[int, ...], dense_cells: int) -> dict[str, tuple[int, Callable[[], None]]]:
    """name -> (torch intra-op threads, timed call). The fast likelihood runs its own ``threads``
    pool with torch at one thread (its pool threads are serial anyway); the dense likelihood
    and the guide use torch's threads."""
    n_cells, n_features = data.shape
    groups, factors = torch.from_numpy(data.groups), torch.from_numpy(data.sum_factors)
    dense_counts = torch.from_numpy(data.counts[:dense_cells].toarray())
    latents = _latents(n_features, 2)
    model_kwargs = dict(stats=stats, mu_prior_mean=latents["mu_ntc"] + 1e-6, mu_prior_sd=0.5 * latents["mu_ntc"] + 1e-3, n_groups=2)
    dense = dense_likelihood(dense_counts, groups[:dense_cells], factors[:dense_cells])
    cases: dict[str, tuple[int, Callable[[], None]]] = {}
    for k in threads:
        cases[f"dense t{k}"] = (k, forward_backward(dense, latents))
        cases[f"fast t{k}"] = (1, forward_backward(fast_likelihood(stats, k), latents))
        cases[f"guide+adam torch{k}"] = (k, svi_step(fast_model, {**model_kwargs, "observe": False}))
        cases[f"step fast t{k}"] = (1, svi_step(fast_model, {**model_kwargs, "threads": k}))
        if dense_cells == n_cells:
            dense_kwargs = {**model_kwargs, "counts": dense_counts, "groups": groups, "sum_factors": factors}
            del dense_kwargs["stats"]
            cases[f"step dense t{k}"] = (k, svi_step(technical_model, dense_kwargs))
    return cases


def measure_size(n_cells: int, n_features: int, threads: tuple[int, ...], reps: int, dense_bytes: int) -> dict[str, Any]:
    """Every case of one size, ``reps`` rounds round-robin; medians of wall and CPU seconds."""
    data = sparse_counts(n_cells, n_features)
    start = time.perf_counter()
    stats = NegBinomialStats.from_counts(data.counts, data.groups, data.sum_factors)
    build_s = time.perf_counter() - start
    dense_cells = min(n_cells, max(1, dense_bytes // (DENSE_BYTES_PER_VALUE * n_features)))
    cases = _cases(data, stats, threads, dense_cells)
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in cases}
    previous = torch.get_num_threads()
    try:
        for _ in range(reps):
            for name, (torch_threads, run) in cases.items():
                torch.set_num_threads(torch_threads)
                times[name].append(_timed(run))
    finally:
        torch.set_num_threads(previous)
    scale = n_cells / dense_cells
    medians, cpu = ({name: statistics.median(v[i] for v in values) for name, values in times.items()} for i in (0, 1))
    for k in threads:
        for table in (medians, cpu):
            table[f"dense t{k}"] *= scale
            table.setdefault(f"step dense t{k}", table[f"guide+adam torch{k}"] + table[f"dense t{k}"])
    return {
        "N": n_cells, "T": n_features, "zero_fraction": data.zero_fraction, "nnz": data.counts.nnz,
        "distinct_values": int(stats.hist_value.numel()), "stats_bytes": stats.nbytes, "build_s": build_s,
        "dense_cells": dense_cells, "dense_scaled": dense_cells < n_cells, "reps": reps,
        "median_s": medians, "median_cpu_s": cpu, "loads": {name: [v[2] for v in values] for name, values in times.items()},
    }


def report(result: dict[str, Any], threads: tuple[int, ...]) -> str:
    n, t = result["N"], result["T"]
    per_count = 1e9 / (n * t)
    med, cpu = result["median_s"], result["median_cpu_s"]
    lines = [
        f"### N x T = {n} x {t}: {100 * result['zero_fraction']:.1f}% zeros, nnz {result['nnz']:,}, "
        f"{result['distinct_values']:,} distinct (feature, value) pairs; statistics {result['stats_bytes'] / 2**20:.0f} MiB, "
        f"built in {result['build_s']:.1f} s",
        "",
        "| threads | dense f+b ms | fast f+b ms | dense ns/count | fast ns/count | likelihood ratio (CPU) | "
        "guide+adam ms, torch 1 / k | step dense ms | step fast ms | step ratio (CPU) | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in threads:
        dense, fast = med[f"dense t{k}"], med[f"fast t{k}"]
        step_dense, step_fast = med[f"step dense t{k}"], med[f"step fast t{k}"]
        estimated = "*" if f"step dense t{k}" not in result["loads"] else ""
        loads = [x for name, values in result["loads"].items() if name.endswith(f"t{k}") for x in values]
        lines.append(
            f"| {k} | {1e3 * dense:.0f} | {1e3 * fast:.1f} | {dense * per_count:.1f} | {fast * per_count:.2f} | "
            f"{dense / fast:.1f}x ({cpu[f'dense t{k}'] / cpu[f'fast t{k}']:.1f}x) | "
            f"{1e3 * med['guide+adam torch1']:.1f} / {1e3 * med[f'guide+adam torch{k}']:.1f} | {1e3 * step_dense:.0f}{estimated} | "
            f"{1e3 * step_fast:.1f} | {step_dense / step_fast:.1f}x ({cpu[f'step dense t{k}'] / cpu[f'step fast t{k}']:.1f}x) | "
            f"{min(loads):.1f}-{max(loads):.1f} |"
        )
    lines.append("\nstep fast: torch at 1 thread, the likelihood on k; dense and step dense: torch at k threads.")
    if result["dense_scaled"]:
        lines.append(f"dense measured on {result['dense_cells']} of {n} cells and scaled by N / cells; "
                     "* step dense = guide+adam (torch k) + dense: the dense step does not fit the process budget.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3000 x 2000 only")
    parser.add_argument("--sizes", nargs="*", help="NxT, e.g. 3000x2000")
    parser.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dense-bytes", type=float, default=1.5e9, help="largest dense forward+backward to run whole")
    args = parser.parse_args(argv)
    pyro.enable_validation(False)  # timed steps run unvalidated, as training's steps after the first
    sizes = [tuple(map(int, s.split("x"))) for s in args.sizes] if args.sizes else ([(3000, 2000)] if args.quick else [(3000, 2000), (20000, 10000)])
    threads = tuple(args.threads)
    results = []
    for n_cells, n_features in sizes:
        results.append(measure_size(n_cells, n_features, threads, args.reps, int(args.dense_bytes)))
        print(report(results[-1], threads), flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"\npeak RSS {peak / 2**30:.2f} GiB; torch {torch.__version__}, {os.cpu_count()} CPUs, {platform.node()}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{platform.node()}-{time.strftime('%Y-%m-%d')}-W12{'-quick' if args.quick else ''}.json"
    out.write_text(json.dumps({"results": results, "peak_rss_bytes": peak, "torch": torch.__version__}, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()

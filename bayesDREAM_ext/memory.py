"""Memory of bayesDREAM's technical model, from shapes alone: no data, usable before training.

- :func:`technical_footprint`: the analytic footprint of a vectorised Predictive of the
  technical model (a :class:`devicemem.footprint.Footprint`). Its coefficients count the
  tensors alive at the peak of one vectorised draw (:meth:`devicemem.sampling.Sampler.draw`,
  what the runner executes per batch), measured by peak RSS in fresh child processes
  (bench/w3_accuracy.py checks them on a grid).
- :func:`plan_technical`: devicemem's planner on that footprint;
  :func:`estimate_predictive_memory_and_set_minibatch` bayesDREAM's own batch rule, planned
  properly.
- :func:`technical_latent_size` and the AutoIAFNormal parameter count (:func:`iaf_parameters`)
  that the training plan shares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from bayesDREAM_ext.data import DISTRIBUTIONS
from devicemem.backends.names import is_host
from devicemem.backends.view import MemoryView
from devicemem.checks import check_choice, check_int
from devicemem.footprint import Footprint
from devicemem.planner import Plan, check_plan_arguments, decide, resolve_threads, view_of

MiB = 1 << 20
# The guides a technical Predictive footprint is known for: AutoNormal, AutoIAFNormal, AutoDelta.
FOOTPRINT_GUIDES = ("normal", "iaf", "delta")

# glibc serves allocations above its mmap threshold with mmap and returns them to the OS on
# free; the threshold adapts upwards to freed blocks but never beyond 32 MiB on 64-bit.
# Smaller tensors come from the heap, whose freed blocks stay resident: temporaries under this
# size are still counted in RSS after they die.
GLIBC_MMAP_THRESHOLD_MAX = 32 * MiB

# With the observation site, on the host, a vectorised batch stops paying once its likelihood
# tensors hold this many elements: a draw's own overhead (tracing a few dozen sites, ~10-30 ms)
# is then under 5% of its work. Measured at N x T = 2000 x 2000 (4M elements) on the CPU: 0.52 s
# per sample at B=1, 0.66-0.70 s at B=2-25 (once a tensor passes glibc's mmap threshold every
# temporary is page-faulted in afresh). On an accelerator a sample costs far less than the
# draw's overhead, so there vectorising pays until memory binds: no cap. With the observation
# site drawn block-parallel on k threads (devicemem.blockdraw) a sample's work takes ~1/k of the
# time while the overhead does not shrink, so the cap scales with k.
OBS_SATURATION_ELEMENTS = 1 << 21

@dataclass(frozen=True)
class _Sites:
    """Element counts of one technical model's latent sites (per sample, unbatched)."""

    effects: int  # effect elements: (C-1) * T, times K for multinomial
    features: int  # elements of all per-feature sites ([T] or [T, K] each)
    feature_site: int  # elements of one per-feature site
    latent: int  # the guide's latent dimension (unconstrained)


def check_shapes(n_cells: int, n_features: int, n_groups: int, n_categories: int = 1) -> None:
    """ValueError naming the argument for N/T/C/K < 1 or more groups than cells."""
    check_int(n_cells, "n_cells")
    check_int(n_features, "n_features")
    check_int(n_groups, "n_groups")
    check_int(n_categories, "n_categories")
    if n_groups > n_cells:
        raise ValueError(f"n_groups: cannot exceed n_cells ({n_cells}); got {n_groups}")


def _technical_sites(n_features: int, n_groups: int, n_categories: int, distribution: str) -> _Sites:
    effects = (n_groups - 1) * n_features * (n_categories if distribution == "multinomial" else 1)
    if distribution == "multinomial":  # probs_baseline_raw [T, K], stick-breaking drops a category
        return _Sites(effects, n_features * n_categories, n_features * n_categories,
                      effects + n_features * (n_categories - 1))
    if distribution == "binomial":  # mu_ntc
        return _Sites(effects, n_features, n_features, effects + n_features)
    extra = 1 if distribution == "negbinom" else 0  # negbinom: o_y, mu_ntc and the scalar beta_o
    return _Sites(effects, 2 * n_features, n_features, effects + 2 * n_features + extra)


def technical_latent_size(n_features: int, n_groups: int, n_categories: int = 1, distribution: str = "negbinom") -> int:
    """Number of unconstrained latent values of the technical model (what a guide covers)."""
    return _technical_sites(n_features, n_groups, n_categories, distribution).latent


# Per-sample floats at the peak of a params-only vectorised draw (devicemem.sampling), as (per
# effect element, per per-feature element); the largest candidate wins. Measured by peak RSS in
# fresh children (bench/w3_accuracy.py) with [B, T] tensors >= 32 MiB (T=20000-24000,
# B=500-1200), where the peak is linear in B through the origin.
# AutoNormal draws each site in place (its value only); the peak is at the end of the model,
# which adds alpha_y_mul and the [B, C, T] effects with the baseline row: 3 per effect element
# and 2 per per-feature element (negbinom C=2: 7.0 T, C=4: 13.0 T; studentt C=3: 10.0 T;
# binomial, one per-feature site, a Beta: 3 per element, 9.0 T at C=3). multinomial at K=3:
# 7.7 per element (masking, centring and the simplex).
_NORMAL_GUIDE_PEAKS = {
    "negbinom": ((3.0, 2.0),),
    "normal": ((3.0, 2.0),),
    "studentt": ((3.0, 2.0),),
    "binomial": ((3.0, 3.0),),
    "multinomial": ((4.2, 4.2),),
}
# AutoDelta's draws are expanded views: only the model's derived tensors remain (negbinom C=2,
# T=24000: 4.0 per effect element in six children, ~0 per feature).
_DELTA_GUIDE_PEAKS = ((4.0, 0.0),)
# While a [B, T] tensor is under glibc's mmap threshold some dead temporaries stay in the heap:
# measured +0.15 per per-feature element (negbinom, T=4000 and 31467, C=2); 0.5 keeps a margin.
_HEAP_PER_FEATURE = {"normal": 0.5, "delta": 0.0}
# AutoIAFNormal: per sample the guide holds the base draw [B, D], the hidden layer [B, 3D+1] and
# the network output [B, 2D]; beside them, its masked weight products (2D x H floats for the
# larger layer) stay resident. Measured (peak RSS, T=250-1000, D=3T+1, B=1000-8000): 5.3-8.0 D
# floats per sample and 1.3-1.9 weight products fixed; 7 D and 1.25 products predict 0.80-1.17
# of every point (the low end at T=250, under 220 MB).
_IAF_PER_LATENT = 7.0
_IAF_WEIGHT_PRODUCTS = 1.25

# With the observation site: [B, N, T]-sized tensors alive at the peak per sample, and fixed
# [N, T]-sized working memory. Measured (two batch sizes each, N x T = 1500 x 3000 and
# 2500 x 4000; multinomial 1500 x 1000 x K=3): negbinom 4.75-5.0 per sample (mu_final, logits,
# exp(-logits), the gamma and Poisson draws) and at most 1 fixed; normal 4.0, studentt 7.0 (its
# chi2 draws), binomial 3.0, multinomial 5.0 per [N, T, K] element and 1 fixed. At 1000 x 1000
# ([N, T] under glibc's mmap threshold) negbinom measured 4.4-5.0 per sample: no heap excess.
_OBS_PER_SAMPLE = {"negbinom": 5.0, "normal": 4.0, "studentt": 7.0, "binomial": 3.0, "multinomial": 5.0}
_OBS_FIXED = {"negbinom": 1.0, "normal": 0.0, "studentt": 0.0, "binomial": 0.0, "multinomial": 1.0}


def iaf_hidden_size(latent: int) -> int:
    """Pyro's default AutoIAFNormal hidden size, 3 x latent + 1."""
    return 3 * latent + 1


def iaf_parameters(latent: int) -> tuple[int, int]:
    """(weights, biases) of AutoIAFNormal's two masked linear layers (D -> H -> 2D) at Pyro's
    default hidden size H."""
    hidden = iaf_hidden_size(latent)
    return latent * hidden + hidden * 2 * latent, hidden + 2 * latent


def _guide_parameter_floats(guide: str, latent: int) -> int:
    if guide == "normal":
        return 2 * latent  # loc and scale per latent element
    if guide == "delta":
        return latent
    weights, biases = iaf_parameters(latent)
    return 2 * weights + biases  # each weight also held as its mask (a float buffer)


def technical_footprint(
    n_cells: int,
    n_features: int,
    n_groups: int,
    n_categories: int = 1,
    distribution: str = "negbinom",
    guide: str = "normal",
    with_obs: bool = False,
    dtype: torch.dtype = torch.float32,
    on_host: bool = True,
    threads: int = 1,
) -> Footprint:
    """Analytic footprint of a vectorised Predictive of bayesDREAM's technical model.

    Per sample: the [B, C-1, T] / [B, T] sites with the guide's draws and temporaries, plus,
    ``with_obs``, the [B, N, T] likelihood temporaries. Fixed: the inputs (counts [N, T], the
    per-cell and per-feature vectors, the guide parameters), the likelihood's fixed working
    memory, plus glibc's resident heap temporaries when a [T] tensor is under its mmap threshold.
    ``on_host``: the batches run on the CPU, where a batch with the observation site stops being
    faster per sample early (``saturation_batch``; see :data:`OBS_SATURATION_ELEMENTS`), the
    later the more ``threads`` draw it.
    No data needed: usable before training starts.
    """
    check_shapes(n_cells, n_features, n_groups, n_categories)
    check_choice(distribution, DISTRIBUTIONS, "distribution")
    check_choice(guide, FOOTPRINT_GUIDES, "guide")
    check_int(threads, "threads")
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype: expected a torch.dtype such as torch.float32; got {dtype!r}")
    item = torch.empty((), dtype=dtype).element_size()
    sites = _technical_sites(n_features, n_groups, n_categories, distribution)
    cells_by_features = n_cells * n_features * (n_categories if distribution == "multinomial" else 1)

    heap = heap_limit = 0
    if guide == "iaf":
        per_sample = _IAF_PER_LATENT * sites.latent
        working = _IAF_WEIGHT_PRODUCTS * 2 * sites.latent * iaf_hidden_size(sites.latent)
    else:
        peaks = _NORMAL_GUIDE_PEAKS[distribution] if guide == "normal" else _DELTA_GUIDE_PEAKS
        per_sample = max(a * sites.effects + b * sites.features for a, b in peaks)
        heap = _HEAP_PER_FEATURE[guide] * sites.features * item
        heap_limit = math.ceil(GLIBC_MMAP_THRESHOLD_MAX / (sites.feature_site * item))
        working = 0.0
    saturation = None
    if with_obs:
        per_sample += _OBS_PER_SAMPLE[distribution] * cells_by_features
        working += _OBS_FIXED[distribution] * cells_by_features
        if on_host:
            saturation = max(1, math.ceil(OBS_SATURATION_ELEMENTS * threads / cells_by_features))

    matrices = 2 if distribution == "binomial" else 1  # counts (and the denominator)
    data = (matrices * cells_by_features + n_cells + 3 * n_features) * item + 8 * n_cells  # + int64 groups
    inputs = data + _guide_parameter_floats(guide, sites.latent) * item
    output = _technical_output_floats(sites, cells_by_features, distribution, with_obs) * item
    return Footprint(
        fixed_bytes=int(inputs + working * item),
        per_sample_bytes=int(math.ceil(per_sample * item)),
        source=f"analytic technical {distribution}/{guide}{' with obs' if with_obs else ''}"
        + (f", {threads} draw threads" if saturation is not None and threads > 1 else ""),
        input_bytes=int(inputs),
        small_batch_bytes=int(heap),
        small_batch_limit=int(heap_limit),
        output_per_sample_bytes=int(output),
        saturation_batch=saturation,
    )


def _technical_output_floats(sites: _Sites, cells_by_features: int, distribution: str, with_obs: bool) -> int:
    """Floats of one returned sample: every latent and deterministic site (bayesDREAM's
    effect site and its two deterministic views), plus y_obs with the observation site."""
    floats = 3 * sites.effects + sites.features + (1 if distribution == "negbinom" else 0)
    if distribution == "multinomial":
        floats = 2 * sites.effects + 2 * sites.features
    return floats + (cells_by_features if with_obs else 0)


def plan_technical(
    n_cells: int,
    n_features: int,
    n_groups: int,
    num_samples: int,
    *,
    n_categories: int = 1,
    distribution: str = "negbinom",
    guide: str = "normal",
    with_obs: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str = "auto",
    minibatch_size: int | None = None,
    safety_factor: float | None = None,
    max_memory: Any = None,
    output_bytes: int | None = None,
    view: MemoryView | None = None,
    threads: int | None = None,
) -> Plan:
    """Plan the technical model's Predictive from shapes alone (:func:`technical_footprint`).

    The inputs (counts, guide parameters) are taken to live on the host, so they count against
    a GPU's memory but not again against the host's. Same decisions as :func:`plan_predictive`.
    ``threads``: how many threads draw the likelihood on the host (:func:`resolve_threads`;
    default ``DEVICEMEM_THREADS``, else the host's usable cores): with more, a bigger vectorised
    batch still pays. ``view``: the memory reading to plan against (default: one taken now).
    """
    check_shapes(n_cells, n_features, n_groups, n_categories)
    check_choice(distribution, DISTRIBUTIONS, "distribution")
    if n_categories != 1 and distribution != "multinomial":
        raise ValueError(
            f"n_categories: only the multinomial distribution has categories; got {n_categories} with {distribution!r}"
        )
    check_choice(guide, FOOTPRINT_GUIDES, "guide")
    where = check_plan_arguments(num_samples, device, minibatch_size, safety_factor, output_bytes)
    view = view_of(view, max_memory)
    draw_threads, _ = resolve_threads(threads, lambda: view.host.cores, view.environ)

    def footprint_for(name: str, room: int) -> Footprint:
        return technical_footprint(n_cells, n_features, n_groups, n_categories, distribution, guide, with_obs, dtype,
                                   on_host=is_host(name), threads=draw_threads)

    return decide(footprint_for, num_samples, where, view, minibatch_size=minibatch_size, safety_factor=safety_factor,
                  output_bytes=output_bytes)


def estimate_predictive_memory_and_set_minibatch(
    N: int,
    T: int,
    C: int,
    nsamples: int,
    minibatch_size: int | None = None,
    distribution: str = "negbinom",
    safety_factor: float | None = None,
    device: str = "cpu",
    view: MemoryView | None = None,
) -> tuple[int | None, bool]:
    """bayesDREAM's ``_estimate_predictive_memory_and_set_minibatch``, planned properly.

    Returns ``(minibatch_size, use_parallel)``: ``None`` when all ``nsamples`` fit in one
    batch; a user ``minibatch_size`` is returned as is with ``use_parallel=True``; with no
    memory reading, the seed's ``(50, False)``. Params-only technical Predictive (the seed's
    case), with an AutoNormal guide.
    """
    plan = plan_technical(
        N, T, C, nsamples, distribution=distribution, device=device, minibatch_size=minibatch_size,
        safety_factor=safety_factor, view=view,
    )
    if minibatch_size is not None:
        return minibatch_size, True
    if plan.budget_bytes is None:
        return plan.batch_size, plan.vectorized
    return (None if plan.n_batches == 1 else plan.batch_size), plan.vectorized

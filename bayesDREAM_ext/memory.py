"""Memory of bayesDREAM's technical model, from shapes alone: no data, usable before training.
Every plan here is made against a devicemem ``MemoryView`` (one reading of the machine), with
its budget rule and device pick.

- :func:`technical_footprint`: the analytic footprint of a vectorised Predictive of the
  technical model (a :class:`devicemem.footprint.Footprint`). Its coefficients count the
  tensors alive at the peak of one vectorised draw (:meth:`devicemem.sampling.Sampler.draw`,
  what the runner executes per batch), measured by peak RSS in fresh child processes
  (bench/w3_accuracy.py checks them on a grid).
- :func:`plan_technical`: devicemem's planner on that footprint;
  :func:`estimate_predictive_memory_and_set_minibatch` bayesDREAM's own batch rule, planned
  properly.
- :func:`technical_latent_size` and the AutoIAFNormal parameter count (:func:`iaf_parameters`),
  shared by both footprints.
- :func:`training_footprint` predicts the peak memory of full-data SVI (data + guide
  parameters, gradients and Adam state + one step's activations); :func:`plan_training` turns
  it into a :class:`TrainingPlan`: device, guide, and full-data steps or the exact chunked
  gradient (:mod:`bayesDREAM_ext.chunked`) in the largest chunk of cells that fits, with the
  counts on the device or kept on the host.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from bayesDREAM_ext.data import DISTRIBUTIONS
from devicemem.backends import HOST, DeviceMemory, MemoryView, budget
from devicemem.backends.names import is_host
from devicemem.checks import check_choice, check_int
from devicemem.footprint import Footprint
from devicemem.planner import Plan, check_plan_arguments, decide, resolve_threads, view_of
from devicemem.units import format_bytes

logger = logging.getLogger("devicemem.bayesdream")

MiB = 1 << 20
# The guides a technical Predictive footprint is known for: AutoNormal, AutoIAFNormal, AutoDelta.
FOOTPRINT_GUIDES = ("normal", "iaf", "delta")
# The guides fit_technical and plan_training take: AutoNormal, AutoIAFNormal, or IAF when it fits.
GUIDE_CHOICES = ("normal", "iaf", "auto")

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


# --- training: SVI's footprint and its plan ---------------------------------------------

FLOAT_BYTES = 4
# Per cell: its group (int64) and sum factor (float32).
CELL_BYTES = 12
DTYPE_BYTES = {"uint8": 1, "int16": 2, "int32": 4, "float32": 4}
# What SVI adds beyond the data: a fixed part (Pyro's traces, autograd and allocator arenas:
# the first step of a tiny model measures 80-86 MB) and the activations of a step per observed
# value. Measured by the CPU backend (VmHWM after clear_refs) over the first steps in fresh
# processes, less the fixed part, B per value: negbinom 44 (3000 x 3000, C = 2), 43 (1500 x
# 1500, C = 3), 17-50 (2000 x 2000) and 42-61 (4000 x 1000, C = 3); normal 32-37; studentt
# 36-37; binomial 29-30; multinomial 18 per N x T x K (1500 x 1500 x 4). The spread under 32 MB
# per [N, T] tensor is glibc keeping freed temporaries resident; each constant covers the
# largest measurement, so the prediction errs high.
STEP_FIXED_BYTES = 80 * 10**6
STEP_BYTES_PER_VALUE = {"negbinom": 64, "normal": 40, "studentt": 40, "binomial": 32, "multinomial": 20}
# AutoNormal: loc and scale per latent value, each with a gradient and two Adam moments.
NORMAL_GUIDE_FLOATS_PER_LATENT = 8
# AutoIAFNormal: weights W of MaskedLinear(L, H) and MaskedLinear(H, 2L) (H = 3L + 1, Pyro's
# default hidden size), each also held as its mask, the masked product the forward pass keeps
# for the backward, that product's gradient, the weight's gradient and two Adam moments: 7 W;
# the first step measures 8.1 W at T = 400 (L = 1201), fixed part included.
IAF_COPIES = 7


@dataclass(frozen=True)
class TrainingPlan:
    """Where and with which guide SVI runs, in full-data steps or in chunks of cells, and why.

    ``predicted_peak_bytes`` is what training adds on the device (data stored there, guide
    state, one step or one chunk's activations); ``budget_bytes`` is ``safety_factor`` x the
    device's usable memory (None when unknown); ``measured_peak_bytes`` the first step's
    high-water mark as the device's backend measures it (host: peak RSS of the process;
    CUDA: peak allocated), filled in by :func:`train`. ``chunk_cells`` is None for full-data
    steps, else the cells per chunk of the exact chunked gradient; ``minibatch`` the cells
    per stochastic step (None: every cell every step). ``data_on_device`` False: the counts
    stay on the host and each chunk is copied to the device. ``data_bytes`` is the size of
    the counts as training stores them (``data_dtype``).
    """

    device: str
    guide: str
    latent_size: int
    predicted_peak_bytes: int
    budget_bytes: int | None
    safety_factor: float
    reasons: tuple[str, ...]
    measured_peak_bytes: int | None = None
    distribution: str = "negbinom"
    n_cells: int = 0
    chunk_cells: int | None = None
    minibatch: int | None = None
    data_on_device: bool = True
    data_bytes: int = 0
    data_dtype: str = "float32"

    @property
    def cells_per_step(self) -> int:
        return self.n_cells if self.minibatch is None else min(self.minibatch, self.n_cells)

    @property
    def chunks_per_step(self) -> int:
        return 1 if self.chunk_cells is None else math.ceil(self.cells_per_step / self.chunk_cells)

    @property
    def host_bytes(self) -> int:
        """Training data the host holds: all of it unless it lives on a GPU."""
        return self.data_bytes if self.device == HOST or not self.data_on_device else 0

    @property
    def device_bytes(self) -> int:
        """What training is predicted to add on ``device`` at its peak."""
        return self.predicted_peak_bytes


def guide_bytes(guide: str, latent: int) -> int:
    """Guide parameters with their gradients and Adam state, in bytes (float32)."""
    if guide == "iaf":
        weights, biases = iaf_parameters(latent)
        return IAF_COPIES * (weights + biases) * FLOAT_BYTES
    return NORMAL_GUIDE_FLOATS_PER_LATENT * latent * FLOAT_BYTES


def data_bytes(n_cells: int, n_features: int, n_categories: int = 1, *, distribution: str = "negbinom", itemsize: int = FLOAT_BYTES) -> int:
    """The cell-wise data: counts (and the binomial denominator) at ``itemsize`` bytes per
    value, groups and sum factors."""
    matrices = 2 if distribution == "binomial" else 1
    return n_cells * n_features * n_categories * itemsize * matrices + n_cells * CELL_BYTES


def training_footprint(
    n_cells: int, n_features: int, n_groups: int, n_categories: int = 1, *, distribution: str = "negbinom", guide: str = "normal"
) -> int:
    """Predicted peak bytes of full-data SVI on one device: float32 data, guide state and one step's activations."""
    latent = technical_latent_size(n_features, n_groups, n_categories, distribution)
    values = n_cells * n_features * n_categories
    return (
        data_bytes(n_cells, n_features, n_categories, distribution=distribution) + guide_bytes(guide, latent)
        + STEP_FIXED_BYTES + STEP_BYTES_PER_VALUE[distribution] * values
    )


def chunk_cell_bytes(n_features: int, n_categories: int = 1, *, distribution: str = "negbinom", itemsize: int = FLOAT_BYTES, streamed: bool = False) -> int:
    """Device bytes each cell of a chunk costs: its share of the step's activations, its
    float32 copy for the likelihood and, when the counts stream from the host, its two
    in-flight copies at the stored ``itemsize``."""
    values = n_features * n_categories * (2 if distribution == "binomial" else 1)
    streaming = 2 * itemsize * values if streamed else 0
    return STEP_BYTES_PER_VALUE[distribution] * n_features * n_categories + FLOAT_BYTES * values + streaming


def _fits(need: int, budget: int | None) -> bool:
    return budget is None or need <= budget


@dataclass(frozen=True)
class _Shape:
    n_cells: int
    n_features: int
    n_groups: int
    n_categories: int
    distribution: str

    def latent(self) -> int:
        return technical_latent_size(self.n_features, self.n_groups, self.n_categories, self.distribution)

    def full_need(self, guide: str, cells: int) -> int:
        return training_footprint(cells, self.n_features, self.n_groups, self.n_categories, distribution=self.distribution, guide=guide) + (
            data_bytes(self.n_cells - cells, self.n_features, self.n_categories, distribution=self.distribution)
        )


@dataclass(frozen=True)
class _Layout:
    """Full-data or chunked steps on one device, where the counts live, and the predicted peak."""

    chunk_cells: int | None
    data_on_device: bool
    need: int
    itemsize: int
    reason: str


def _layout(shape: _Shape, guide: str, memory: DeviceMemory, budget: int | None, chunk_cells: int | None, minibatch: int | None, itemsize: int) -> _Layout | None:
    """The fastest way SVI fits ``budget`` on ``memory.device``: full-data steps; else chunks
    with the counts stored on the device at ``itemsize``; else (GPUs) chunks with the counts
    on the host. None when not even one cell per chunk fits. ``chunk_cells`` forces chunks of
    that size (ValueError when predicted over the budget)."""
    device = memory.device
    cells = shape.n_cells if minibatch is None else min(minibatch, shape.n_cells)
    fixed = guide_bytes(guide, shape.latent()) + STEP_FIXED_BYTES
    full = shape.full_need(guide, cells)
    if chunk_cells is None and minibatch is None and _fits(full, budget):
        return _Layout(None, True, full, FLOAT_BYTES, f"full-data steps on {device}: data + guide + optimizer + one step need {format_bytes(full)}, budget {format_bytes(budget)}")
    stored_size = FLOAT_BYTES if device == HOST else itemsize
    options = [(True, data_bytes(shape.n_cells, shape.n_features, shape.n_categories, distribution=shape.distribution, itemsize=stored_size), False)]
    if device != HOST:
        options.append((False, 0, True))
    for on_device, resident, streamed in options:
        per_cell = chunk_cell_bytes(shape.n_features, shape.n_categories, distribution=shape.distribution, itemsize=stored_size, streamed=streamed)
        room = None if budget is None else (budget - resident - fixed) // per_cell
        if chunk_cells is not None:
            need = resident + fixed + min(chunk_cells, cells) * per_cell
            if not _fits(need, budget):
                continue
            size = min(chunk_cells, cells)
        elif room is None or room >= 1:
            size = cells if room is None else math.ceil(cells / math.ceil(cells / min(room, cells)))  # equal chunks
            need = resident + fixed + size * per_cell
        else:
            continue
        where = f"counts on {device}" if on_device else "counts kept on the host, each chunk copied to the device"
        why = (f"forced by svi_chunk={chunk_cells}" if chunk_cells is not None else
               f"a {'minibatch' if minibatch else 'full-data'} step needs {format_bytes(full)}, budget {format_bytes(budget)}")
        reason = (f"chunked steps on {device}: {size} cells per chunk, {math.ceil(cells / size)} chunk(s) per step ({why}); "
                  f"{where} ({format_bytes(resident if on_device else data_bytes(shape.n_cells, shape.n_features, shape.n_categories, distribution=shape.distribution, itemsize=stored_size))}); "
                  f"data + guide + optimizer + one chunk need {format_bytes(need)}")
        return _Layout(size, on_device, need, stored_size, reason)
    if chunk_cells is not None:
        raise ValueError(f"svi_chunk: chunks of {chunk_cells} cells are predicted not to fit {device} (budget {format_bytes(budget)})")
    return None


def _iaf_layout(shape: _Shape, memory: DeviceMemory, budget: int, chunk_cells: int | None, minibatch: int | None, itemsize: int) -> _Layout | None:
    """AutoIAFNormal's layout on ``memory.device``, or None when its weights leave no room
    (an over-budget forced chunk is no error here: AutoNormal is the fallback)."""
    try:
        return _layout(shape, "iaf", memory, budget, chunk_cells, minibatch, itemsize)
    except ValueError:
        return None


def _one_cell_message(shape: _Shape, guide: str, device: str, budget: int | None) -> str:
    need = guide_bytes(guide, shape.latent()) + STEP_FIXED_BYTES + chunk_cell_bytes(shape.n_features, shape.n_categories, distribution=shape.distribution)
    return (f"SVI cannot fit {device}: even one cell per chunk needs {format_bytes(need)} (guide + optimizer state + "
            f"one cell's step), budget {format_bytes(budget)}; raise max_memory or safety_factor, or free memory")


def plan_training(
    n_cells: int,
    n_features: int,
    n_groups: int,
    n_categories: int = 1,
    *,
    distribution: str = "negbinom",
    device: str = "auto",
    guide: str = "normal",
    safety_factor: float,
    max_memory: Any = None,
    chunk_cells: int | None = None,
    minibatch: int | None = None,
    count_dtype: str = "float32",
    view: MemoryView | None = None,
) -> TrainingPlan:
    """Choose the device, the guide and the step layout for SVI, from shapes alone.

    On each device: full-data steps when data, guide, optimizer state and one step fit
    ``safety_factor`` x its usable memory; else the exact chunked gradient in the largest
    chunk of cells that fits, the counts stored on the device in the smallest exact dtype
    (``count_dtype``: "uint8", "int16", "int32" or "float32") or, on a GPU too small for them, kept on the host.
    ``device="auto"``: the GPU with the most usable memory when SVI fits it in any layout,
    else the CPU. An explicit device is used as given (ValueError when this process does not
    see it). ValueError, before any training, when not even one cell per chunk fits.
    ``guide="iaf"`` needs the AutoIAFNormal footprint (hidden size 3 x latent + 1) to fit in
    full-data steps (ValueError otherwise); ``"auto"`` takes it when it fits, else AutoNormal.
    ``chunk_cells`` forces chunks of that size; ``minibatch`` makes each step use that many
    random cells (stochastic, likelihood scaled by N / B). ``view``: the memory reading to plan
    against (default: one taken now, with ``max_memory``); planning for another machine is a
    view read through a probe that lists its devices.
    """
    view = view_of(view, max_memory)
    shape = _Shape(n_cells, n_features, n_groups, n_categories, distribution)
    reasons: list[str] = []
    alone = len(view.candidates(device)) == 1

    def layout_on(memory: DeviceMemory, last: bool) -> tuple[DeviceMemory, _Layout] | None:
        room = budget(memory, safety_factor)
        layout = _layout(shape, "normal", memory, room, chunk_cells, minibatch, DTYPE_BYTES[count_dtype])
        if layout is None and not last:
            reasons.append(f"SVI does not fit {memory.device} even one cell per chunk (budget {format_bytes(room)}); using the CPU")
            return None
        if layout is None:
            raise ValueError(_one_cell_message(shape, "normal", memory.device, room))
        if device != "auto":
            reasons.append(f"SVI on {memory.device} as requested")
        elif memory.device != HOST:
            reasons.append(f"SVI on {memory.device}, the GPU with the most usable memory")
        elif alone:
            reasons.append("no GPU visible; SVI on the CPU")
        return memory, layout

    memory, layout = view.pick(device, layout_on)
    room = budget(memory, safety_factor)
    reasons.append(layout.reason)
    kind = "normal"
    if guide in ("iaf", "auto"):
        iaf_need = shape.full_need("iaf", shape.n_cells)
        verdict = f"AutoIAFNormal (hidden size {iaf_hidden_size(shape.latent())}) needs {format_bytes(iaf_need)} in full-data steps, budget {format_bytes(room)} on {memory.device}"
        iaf_layout = None if room is None else _iaf_layout(shape, memory, room, chunk_cells, minibatch, DTYPE_BYTES[count_dtype])
        if iaf_layout is not None:
            kind, layout = "iaf", iaf_layout
            reasons.append(f"{verdict}: using it" + ("" if iaf_layout.chunk_cells is None else f", in chunks ({iaf_layout.reason})"))
        elif guide == "iaf":
            raise ValueError(f"guide: {verdict}; it does not fit. Use guide='normal' or 'auto'")
        else:
            reasons.append(f"{verdict}: using AutoNormal")
    for reason in reasons:
        logger.info("[MEMORY] %s", reason)
    return TrainingPlan(
        memory.device, kind, shape.latent(), layout.need, room, safety_factor, tuple(reasons),
        distribution=distribution, n_cells=n_cells, chunk_cells=layout.chunk_cells, minibatch=minibatch,
        data_on_device=layout.data_on_device,
        data_bytes=data_bytes(n_cells, n_features, n_categories, distribution=distribution, itemsize=layout.itemsize),
        data_dtype=count_dtype if layout.chunk_cells is not None and layout.itemsize == DTYPE_BYTES[count_dtype] else "float32",
    )

"""Device-aware SVI for the technical model: which device, guide and step layout, then the training loop.

:func:`training_footprint` predicts the peak memory of full-data training (data + guide
parameters, gradients and Adam state + one step's activations); :func:`plan_training` turns
the footprints into a :class:`TrainingPlan`: device, guide, and full-data steps or the exact
chunked gradient (:mod:`bayesDREAM_ext.chunked`) in the largest chunk of cells that fits,
with the counts on the device or kept on the host, from shapes alone and before any step.
:func:`train` runs SVI exactly as bayesDREAM configures it (Adam in a OneCycleLR schedule with
max_lr = 10 x lr and 10% warm-up, stepped every iteration; gradient clipping at norm 10;
TraceMeanField_ELBO for AutoNormal; early stop on the EWMA of the loss), checks the first
step's measured peak against the budget (a chunked step over it shrinks the chunk; a full
GPU step over it restarts in chunks on that GPU on ``device="auto"``, and on the CPU only when
chunks run out of memory too), and saves and resumes checkpoints.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoGuide, AutoIAFNormal, AutoNormal
from pyro.infer.autoguide.initialization import init_to_median, init_to_value
from torch.optim.lr_scheduler import OneCycleLR
from tqdm.auto import tqdm

from bayesDREAM_ext.chunked import CellData, ChunkedELBO, as_tensor
from bayesDREAM_ext.memory import iaf_hidden_size, iaf_parameters, technical_latent_size
from bayesDREAM_ext.model import ModelInputs
from devicemem.backends import HOST, Backend, DeviceMemory, MemoryView, budget, get_backend
from devicemem.checks import check_fraction, check_int, check_positive, check_seed
from devicemem.planner import view_of
from devicemem.recovery import freeing, retries
from devicemem.units import format_bytes

logger = logging.getLogger("devicemem.bayesdream")

GUIDE_CHOICES = ("normal", "iaf", "auto")
WARMUP_FRACTION = 0.1
MAX_LR_FACTOR = 10.0
CLIP_NORM = 10.0
FLOAT_BYTES = 4
# Per cell: its group (int64) and sum factor (float32).
CELL_BYTES = 12
DTYPE_BYTES = {"uint8": 1, "int16": 2, "int32": 4, "float32": 4}
CHECKPOINT_FORMAT = "bayesDREAM_ext.SVICheckpoint/1"
# bayesDREAM's default number of SVI steps, by distribution.
DEFAULT_NITERS = {"multinomial": 100_000}
DEFAULT_NITERS_OTHER = 50_000
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


@dataclass
class TrainResult:
    """A trained guide (on ``plan.device``), the loss and learning rate of every step.

    ``seconds``: the steps this call ran (a resumed run's earlier steps excluded), of which
    ``first_step_s`` the first (validated, building the guide, measuring the peak);
    ``ms_per_step`` averages them all, ``steady_ms_per_step`` the ones after the first.
    """

    guide: AutoGuide
    plan: TrainingPlan
    losses: list[float]
    learning_rates: list[float]
    converged: bool
    seconds: float
    steps_run: int = 0
    first_step_s: float = 0.0
    ms_per_step: float = field(init=False)
    steady_ms_per_step: float | None = field(init=False)

    def __post_init__(self) -> None:
        steps = self.steps_run or len(self.losses)
        self.ms_per_step = 1e3 * self.seconds / max(steps, 1)
        self.steady_ms_per_step = 1e3 * (self.seconds - self.first_step_s) / (steps - 1) if steps > 1 else None


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


def _on(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def make_guide(inputs: ModelInputs, kind: str, latent: int, device: torch.device) -> AutoGuide:
    """An AutoNormal (data-driven init, others at their prior median) or AutoIAFNormal guide.
    The initial values are copied: AutoNormal's loc of a real-valued site shares its initial
    tensor's storage, and training would otherwise overwrite ``inputs.init_values``."""
    if kind == "iaf":
        return AutoIAFNormal(inputs.model, hidden_dim=[iaf_hidden_size(latent)])
    values = {name: value.to(device, copy=True) for name, value in inputs.init_values.items()}
    return AutoNormal(inputs.model, init_loc_fn=init_to_value(values=values, fallback=init_to_median))


def _optimizer(lr: float, niters: int) -> pyro.optim.PyroLRScheduler:
    total = max(niters, int(1 / WARMUP_FRACTION) + 1)  # OneCycleLR needs >= 1 warm-up step
    return pyro.optim.PyroLRScheduler(
        OneCycleLR,
        {
            "optimizer": torch.optim.Adam,
            "optim_args": {"lr": lr, "betas": (0.9, 0.999)},
            "max_lr": MAX_LR_FACTOR * lr,
            "total_steps": total,
            "pct_start": WARMUP_FRACTION,
            "div_factor": 25.0,
            "final_div_factor": 1e4,
        },
        clip_args={"clip_norm": CLIP_NORM},
    )


def _current_lr(optimizer: pyro.optim.PyroLRScheduler) -> float:
    """The learning rate the last step used (every parameter follows the same schedule)."""
    return float(next(iter(optimizer.optim_objs.values())).get_last_lr()[0])


class _DoesNotFit(Exception):
    """The first full-data step on a GPU ran out of memory or exceeded the budget; ``fraction``
    is the share of the step that would have fitted (a half after an OOM)."""

    def __init__(self, problem: str, fraction: float) -> None:
        super().__init__(problem)
        self.fraction = fraction


@dataclass(frozen=True)
class SVIOptions:
    """How long and how fast SVI runs, and where it saves and resumes; checked when made.

    ``niters`` steps at most (early stop: see :func:`train`; None: bayesDREAM's default for the
    distribution, :meth:`for_distribution`), Adam at ``lr`` in a OneCycle
    schedule, stopping once the loss's EWMA (weight ``alpha_ewma``) moves by less than
    ``tolerance``; ``seed`` for Pyro's RNGs; ``checkpoint``: a file to save the training state
    to every ``checkpoint_every`` steps (and at the end); ``resume``: a file written that way to
    continue from (it must exist).
    """

    niters: int | None = None
    lr: float = 1e-3
    tolerance: float = 1e-4
    alpha_ewma: float = 0.05
    seed: int | None = None
    progress: bool = True
    checkpoint: str | Path | None = None
    checkpoint_every: int = 100
    resume: str | Path | None = None

    def __post_init__(self) -> None:
        check_int(self.niters, "niters", allow_none=True)
        check_positive(self.lr, "lr")
        check_positive(self.tolerance, "tolerance", allow_zero=True)
        check_fraction(self.alpha_ewma, "alpha_ewma")
        check_seed(self.seed)
        check_int(self.checkpoint_every, "checkpoint_every")
        if self.resume is not None and not Path(self.resume).is_file():
            raise ValueError(f"resume: no such checkpoint file {str(self.resume)!r}")

    def for_distribution(self, distribution: str) -> SVIOptions:
        """These options with ``niters`` set: as given, else bayesDREAM's default for ``distribution``."""
        if self.niters is not None:
            return self
        return replace(self, niters=DEFAULT_NITERS.get(distribution, DEFAULT_NITERS_OTHER))


@dataclass(frozen=True)
class _Stage:
    """One way of training tried in turn (:func:`train`): a plan, whether its first step is
    checked against memory, and whether an out-of-memory error then sends training to the host."""

    plan: TrainingPlan
    check_first_step: bool = False
    host_next: bool = False


def train(
    inputs: ModelInputs,
    plan: TrainingPlan,
    options: SVIOptions,
    *,
    fallback_to_host: bool = False,
    view: MemoryView | None = None,
) -> TrainResult:
    """Run SVI on ``plan.device``, in full-data steps or chunks as planned, as ``options`` say.
    With ``fallback_to_host`` (device="auto"), a first full-data step on a GPU that runs out of
    memory or measures above the budget restarts training on that GPU in chunks (half the
    cells after an OOM, else in proportion to the overshoot), and only when that too runs out
    of memory on the CPU (planned there against ``view``, default a reading taken then): one
    :func:`devicemem.recovery.retries` loop over the three stages. Clears Pyro's global param
    store first, as bayesDREAM does.

    Early stop: after the warm-up, stop when the loss's EWMA has moved by less than
    ``tolerance`` x |EWMA| per step over its own window (W = 1 / alpha_ewma steps).
    bayesDREAM compares one step's move (alpha_ewma x |loss - EWMA|) with ``tolerance`` in
    nats: at real sizes (losses ~1e7) that never fires, and on small data it fires by chance
    on the loss's noise; the windowed, relative move is scale-free and averages the noise out.

    ``checkpoint`` / ``checkpoint_every``: save guide, optimizer and scheduler state, step,
    losses and RNG states atomically every K steps; ``resume``: continue from such a file,
    bit-identically on the same device and layout.
    """
    backend = get_backend(plan.device)
    options = options.for_distribution(plan.distribution)

    def next_stage(stage: _Stage, exc: BaseException) -> _Stage | None:
        if stage.check_first_step and isinstance(exc, _DoesNotFit):
            n_cells = _value_shape(inputs)[0]
            chunk = max(1, min(n_cells - 1, int(n_cells * exc.fraction)))
            reason = f"{exc}; restarting SVI on {plan.device} in chunks of {chunk} cells"
            logger.warning("[MEMORY] %s", reason)
            return _Stage(replace(plan, chunk_cells=chunk, reasons=plan.reasons + (reason,)), host_next=True)
        if stage.host_next and backend.is_oom(exc):
            reason = f"SVI ran out of memory on {plan.device} even in chunks ({type(exc).__name__}); restarting SVI on the CPU"
            logger.warning("[MEMORY] %s", reason)
            return _Stage(_host_plan(inputs, plan, view, reason))
        return None

    def release() -> None:
        pyro.clear_param_store()
        freeing(backend, plan.device)()

    first = _Stage(plan, check_first_step=fallback_to_host and plan.device != HOST and plan.chunk_cells is None)
    for attempt in retries(first, next_stage, is_oom=lambda exc: isinstance(exc, _DoesNotFit) or backend.is_oom(exc),
                           release=release):
        with attempt:
            result = _train_on(inputs, attempt.state.plan, options, check_first_step=attempt.state.check_first_step)
    return result


def _host_plan(inputs: ModelInputs, plan: TrainingPlan, view: MemoryView | None, reason: str) -> TrainingPlan:
    """``plan``'s training planned again on the host, its reasons kept and ``reason`` added."""
    n_cells, n_features, n_categories = _value_shape(inputs)
    host_plan = plan_training(
        n_cells, n_features, int(inputs.kwargs["n_groups"]), n_categories, distribution=plan.distribution,
        device=HOST, safety_factor=plan.safety_factor, view=view, minibatch=plan.minibatch,
    )
    return replace(host_plan, reasons=plan.reasons + host_plan.reasons + (reason,))


def _step_kwargs(inputs: ModelInputs, plan: TrainingPlan, device: torch.device) -> dict[str, Any]:
    """svi.step's arguments on ``device``: everything, or without the cell-wise data when chunked."""
    if plan.chunk_cells is not None:
        return {name: _on(value, device) for name, value in {**inputs.kwargs, **{key: None for key in inputs.cell_keys}}.items()}
    return {name: _on(as_tensor(value) if name in inputs.data_keys else value, device) for name, value in inputs.kwargs.items()}


def _train_on(inputs: ModelInputs, plan: TrainingPlan, options: SVIOptions, check_first_step: bool) -> TrainResult:
    backend = get_backend(plan.device)
    torch_device = backend.torch_device(plan.device)
    baseline = backend.current_bytes(plan.device) or 0
    saved = None if options.resume is None else load_checkpoint(options.resume, plan)
    if saved is not None and saved["chunk_cells"] != plan.chunk_cells:
        logger.info("[MEMORY] resuming in the checkpoint's layout: chunks of %s cells", saved["chunk_cells"])
        plan = replace(plan, chunk_cells=saved["chunk_cells"])
    kwargs = _step_kwargs(inputs, plan, torch_device)
    pyro.clear_param_store()
    if options.seed is not None:
        pyro.set_rng_seed(options.seed)
    guide = make_guide(inputs, plan.guide, plan.latent_size, torch_device)
    elbo = (TraceMeanField_ELBO if plan.guide == "normal" else Trace_ELBO)(max_plate_nesting=inputs.max_plate_nesting)
    optimizer = _optimizer(options.lr, options.niters)
    chunked: ChunkedELBO | None = None
    if plan.chunk_cells is None:
        svi = SVI(inputs.model, guide, optimizer, loss=elbo)
    else:
        storage = torch_device if plan.data_on_device else torch.device(HOST)
        cells = CellData({key: inputs.kwargs[key] for key in inputs.cell_keys}, device=torch_device, storage=storage, compact=plan.device != HOST)
        chunked = ChunkedELBO(
            elbo, cells, plan.chunk_cells, minibatch=plan.minibatch, is_oom=backend.is_oom,
            release=lambda: backend.empty_cache(plan.device),
        )
        logger.info(
            "[MEMORY] SVI data: %s of counts (%s) on %s; %s per chunk of %d cells on %s",
            format_bytes(cells.nbytes), ", ".join(f"{k} {v}" for k, v in cells.dtypes.items()), cells.storage,
            format_bytes(plan.chunk_cells * chunk_cell_bytes(*_value_shape(inputs)[1:], distribution=plan.distribution)), plan.chunk_cells, plan.device,
        )
        svi = SVI(inputs.model, guide, optimizer, loss=chunked.loss, loss_and_grads=chunked.loss_and_grads)
    losses: list[float] = []
    rates: list[float] = []
    window = math.ceil(1 / options.alpha_ewma)
    history: deque[float] = deque(maxlen=window + 1)
    first = 0
    if saved is not None:
        with torch.no_grad():
            guide(**{**kwargs, **{key: None for key in inputs.cell_keys}, "observe": False})
        first = _restore(saved, guide, optimizer, losses, rates, history)
    converged = False
    first_step_s = 0.0
    warmup = math.ceil(WARMUP_FRACTION * options.niters)
    bar = tqdm(total=options.niters, initial=first, desc=f"SVI on {plan.device}", unit="step", disable=not options.progress, leave=False)
    start = time.perf_counter()
    try:
        for step in range(first, options.niters):
            if step == first:
                backend.reset_peak(plan.device)
                with torch_device:  # Pyro builds an AutoIAFNormal's flow in its first call, on the default device
                    loss = _first_step(svi, kwargs, backend, plan, baseline, check_first_step)
                plan = replace(plan, measured_peak_bytes=_peak_over(backend, plan.device, baseline))
                logger.info(
                    "[MEMORY] First SVI step on %s: measured peak %s (predicted %s, budget %s)",
                    plan.device, format_bytes(plan.measured_peak_bytes), format_bytes(plan.predicted_peak_bytes), format_bytes(plan.budget_bytes),
                )
                first_step_s = time.perf_counter() - start
                if chunked is not None:
                    _fit_chunk_to_measured(chunked, plan)
            else:
                with pyro.validation_enabled(False):
                    loss = svi.step(**kwargs)
            rates.append(_current_lr(optimizer))
            optimizer.step()
            if not math.isfinite(loss):
                raise RuntimeError(
                    f"fit_technical: the loss became {loss} at SVI step {step}; try a lower lr (e.g. lr=1e-4) "
                    "or check the sum factors for extreme values"
                )
            losses.append(loss)
            bar.update()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss:.4g}")
            history.append(loss if not history else options.alpha_ewma * loss + (1 - options.alpha_ewma) * history[-1])
            settled = len(history) > window and abs(history[-1] - history[0]) < window * options.tolerance * abs(history[-1])
            if step >= warmup and settled:
                converged = True
            if options.checkpoint is not None and (converged or (step + 1) % options.checkpoint_every == 0 or step + 1 == options.niters):
                save_checkpoint(options.checkpoint, plan, step + 1, guide, optimizer, losses, rates, history, chunked)
            if converged:
                break
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    if chunked is not None and chunked.chunk_cells != plan.chunk_cells:
        plan = replace(plan, chunk_cells=chunked.chunk_cells, reasons=plan.reasons + tuple(chunked.shrinks))
    steps = max(len(losses) - first, 1)
    logger.info("SVI on %s: %d steps in %.1f s (%.1f ms/step)%s", plan.device, steps, seconds, 1e3 * seconds / steps, ", converged" if converged else "")
    return TrainResult(guide, plan, losses, rates, converged, seconds, steps, first_step_s)


def _value_shape(inputs: ModelInputs) -> tuple[int, int, int]:
    """(cells, features, categories) of the counts."""
    counts = inputs.kwargs[inputs.data_keys[0]]
    return int(counts.shape[0]), int(counts.shape[1]), int(counts.shape[2]) if len(counts.shape) == 3 else 1


def _fit_chunk_to_measured(chunked: ChunkedELBO, plan: TrainingPlan) -> None:
    """Shrink the chunk when the first chunked step measured above the budget, in proportion."""
    measured, budget = plan.measured_peak_bytes, plan.budget_bytes
    if measured is None or budget is None or measured <= budget or chunked.chunk_cells == 1:
        return
    smaller = max(1, int(chunked.chunk_cells * budget / measured * 0.9))
    reason = (f"the first chunked step peaked at {format_bytes(measured)}, over the budget {format_bytes(budget)}; "
              f"chunks of {smaller} cells from now on (were {chunked.chunk_cells})")
    logger.warning("[MEMORY] %s", reason)
    chunked.shrinks.append(reason)
    chunked.chunk_cells = smaller


def _peak_over(backend: Backend, device: str, baseline: int) -> int | None:
    """What training added to the device's high-water mark (None when it cannot be measured)."""
    peak = backend.peak_bytes(device)
    return None if peak is None else max(peak - baseline, 0)


def _first_step(svi: SVI, kwargs: dict[str, Any], backend: Backend, plan: TrainingPlan, baseline: int, check: bool) -> float:
    """One validated SVI step; with ``check``, an OOM or a peak over budget raises _DoesNotFit."""
    try:
        loss = svi.step(**kwargs)
    except Exception as exc:
        if not (check and backend.is_oom(exc)):
            raise
        problem, fraction = f"the first SVI step ran out of memory on {plan.device} ({type(exc).__name__})", 0.5
    else:
        peak = _peak_over(backend, plan.device, baseline)
        if not (check and plan.budget_bytes is not None and peak is not None and peak > plan.budget_bytes):
            return loss
        problem = f"the first SVI step on {plan.device} peaked at {format_bytes(peak)}, over the budget {format_bytes(plan.budget_bytes)}"
        fraction = 0.9 * plan.budget_bytes / peak
    raise _DoesNotFit(problem, fraction)


# --- checkpoints ---------------------------------------------------------------------------

def _rng_state() -> dict[str, Any]:
    """Every generator SVI draws from, in types ``torch.load(weights_only=True)`` reads back."""
    state = pyro.util.get_rng_state()
    kind, keys, pos, has_gauss, cached = state["numpy"]
    saved = {"torch": state["torch"], "random": state["random"], "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached)}
    if torch.cuda.is_available():
        saved["cuda"] = torch.cuda.get_rng_state_all()
    return saved


def _set_rng_state(saved: dict[str, Any]) -> None:
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    pyro.util.set_rng_state({"torch": saved["torch"], "random": saved["random"], "numpy": (kind, keys.numpy(), pos, has_gauss, cached)})
    if "cuda" in saved:
        torch.cuda.set_rng_state_all(saved["cuda"])


def save_checkpoint(
    path: str | Path, plan: TrainingPlan, step: int, guide: AutoGuide, optimizer: pyro.optim.PyroOptim,
    losses: list[float], rates: list[float], history: deque[float], chunked: ChunkedELBO | None,
) -> None:
    """Write the training state after ``step`` steps to ``path`` atomically (a temporary file
    beside it, then ``os.replace``): a run killed at any moment leaves the previous checkpoint."""
    state = {
        "format": CHECKPOINT_FORMAT, "step": step, "guide_kind": plan.guide, "latent_size": plan.latent_size,
        "n_cells": plan.n_cells, "device": plan.device,
        "chunk_cells": None if chunked is None else chunked.chunk_cells,
        "guide": {name: value.detach().cpu() for name, value in guide.state_dict().items()},
        "optimizer": optimizer.get_state(), "losses": list(losses), "rates": list(rates), "history": list(history),
        "rng": _rng_state(),
    }
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)
    logger.info("[MEMORY] checkpoint after step %d written to %s", step, path)


def load_checkpoint(path: str | Path, plan: TrainingPlan) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint` for this model and guide; ValueError
    naming ``resume`` otherwise."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as exc:
        raise ValueError(f"resume: cannot read a checkpoint from {str(path)!r} ({exc})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"resume: {str(path)!r} is not an SVI checkpoint")
    ours = (plan.guide, plan.latent_size, plan.n_cells)
    theirs = (state["guide_kind"], state["latent_size"], state["n_cells"])
    if ours != theirs:
        raise ValueError(f"resume: {str(path)!r} was written for guide, latent size, cells {theirs}; this fit has {ours}")
    return state


def _restore(state: dict[str, Any], guide: AutoGuide, optimizer: pyro.optim.PyroOptim, losses: list[float], rates: list[float], history: deque[float]) -> int:
    """Load a checkpoint into a freshly built guide and optimizer; returns the next step."""
    device = next(iter(guide.parameters())).device
    guide.load_state_dict({name: value.to(device) for name, value in state["guide"].items()})
    optimizer.set_state(state["optimizer"])  # Optimizer.load_state_dict moves it to the parameters' device
    losses.extend(state["losses"])
    rates.extend(state["rates"])
    history.extend(state["history"])
    _set_rng_state(state["rng"])
    logger.info("resuming SVI at step %d", state["step"])
    return int(state["step"])


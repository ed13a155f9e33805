"""Device-aware SVI for the technical model: which device and guide, then the training loop.

:func:`training_footprint` predicts the peak memory of training (data + guide parameters,
gradients and Adam state + the first step's activations, the largest step: it also builds the
guide's prototype trace); :func:`plan_training` turns that into a :class:`TrainingPlan`
(device, guide, reasons); :func:`train` runs SVI exactly as bayesDREAM configures it (Adam in a
OneCycleLR schedule with max_lr = 10 x lr and 10% warm-up, stepped every iteration; gradient
clipping at norm 10; TraceMeanField_ELBO for AutoNormal; early stop on the EWMA of the loss),
checks the first step's measured peak against the budget, and on ``device="auto"`` moves to
the CPU when a GPU step does not fit after all.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoGuide, AutoIAFNormal, AutoNormal
from pyro.infer.autoguide.initialization import init_to_median, init_to_value
from torch.optim.lr_scheduler import OneCycleLR
from tqdm.auto import tqdm

from bayesDREAM_ext.model import ModelInputs
from devicemem.backends import Backend, DeviceMemory, device_memory, devices, get_backend
from devicemem.footprint import technical_latent_size
from devicemem.units import format_bytes

logger = logging.getLogger("devicemem.bayesdream")

GUIDES = ("normal", "iaf", "auto")
HOST = "cpu"
WARMUP_FRACTION = 0.1
MAX_LR_FACTOR = 10.0
CLIP_NORM = 10.0
FLOAT_BYTES = 4
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
    """Where and with which guide SVI runs, and why.

    ``predicted_peak_bytes`` is :func:`training_footprint` for that guide; ``budget_bytes`` is
    ``safety_factor`` x the device's usable memory (None when unknown);
    ``measured_peak_bytes`` the first step's high-water mark as the device's backend measures
    it (host: peak RSS of the process; CUDA: peak allocated), filled in by :func:`train`.
    """

    device: str
    guide: str
    latent_size: int
    predicted_peak_bytes: int
    budget_bytes: int | None
    safety_factor: float
    reasons: tuple[str, ...]
    measured_peak_bytes: int | None = None


@dataclass
class TrainResult:
    """A trained guide (on ``plan.device``), the loss and learning rate of every step."""

    guide: AutoGuide
    plan: TrainingPlan
    losses: list[float]
    learning_rates: list[float]
    converged: bool
    seconds: float
    ms_per_step: float = field(init=False)

    def __post_init__(self) -> None:
        self.ms_per_step = 1e3 * self.seconds / max(len(self.losses), 1)


def iaf_hidden_size(latent: int) -> int:
    """Pyro's default AutoIAFNormal hidden size."""
    return 3 * latent + 1


def guide_bytes(guide: str, latent: int) -> int:
    """Guide parameters with their gradients and Adam state, in bytes (float32)."""
    if guide == "iaf":
        hidden = iaf_hidden_size(latent)
        weights = latent * hidden + hidden * 2 * latent + hidden + 2 * latent
        return IAF_COPIES * weights * FLOAT_BYTES
    return NORMAL_GUIDE_FLOATS_PER_LATENT * latent * FLOAT_BYTES


def training_footprint(
    n_cells: int, n_features: int, n_groups: int, n_categories: int = 1, *, distribution: str = "negbinom", guide: str = "normal"
) -> int:
    """Predicted peak bytes of SVI on one device: data, guide state and one step's activations."""
    values = n_cells * n_features * n_categories
    data = values * FLOAT_BYTES * (2 if distribution == "binomial" else 1) + n_cells * 12
    latent = technical_latent_size(n_features, n_groups, n_categories, distribution)
    return data + guide_bytes(guide, latent) + STEP_FIXED_BYTES + STEP_BYTES_PER_VALUE[distribution] * values


def _budget(memory: DeviceMemory, safety_factor: float) -> int | None:
    return None if memory.usable_bytes is None else int(safety_factor * memory.usable_bytes)


def _fits(need: int, budget: int | None) -> bool:
    return budget is None or need <= budget


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
    memory_of: Callable[[str], DeviceMemory] | None = None,
    accelerators: Callable[[], list[DeviceMemory]] | None = None,
) -> TrainingPlan:
    """Choose the device and guide for SVI.

    ``device="auto"``: the GPU with the most usable memory when the AutoNormal footprint fits
    ``safety_factor`` x its usable memory, else the CPU. An explicit device is used as given
    (ValueError when this process does not see it). ``guide="iaf"`` needs the AutoIAFNormal
    footprint (hidden size 3 x latent + 1) to fit the chosen device (ValueError otherwise);
    ``"auto"`` takes it when it fits, else AutoNormal. ``memory_of`` / ``accelerators`` replace
    the device registry (tests).
    """
    memory_of = memory_of or (lambda name: device_memory(name, max_memory=max_memory))
    accelerators = accelerators or (lambda: [m for m in devices(max_memory=max_memory) if m.device != HOST])
    shape = dict(n_cells=n_cells, n_features=n_features, n_groups=n_groups, n_categories=n_categories, distribution=distribution)
    latent = technical_latent_size(n_features, n_groups, n_categories, distribution)
    need = training_footprint(**shape, guide="normal")
    reasons: list[str] = []
    if device == "auto":
        gpu = max(accelerators(), key=lambda m: m.usable_bytes or 0, default=None)
        budget = None if gpu is None else _budget(gpu, safety_factor)
        if gpu is None:
            reasons.append("no GPU visible; SVI on the CPU")
        elif _fits(need, budget):
            reasons.append(f"SVI on {gpu.device}: data + guide + optimizer + one step need {format_bytes(need)}, budget {format_bytes(budget)}")
        else:
            reasons.append(f"SVI does not fit {gpu.device}: needs {format_bytes(need)}, budget {format_bytes(budget)}; using the CPU")
            gpu = None
        memory = gpu or memory_of(HOST)
    else:
        memory = memory_of(device)
        reasons.append(f"SVI on {memory.device} as requested")
    budget = _budget(memory, safety_factor)
    kind = "normal"
    if guide in ("iaf", "auto"):
        iaf_need = training_footprint(**shape, guide="iaf")
        verdict = f"AutoIAFNormal (hidden size {iaf_hidden_size(latent)}) needs {format_bytes(iaf_need)}, budget {format_bytes(budget)} on {memory.device}"
        if _fits(iaf_need, budget) and budget is not None:
            kind, need = "iaf", iaf_need
            reasons.append(f"{verdict}: using it")
        elif guide == "iaf":
            raise ValueError(f"guide: {verdict}; it does not fit. Use guide='normal' or 'auto'")
        else:
            reasons.append(f"{verdict}: using AutoNormal")
    if not _fits(need, budget):
        reasons.append(f"predicted peak {format_bytes(need)} exceeds the budget {format_bytes(budget)} on {memory.device}; training may run out of memory")
    for reason in reasons:
        logger.info("[MEMORY] %s", reason)
    return TrainingPlan(memory.device, kind, latent, need, budget, safety_factor, tuple(reasons))


def _on(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


def make_guide(inputs: ModelInputs, kind: str, latent: int, device: torch.device) -> AutoGuide:
    """An AutoNormal (data-driven init, others at their prior median) or AutoIAFNormal guide."""
    if kind == "iaf":
        return AutoIAFNormal(inputs.model, hidden_dim=[iaf_hidden_size(latent)])
    values = {name: value.to(device) for name, value in inputs.init_values.items()}
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
    """The first step on a GPU ran out of memory or exceeded the budget (auto may retry on CPU)."""


def train(
    inputs: ModelInputs,
    plan: TrainingPlan,
    *,
    niters: int,
    lr: float,
    tolerance: float,
    alpha_ewma: float,
    seed: int | None = None,
    progress: bool = True,
    fallback_to_host: bool = False,
    max_memory: Any = None,
) -> TrainResult:
    """Run SVI on ``plan.device``. With ``fallback_to_host`` (device="auto"), a first step on a
    GPU that runs out of memory or measures above the budget restarts training on the CPU
    (budgeted with ``max_memory`` like the plan). Clears Pyro's global param store first, as
    bayesDREAM does.

    Early stop: after the warm-up, stop when the loss's EWMA has moved by less than
    ``tolerance`` x |EWMA| per step over its own window (W = 1 / alpha_ewma steps).
    bayesDREAM compares one step's move (alpha_ewma x |loss - EWMA|) with ``tolerance`` in
    nats: at real sizes (losses ~1e7) that never fires, and on small data it fires by chance
    on the loss's noise; the windowed, relative move is scale-free and averages the noise out.
    """
    try:
        return _train_on(inputs, plan, niters, lr, tolerance, alpha_ewma, seed, progress, check_first_step=fallback_to_host and plan.device != HOST)
    except _DoesNotFit as exc:
        reason = f"{exc}; restarting SVI on the CPU"
        logger.warning("[MEMORY] %s", reason)
    pyro.clear_param_store()
    get_backend(plan.device).empty_cache(plan.device)
    host = device_memory(HOST, max_memory=max_memory)
    host_plan = replace(plan, device=HOST, budget_bytes=_budget(host, plan.safety_factor), reasons=plan.reasons + (reason,))
    return _train_on(inputs, host_plan, niters, lr, tolerance, alpha_ewma, seed, progress, check_first_step=False)


def _train_on(
    inputs: ModelInputs,
    plan: TrainingPlan,
    niters: int,
    lr: float,
    tolerance: float,
    alpha_ewma: float,
    seed: int | None,
    progress: bool,
    check_first_step: bool,
) -> TrainResult:
    backend = get_backend(plan.device)
    torch_device = backend.torch_device(plan.device)
    baseline = backend.current_bytes(plan.device) or 0
    kwargs = {name: _on(value, torch_device) for name, value in inputs.kwargs.items()}
    pyro.clear_param_store()
    if seed is not None:
        pyro.set_rng_seed(seed)
    guide = make_guide(inputs, plan.guide, plan.latent_size, torch_device)
    elbo_cls = TraceMeanField_ELBO if plan.guide == "normal" else Trace_ELBO
    optimizer = _optimizer(lr, niters)
    svi = SVI(inputs.model, guide, optimizer, loss=elbo_cls(max_plate_nesting=inputs.max_plate_nesting))
    losses: list[float] = []
    rates: list[float] = []
    window = math.ceil(1 / alpha_ewma)
    history: deque[float] = deque(maxlen=window + 1)
    converged = False
    warmup = math.ceil(WARMUP_FRACTION * niters)
    bar = tqdm(total=niters, desc=f"SVI on {plan.device}", unit="step", disable=not progress, leave=False)
    start = time.perf_counter()
    try:
        for step in range(niters):
            if step == 0:
                backend.reset_peak(plan.device)
                with torch_device:  # Pyro builds an AutoIAFNormal's flow in its first call, on the default device
                    loss = _first_step(svi, kwargs, backend, plan, baseline, check_first_step)
                plan = replace(plan, measured_peak_bytes=_peak_over(backend, plan.device, baseline))
                logger.info(
                    "[MEMORY] First SVI step on %s: measured peak %s (predicted %s, budget %s)",
                    plan.device, format_bytes(plan.measured_peak_bytes), format_bytes(plan.predicted_peak_bytes), format_bytes(plan.budget_bytes),
                )
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
            history.append(loss if not history else alpha_ewma * loss + (1 - alpha_ewma) * history[-1])
            settled = len(history) > window and abs(history[-1] - history[0]) < window * tolerance * abs(history[-1])
            if step >= warmup and settled:
                converged = True
                break
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    logger.info("SVI on %s: %d steps in %.1f s (%.1f ms/step)%s", plan.device, len(losses), seconds, 1e3 * seconds / len(losses), ", converged" if converged else "")
    return TrainResult(guide, plan, losses, rates, converged, seconds)


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
        problem = f"the first SVI step ran out of memory on {plan.device} ({type(exc).__name__})"
    else:
        peak = _peak_over(backend, plan.device, baseline)
        if not (check and plan.budget_bytes is not None and peak is not None and peak > plan.budget_bytes):
            return loss
        problem = f"the first SVI step on {plan.device} peaked at {format_bytes(peak)}, over the budget {format_bytes(plan.budget_bytes)}"
    raise _DoesNotFit(problem)

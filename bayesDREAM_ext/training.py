"""Device-aware SVI for the technical model: the training loop, on the plan
:func:`bayesDREAM_ext.memory.plan_training` made (device, guide, full-data steps or chunks).

:func:`train` runs SVI as bayesDREAM configures it (Adam in a OneCycleLR schedule with
max_lr = 10 x lr and 10% warm-up; gradient clipping at norm 10 per parameter;
TraceMeanField_ELBO for AutoNormal; early stop on the EWMA of the loss) in one of
:data:`SCHEDULES`: the schedule stepped every iteration ("onecycle"), or never stepped, as
bayesDREAM's own loop leaves it ("bayesdream"); it checks the first
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
from typing import Any

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoGuide, AutoIAFNormal, AutoNormal
from pyro.infer.autoguide.initialization import init_to_median, init_to_value
from torch.optim.lr_scheduler import OneCycleLR
from tqdm.auto import tqdm

from bayesDREAM_ext.chunked import CellData, ChunkedELBO
from bayesDREAM_ext.memory import TrainingPlan, chunk_cell_bytes, iaf_hidden_size, plan_training
from bayesDREAM_ext.model import ModelInputs
from devicemem.backends import HOST, Backend, MemoryView, get_backend
from devicemem.checks import check_choice, check_fraction, check_int, check_positive, check_seed
from devicemem.recovery import freeing, retries
from devicemem.units import format_bytes

logger = logging.getLogger("devicemem.bayesdream")

WARMUP_FRACTION = 0.1
MAX_LR_FACTOR = 10.0
CLIP_NORM = 10.0
CHECKPOINT_FORMAT = "bayesDREAM_ext.SVICheckpoint/1"
# How the learning rate moves. Both build bayesDREAM's optimizer (Adam in torch's OneCycleLR,
# clipped per parameter at CLIP_NORM): "onecycle" steps the schedule every iteration (warm-up
# to MAX_LR_FACTOR x lr over the first WARMUP_FRACTION of niters, then cosine annealing to
# lr / 2500); "bayesdream" never steps it, as bayesDREAM's loop does (it calls only svi.step),
# so every step runs at the schedule's initial rate, max_lr / 25 = 0.4 x lr, and momentum
# (beta1 0.95), and stops by bayesDREAM's own rule (:func:`_bayesdream_stop`).
SCHEDULES = ("onecycle", "bayesdream")
DEFAULT_SCHEDULE = "onecycle"
# bayesDREAM's default number of SVI steps, by distribution.
DEFAULT_NITERS = {"multinomial": 100_000}
DEFAULT_NITERS_OTHER = 50_000


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
    schedule: str = DEFAULT_SCHEDULE
    ms_per_step: float = field(init=False)
    steady_ms_per_step: float | None = field(init=False)

    def __post_init__(self) -> None:
        steps = self.steps_run or len(self.losses)
        self.ms_per_step = 1e3 * self.seconds / max(steps, 1)
        self.steady_ms_per_step = 1e3 * (self.seconds - self.first_step_s) / (steps - 1) if steps > 1 else None


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
    distribution, :meth:`for_distribution`), Adam at ``lr`` in bayesDREAM's OneCycle
    schedule, stepped or not as ``schedule`` says (:data:`SCHEDULES`), stopping once the
    loss's EWMA (weight ``alpha_ewma``) moves by less than ``tolerance`` (relative, per step
    over a window; in bayesDREAM's absolute sense with ``schedule="bayesdream"``);
    ``seed`` for Pyro's RNGs; ``checkpoint``: a file to save the training state
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
    schedule: str = DEFAULT_SCHEDULE

    def __post_init__(self) -> None:
        check_int(self.niters, "niters", allow_none=True)
        check_choice(self.schedule, SCHEDULES, "schedule")
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

    Early stop ("onecycle"): after the warm-up, stop when the loss's EWMA has moved by less than
    ``tolerance`` x |EWMA| per step over its own window (W = 1 / alpha_ewma steps).
    bayesDREAM compares one step's move (alpha_ewma x |loss - EWMA|) with ``tolerance`` in
    nats: at real sizes (losses ~1e7) that never fires, and on small data it fires by chance
    on the loss's noise; the windowed, relative move is scale-free and averages the noise out.
    ``schedule="bayesdream"`` keeps bayesDREAM's rule, as its loop runs it.

    ``checkpoint`` / ``checkpoint_every``: save guide, optimizer and scheduler state, step,
    losses and RNG states atomically every K steps; ``resume``: continue from such a file,
    bit-identically on the same device and layout.
    """
    backend = get_backend(plan.device)
    options = options.for_distribution(plan.distribution)

    def next_stage(stage: _Stage, exc: BaseException) -> _Stage | None:
        if stage.check_first_step and isinstance(exc, _DoesNotFit):
            n_cells = inputs.value_shape[0]
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
    n_cells, n_features, n_categories = inputs.value_shape
    host_plan = plan_training(
        n_cells, n_features, int(inputs.arguments["n_groups"]), n_categories, distribution=plan.distribution,
        device=HOST, safety_factor=plan.safety_factor, view=view, minibatch=plan.minibatch,
    )
    return replace(host_plan, reasons=plan.reasons + host_plan.reasons + (reason,))


def _step_kwargs(inputs: ModelInputs, plan: TrainingPlan, device: torch.device) -> dict[str, Any]:
    """svi.step's arguments on ``device``: everything, or without the cell-wise data when chunked."""
    if plan.chunk_cells is not None:
        return {name: _on(value, device) for name, value in {**inputs.arguments, **{key: None for key in inputs.cell_keys}}.items()}
    return {name: _on(value, device) for name, value in inputs.kwargs.items()}


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
    optimizer = _optimizer(options.lr, options.niters)
    svi, chunked = _svi(inputs, plan, guide, optimizer, backend, torch_device)
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
            if options.schedule == "onecycle":
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
            if options.schedule == "bayesdream":
                converged = _bayesdream_stop(history, loss, options)
            history.append(loss if not history else options.alpha_ewma * loss + (1 - options.alpha_ewma) * history[-1])
            settled = len(history) > window and abs(history[-1] - history[0]) < window * options.tolerance * abs(history[-1])
            if options.schedule == "onecycle" and step >= warmup and settled:
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
    return TrainResult(guide, plan, losses, rates, converged, seconds, steps, first_step_s, options.schedule)


def _bayesdream_stop(history: deque[float], loss: float, options: SVIOptions) -> bool:
    """bayesDREAM's stop rule, checked before the EWMA takes ``loss`` in: from the second step
    on, stop when alpha_ewma x |loss - EWMA| < tolerance (nats, not relative)."""
    return bool(history) and abs(options.alpha_ewma * (loss - history[-1])) < options.tolerance


def _svi(
    inputs: ModelInputs, plan: TrainingPlan, guide: AutoGuide, optimizer: pyro.optim.PyroOptim, backend: Backend,
    torch_device: torch.device,
) -> tuple[SVI, ChunkedELBO | None]:
    """SVI over full-data steps, or over chunks of cells (then also the :class:`ChunkedELBO`,
    whose chunk may shrink), with bayesDREAM's ELBO for the guide."""
    elbo = (TraceMeanField_ELBO if plan.guide == "normal" else Trace_ELBO)(max_plate_nesting=inputs.max_plate_nesting)
    if plan.chunk_cells is None:
        return SVI(inputs.model, guide, optimizer, loss=elbo), None
    storage = torch_device if plan.data_on_device else torch.device(HOST)
    cells = CellData(inputs.cells(), device=torch_device, storage=storage, compact=plan.device != HOST)
    chunked = ChunkedELBO(
        elbo, cells, plan.chunk_cells, minibatch=plan.minibatch, is_oom=backend.is_oom,
        release=lambda: backend.empty_cache(plan.device),
    )
    logger.info(
        "[MEMORY] SVI data: %s of counts (%s) on %s; %s per chunk of %d cells on %s",
        format_bytes(cells.nbytes), ", ".join(f"{k} {v}" for k, v in cells.dtypes.items()), cells.storage,
        format_bytes(plan.chunk_cells * chunk_cell_bytes(*inputs.value_shape[1:], distribution=plan.distribution)),
        plan.chunk_cells, plan.device,
    )
    return SVI(inputs.model, guide, optimizer, loss=chunked.loss, loss_and_grads=chunked.loss_and_grads), chunked


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


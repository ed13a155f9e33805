"""``fit_technical``: bayesDREAM's technical fit, device-aware from training to Predictive.

Check every option once (ValueError before any work) -> prepare the data (a bayesDREAM
object's NTC cells, :mod:`bayesDREAM_ext.fit_object`) -> read memory once and plan training and
Predictive against that reading -> build the model's priors and initial values -> run SVI
(:mod:`bayesDREAM_ext.training`) -> draw parameter samples with ``devicemem.Predictive`` ->
bayesDREAM's shapes (:mod:`bayesDREAM_ext.posterior`) -> a :class:`~bayesDREAM_ext.records.TechnicalFit`
(written back into the object when one was given).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import AutoGuide
from pyro.poutine.util import prune_subsample_sites

from bayesDREAM_ext.data import TechnicalData, check_distribution, prepare_technical
from bayesDREAM_ext.fit_object import is_bayesdream_object, read_inputs, write_back
from bayesDREAM_ext.memory import GUIDE_CHOICES, TrainingPlan, plan_technical, plan_training
from bayesDREAM_ext.model import ModelInputs, Priors, build_model_inputs
from bayesDREAM_ext.posterior import assemble
from bayesDREAM_ext.records import GuideState, TechnicalFit
from bayesDREAM_ext.training import DEFAULT_SCHEDULE, SVIOptions, TrainResult, make_guide, train
from devicemem import logs
from devicemem.backends import Caps, MemoryView, SystemProbe, split_device
from devicemem.backends.names import device_name, is_host
from devicemem.checks import check_choice, check_int
from devicemem.planner import Plan, resolve_safety_factor
from devicemem.predictive import Predictive

logger = logging.getLogger("devicemem.bayesdream")


class PredictiveFailedError(RuntimeError):
    """Predictive failed after training; ``guide_state`` holds the trained guide so that
    ``fit_technical(..., guide_state=err.guide_state)`` resumes without retraining, and
    ``recovery_path`` names the file it was also saved to (:meth:`GuideState.load`), None
    when that failed."""

    def __init__(self, message: str, guide_state: GuideState, recovery_path: str | None = None) -> None:
        super().__init__(message)
        self.guide_state = guide_state
        self.recovery_path = recovery_path


class PredictiveInterrupted(KeyboardInterrupt):
    """Ctrl-C during Predictive after training: still a KeyboardInterrupt, carrying the trained
    guide like :class:`PredictiveFailedError` (``guide_state``, ``recovery_path``)."""

    def __init__(self, message: str, guide_state: GuideState, recovery_path: str | None = None) -> None:
        super().__init__(message)
        self.guide_state = guide_state
        self.recovery_path = recovery_path


def _kept_guide(state: GuideState, exc: BaseException) -> PredictiveFailedError | PredictiveInterrupted:
    """The error to raise when Predictive fails after training: it carries the trained guide,
    also saved to a recovery file named in its message, so that it survives the process."""
    try:
        handle, path = tempfile.mkstemp(prefix="bayesdream-ext-guide-", suffix=".pt")
        os.close(handle)
        state.save(path)
        kept = (
            f"saved to {path}: resume with fit_technical(..., guide_state=GuideState.load({path!r})) "
            f"or bayesdream-ext fit-technical --guide-state {path}, or in this process with err.guide_state"
        )
    except OSError as error:
        path, kept = None, f"not saved ({error}); in this process, resume with err.guide_state"
    what = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"failed ({type(exc).__name__}: {exc})"
    message = f"Predictive {what} after training; the trained guide is kept, {kept}"
    error_type = PredictiveInterrupted if isinstance(exc, KeyboardInterrupt) else PredictiveFailedError
    return error_type(message, state, path)


@dataclass(frozen=True)
class _FitOptions:
    """:func:`fit_technical`'s options, checked once when it is called, grouped by who takes
    them: training (``svi``, its ``niters`` None for bayesDREAM's default), the model's
    ``priors``, the plans and Predictive (``device``...``probe``)."""

    svi: SVIOptions
    priors: Priors
    nsamples: int
    guide: str
    device: str
    minibatch_size: int | None
    safety_factor: float | None
    caps: Caps
    probe: SystemProbe | MemoryView | None
    svi_chunk: int | None
    svi_minibatch: int | None
    guide_state: GuideState | None
    threads: int | None = None

    def __post_init__(self) -> None:
        check_int(self.nsamples, "nsamples")
        check_int(self.minibatch_size, "minibatch_size", allow_none=True)
        resolve_safety_factor(self.safety_factor)
        check_choice(self.guide, GUIDE_CHOICES, "guide")
        if self.device != "auto":
            split_device(self.device, "device")  # whether this process sees it is asked of the call's memory reading
        if self.probe is not None and not isinstance(self.probe, (SystemProbe, MemoryView)):
            raise ValueError(f"probe: expected None, a devicemem.backends.SystemProbe or a MemoryView; got {self.probe!r:.60}")
        check_int(self.svi_chunk, "svi_chunk", allow_none=True)
        check_int(self.svi_minibatch, "svi_minibatch", allow_none=True)
        check_int(self.threads, "threads", allow_none=True)

    def view(self) -> MemoryView:
        """The call's one memory reading (``probe`` when it is one already); ValueError when the
        device asked for is not in it."""
        view = self.probe if isinstance(self.probe, MemoryView) else MemoryView.read(self.caps, self.probe)
        if self.device != "auto":
            view.find(self.device)
        return view


def fit_technical(
    counts: Any,
    groups: Any = None,
    sum_factors: Any = None,
    *,
    distribution: str | None = None,
    denominator: Any = None,
    cells_axis: int | None = None,
    meta: Any = None,
    layer: str | None = None,
    ntc: Any = None,
    ntc_col: str | None = None,
    ntc_value: Any = None,
    device: str = "auto",
    nsamples: int = 1000,
    niters: int | None = None,
    lr: float = 1e-3,
    tolerance: float = 1e-4,
    alpha_ewma: float = 0.05,
    schedule: str = DEFAULT_SCHEDULE,
    beta_o_alpha: float = 9.0,
    beta_o_beta: float = 3.0,
    epsilon: float = 1e-6,
    minibatch_size: int | None = None,
    safety_factor: float | None = None,
    max_memory: Any = None,
    seed: int | None = None,
    progress: bool = True,
    guide: str = "normal",
    guide_state: GuideState | None = None,
    svi_chunk: int | None = None,
    svi_minibatch: int | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 100,
    resume: str | Path | None = None,
    sum_factor_col: str | None = "sum_factor",
    modality: str | None = None,
    probe: SystemProbe | MemoryView | None = None,
    threads: int | None = None,
    verbose: bool = False,
) -> TechnicalFit:
    """Fit bayesDREAM's technical model on NTC cells and draw ``nsamples`` posterior samples.

    ``counts``: a counts file or 10x folder (``bayesDREAM_ext.readers.read_counts``: 10x
    folder or .h5, .h5ad, .mtx[.gz], .npz, .csv/.tsv), a ``CountsFile``, AnnData, a DataFrame,
    a numpy array, a scipy.sparse matrix or a tensor, [cells, features] or [features, cells]
    (multinomial [N, T, K]): the orientation is the format's, else found from the metadata or
    the groups' length; ``cells_axis`` (0: cells x features, 1: features x cells) overrides it.
    ``meta``: the cell metadata (a DataFrame or .csv/.tsv file, first column the cell names;
    AnnData brings its ``obs``), aligned to the cells by name. ``layer``: an AnnData layer or
    "raw". ``groups`` one label or code per cell, or the name of a metadata column, the first
    level (sorted, or a Categorical's order) being the baseline. ``sum_factors`` likewise (a
    column name, or values), default library size / mean (negbinom).
    NTC cells: ``ntc_col`` with ``ntc_value`` (one value or a list) keeps the cells whose
    metadata column holds one of them; ``ntc`` (a boolean mask or cell indices) the same by
    hand; without either every cell is taken as an NTC cell (logged). ``groups`` and
    ``sum_factors`` given as values then have one entry per cell before the selection.
    ``distribution`` defaults to "negbinom".
    ``device="auto"`` trains on the GPU when data, guide, optimizer state and one step fit its
    budget, else on the CPU; Predictive then goes wherever devicemem's planner puts it.
    ``niters`` defaults to bayesDREAM's 50,000 (100,000 for multinomial); training stops
    earlier once the loss's EWMA settles (moves by less than ``tolerance`` x |EWMA| per step
    over 1 / ``alpha_ewma`` steps). ``schedule``: "onecycle" steps bayesDREAM's OneCycleLR every
    iteration; "bayesdream" does what bayesDREAM's own loop does (the schedule never stepped:
    Adam at 0.4 x ``lr`` throughout, bayesDREAM's absolute stop rule on ``tolerance``), to
    match its posteriors (:data:`~bayesDREAM_ext.training.SCHEDULES`). ``guide``: "normal"
    (AutoNormal), "iaf" (AutoIAFNormal, ValueError if it cannot fit) or "auto". If Predictive
    fails, :class:`PredictiveFailedError` (:class:`PredictiveInterrupted` on Ctrl-C) carries
    the trained guide and names the recovery file it was saved to: pass its ``guide_state``
    (or :meth:`GuideState.load` of the file) to resume without retraining. Like bayesDREAM,
    it clears Pyro's global param store.

    Memory: when a full-data SVI step does not fit the device, training takes the exact
    gradient over chunks of cells (same trajectory, less memory; the counts stay on the host
    when they do not fit a GPU); ``svi_chunk`` forces the cells per chunk. ``svi_minibatch``:
    stochastic steps on that many random cells (likelihood scaled by N / B; off by default).
    ``checkpoint=PATH``: save the training state every ``checkpoint_every`` steps;
    ``resume=PATH`` continues from it bit-identically on the same device. ``probe``: where device
    memory is read, once per call, after the data are prepared (every plan, the fall-back to the
    host and Predictive are judged against that one reading): a ``devicemem.backends.SystemProbe``
    (tests inject fakes) or a ``MemoryView`` already read. ``threads``: Predictive's
    block-parallel draws on the host (default ``DEVICEMEM_THREADS``, else the usable cores).
    ``verbose=True`` shows the log lines of this call on stderr (the ``[MEMORY]`` plans, the
    NTC cells, training's end; ``devicemem.log_to_stderr()`` shows them for every call).

    Given a bayesDREAM object instead of counts (``fit_technical(model_obj,
    sum_factor_col="sum_factor", modality=None, ...)``), it fits that modality's NTC cells
    (its ``distribution`` unless one is given) and writes the results where bayesDREAM's own
    ``fit_technical`` does (:mod:`bayesDREAM_ext.fit_object`), so that the object's
    ``fit_cis`` / ``fit_trans`` run next; the TechnicalFit (all features) is returned too.
    """
    if distribution is not None:
        check_distribution(distribution)
    options = _FitOptions(
        SVIOptions(niters, lr, tolerance, alpha_ewma, seed, progress, checkpoint, checkpoint_every, resume, schedule),
        Priors(epsilon, beta_o_alpha, beta_o_beta), nsamples, guide, device_name(device), minibatch_size,
        safety_factor, Caps.parse(max_memory), probe, svi_chunk, svi_minibatch, guide_state, threads,
    )
    with logs.shown(logging.INFO if verbose else None):
        if is_bayesdream_object(counts):
            return _fit_object(counts, (groups, sum_factors, denominator), distribution, sum_factor_col, modality, options)
        data = prepare_technical(
            counts, groups, sum_factors, distribution=distribution or "negbinom", denominator=denominator,
            cells_axis=cells_axis, meta=meta, layer=layer, ntc=ntc, ntc_col=ntc_col, ntc_value=ntc_value,
        )
        return _fit_data(data, options)


def _fit_object(
    model_obj: Any, given: tuple[Any, Any, Any], distribution: str | None, sum_factor_col: str | None,
    modality: str | None, options: _FitOptions,
) -> TechnicalFit:
    """``fit_technical`` on a bayesDREAM object: its NTC cells in, the results written back."""
    for name, value in zip(("groups", "sum_factors", "denominator"), given):
        if value is not None:
            raise ValueError(
                f"{name}: a bayesDREAM object brings its own groups, sum factors and denominator (meta's "
                "technical_group_code, the sum_factor_col column, the modality's denominator); pass options by keyword"
            )
    inputs = read_inputs(model_obj, sum_factor_col, modality, distribution)
    data = prepare_technical(inputs.counts, inputs.groups, inputs.sum_factors, distribution=inputs.distribution,
                             denominator=inputs.denominator, cells_axis=1)
    fit = _fit_data(data, options)
    write_back(model_obj, inputs, fit)
    pyro.clear_param_store()  # as bayesDREAM's fit_technical leaves it, for the fits that follow
    return fit


def _plans(data: TechnicalData, options: _FitOptions, view: MemoryView) -> tuple[TrainingPlan, Plan]:
    """(training's plan, or the restored guide's; Predictive's plan), both against ``view``."""
    shape = (data.n_cells, data.n_features, data.n_groups)
    if options.guide_state is not None:
        svi_plan = options.guide_state.svi_plan
    else:
        safety, _ = resolve_safety_factor(options.safety_factor, view.environ)
        compact = "float32" if is_host(options.device) else str(data.counts.compact_dtype).removeprefix("torch.")
        svi_plan = plan_training(
            *shape, data.n_categories, distribution=data.distribution, device=options.device, guide=options.guide,
            safety_factor=safety, view=view, chunk_cells=options.svi_chunk, minibatch=options.svi_minibatch,
            count_dtype=compact,
        )
    predictive_plan = plan_technical(
        *shape, options.nsamples, n_categories=data.n_categories, distribution=data.distribution, guide=svi_plan.guide,
        device=options.device, minibatch_size=options.minibatch_size, safety_factor=options.safety_factor, view=view,
    )
    return svi_plan, predictive_plan


def _fit_data(data: TechnicalData, options: _FitOptions) -> TechnicalFit:
    """Plan, train (or restore the given guide) and draw: the fit of prepared ``data``."""
    start = time.perf_counter()
    inputs = build_model_inputs(data, **dataclasses.asdict(options.priors))
    logger.info(
        "fit_technical: %d NTC cells x %d features (%d excluded), %d group(s), %s",
        data.n_cells, data.n_features, data.feature_mask.size - data.n_features, data.n_groups, data.distribution,
    )
    view = options.view()  # the call's one reading, with the data in memory
    svi_plan, predictive_plan = _plans(data, options, view)
    prepared = time.perf_counter()
    training = _trained(inputs, data, options, svi_plan, view)
    trained = time.perf_counter()
    predictive = Predictive(  # parallel=True: the technical models vectorise, no need to check
        inputs.model, guide=training.guide, num_samples=options.nsamples, return_sites=_site_names(inputs),
        parallel=True, seed=options.svi.seed, progress=options.svi.progress, plan=predictive_plan, probe=view,
        threads=options.threads,
    )
    try:
        samples = predictive(**inputs.params_only())
    except (Exception, KeyboardInterrupt) as exc:
        raise _kept_guide(training.state(), exc) from exc
    sampled = time.perf_counter()
    timings = {
        "prepare_s": prepared - start, "training_s": trained - prepared,
        "svi_ms_per_step": 1e3 * training.seconds / len(training.losses), "predictive_s": sampled - trained,
        "total_s": time.perf_counter() - start,
    }
    logger.info("fit_technical done: training %.1f s, Predictive %.2f s", timings["training_s"], timings["predictive_s"])
    return TechnicalFit(
        distribution=data.distribution, posterior_samples=assemble(samples, data),
        feature_mask=torch.from_numpy(data.feature_mask.copy()), group_levels=data.group_levels,
        feature_names=data.feature_names, excluded=dict(data.excluded), losses=list(training.losses),
        learning_rates=list(training.learning_rates), svi_plan=training.plan, predictive_plan=predictive.plan,
        timings=timings, schedule=training.schedule, cell_names=data.cell_names, ntc=data.ntc, source=data.source,
    )


@dataclass(frozen=True)
class _Training:
    """What training (or the guide it restores) gives the rest of the fit; ``state`` makes the
    guide's detached state when it is needed (a recovery file), not before."""

    guide: AutoGuide
    plan: TrainingPlan
    losses: list[float]
    learning_rates: list[float]
    seconds: float
    state: Callable[[], GuideState]
    schedule: str | None


def _trained(inputs: ModelInputs, data: TechnicalData, options: _FitOptions, plan: TrainingPlan,
             view: MemoryView) -> _Training:
    """SVI run on ``plan`` (falling back as :func:`~bayesDREAM_ext.training.train` does on
    device="auto"), or the guide of ``options.guide_state`` restored."""
    given = options.guide_state
    if given is not None:
        guide = _restore_guide(inputs, given, data)
        return _Training(guide, given.svi_plan, given.losses, given.learning_rates, given.training_s, lambda: given,
                         given.schedule)
    result = train(inputs, plan, options.svi, fallback_to_host=options.device == "auto", view=view)
    return _Training(result.guide, result.plan, result.losses, result.learning_rates, result.seconds,
                     lambda: _guide_state(data, result), result.schedule)


def _site_names(inputs: ModelInputs) -> list[str]:
    """Every latent and deterministic site of a parameters-only run, in model order."""
    with poutine.block(), torch.no_grad():
        trace = prune_subsample_sites(poutine.trace(inputs.model).get_trace(**inputs.params_only()))
    return [name for name, site in trace.nodes.items() if site["type"] == "sample"]


def _guide_state(data: TechnicalData, result: TrainResult) -> GuideState:
    return GuideState(
        distribution=data.distribution,
        guide=result.plan.guide,
        latent_size=result.plan.latent_size,
        state_dict={name: value.detach().cpu().clone() for name, value in result.guide.state_dict().items()},
        feature_mask=data.feature_mask.copy(),
        losses=list(result.losses),
        learning_rates=list(result.learning_rates),
        svi_plan=result.plan,
        training_s=result.seconds,
        schedule=result.schedule,
    )


def _restore_guide(inputs: ModelInputs, state: GuideState, data: TechnicalData) -> AutoGuide:
    if state.distribution != data.distribution or not np.array_equal(state.feature_mask, data.feature_mask):
        raise ValueError(
            "guide_state: it was trained on other data (distribution "
            f"{state.distribution!r}, {int(state.feature_mask.sum())} fitted features; now {data.distribution!r}, "
            f"{data.n_features})"
        )
    pyro.clear_param_store()
    guide = make_guide(inputs, state.guide, state.latent_size, torch.device("cpu"))
    with torch.no_grad():
        guide(**inputs.params_only())
    guide.load_state_dict(state.state_dict)
    return guide

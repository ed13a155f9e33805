"""``fit_technical``: bayesDREAM's technical fit, device-aware from training to Predictive.

Validate everything (ValueError before any work) -> build the model's priors and initial
values -> plan and run SVI (:mod:`bayesDREAM_ext.training`) -> draw parameter samples with
``devicemem.Predictive`` on the device its planner chooses -> add bayesDREAM's derived
``alpha_y_mult`` / ``alpha_y_add`` and scatter every site back over all T features.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import AutoGuide
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

from bayesDREAM_ext.chunked import compact_dtype
from bayesDREAM_ext.bayesdream_object import is_bayesdream_object, read_inputs, write_back
from bayesDREAM_ext.data import (
    TechnicalData,
    check_distribution,
    prepare_technical,
)
from bayesDREAM_ext.memory import plan_technical
from bayesDREAM_ext.model import CATEGORY_SITES, SITE_FILL, ModelInputs, build_model_inputs
from bayesDREAM_ext.training import GUIDE_CHOICES, TrainingPlan, TrainResult, make_guide, plan_training, train
from devicemem.backends import Caps, MemoryView, SystemProbe, split_device
from devicemem.backends.names import device_name
from devicemem.checks import check_choice, check_fraction, check_int, check_positive, check_seed
from devicemem.planner import Plan, resolve_safety_factor
from devicemem.predictive import Predictive

logger = logging.getLogger("devicemem.bayesdream")

FORMAT = "bayesDREAM_ext.TechnicalFit/1"
GUIDE_FORMAT = "bayesDREAM_ext.GuideState/1"
DEFAULT_NITERS = {"multinomial": 100_000}
DEFAULT_NITERS_OTHER = 50_000
EFFECT_SITES = ("log2_alpha_y", "alpha_y_mul", "delta_y_add")
CATEGORY_EFFECT_SITES = ("alpha_logits_y", "alpha_logits_y_centered")


@dataclass(frozen=True)
class GuideState:
    """A trained guide, detached from any device: enough to run Predictive again without
    retraining (``fit_technical(..., guide_state=state)`` with the same data)."""

    distribution: str
    guide: str
    latent_size: int
    state_dict: dict[str, Tensor]
    feature_mask: np.ndarray
    losses: list[float]
    learning_rates: list[float]
    svi_plan: TrainingPlan
    training_s: float

    def save(self, path: str | Path) -> None:
        """One file that :meth:`load` reads (``torch.load`` with ``weights_only=True``)."""
        meta = {
            "format": GUIDE_FORMAT,
            "distribution": self.distribution,
            "guide": self.guide,
            "latent_size": self.latent_size,
            "svi_plan": dataclasses.asdict(self.svi_plan),
            "training_s": self.training_s,
        }
        _save(path, {"state_dict": self.state_dict, "feature_mask": torch.from_numpy(self.feature_mask)}, self, meta)

    @classmethod
    def load(cls, path: str | Path) -> GuideState:
        """Read a file written by :meth:`save`; ValueError naming the file when it is not one."""
        return _load(path, GUIDE_FORMAT, "GuideState", lambda stored, meta: cls(
            distribution=meta["distribution"],
            guide=meta["guide"],
            latent_size=meta["latent_size"],
            state_dict=dict(stored["state_dict"]),
            feature_mask=stored["feature_mask"].numpy(),
            losses=stored["losses"].tolist(),
            learning_rates=stored["learning_rates"].tolist(),
            svi_plan=_record(TrainingPlan, meta["svi_plan"]),
            training_s=meta["training_s"],
        ))


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


@dataclass
class TechnicalFit:
    """Result of :func:`fit_technical`.

    ``posterior_samples`` (CPU tensors over all T features, S = nsamples): ``log2_alpha_y``,
    ``alpha_y_mul``, ``delta_y_add`` [S, C-1, T]; ``o_y``, ``mu_ntc``, ``sigma_y`` [S, 1, T];
    ``beta_o`` [S, 1, 1]; ``alpha_y_mult`` [S, C, T] (baseline row 1) and ``alpha_y_add``
    [S, C, T] (baseline row 0). Multinomial has ``alpha_logits_y`` and
    ``alpha_logits_y_centered`` [S, C-1, T, K], ``probs_baseline_raw`` and ``probs_baseline``
    [S, 1, 1, T, K] and ``alpha_y_add`` [S, C, T, K] instead. Excluded features
    (``feature_mask`` False) hold the no-effect value in effects (0 on additive and log
    scales, 1 for multiplicative ones) and NaN in baselines and scales.
    """

    distribution: str
    posterior_samples: dict[str, Tensor]
    feature_mask: Tensor
    group_levels: tuple[Any, ...]
    feature_names: tuple[str, ...] | None
    excluded: dict[str, int]
    losses: list[float]
    learning_rates: list[float]
    svi_plan: TrainingPlan
    predictive_plan: Plan
    timings: dict[str, float] = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        """One file: the tensors and a JSON string of everything else (``torch.load`` with
        ``weights_only=True`` reads it)."""
        meta = {
            "format": FORMAT,
            "distribution": self.distribution,
            "group_levels": [_jsonable(level) for level in self.group_levels],
            "feature_names": None if self.feature_names is None else list(self.feature_names),
            "excluded": self.excluded,
            "svi_plan": dataclasses.asdict(self.svi_plan),
            "predictive_plan": dataclasses.asdict(self.predictive_plan),
            "timings": self.timings,
        }
        _save(path, {"posterior_samples": self.posterior_samples, "feature_mask": self.feature_mask}, self, meta)

    @classmethod
    def load(cls, path: str | Path) -> TechnicalFit:
        """Read a file written by :meth:`save` (``weights_only=True``: no code is unpickled);
        ValueError naming the file when it is truncated or not a TechnicalFit."""
        return _load(path, FORMAT, "TechnicalFit", lambda stored, meta: cls(
            distribution=meta["distribution"],
            posterior_samples=stored["posterior_samples"],
            feature_mask=stored["feature_mask"],
            group_levels=tuple(meta["group_levels"]),
            feature_names=None if meta["feature_names"] is None else tuple(meta["feature_names"]),
            excluded=meta["excluded"],
            losses=stored["losses"].tolist(),
            learning_rates=stored["learning_rates"].tolist(),
            svi_plan=_record(TrainingPlan, meta["svi_plan"]),
            predictive_plan=_record(Plan, meta["predictive_plan"]),
            timings=meta["timings"],
        ))


def _save(path: str | Path, tensors: dict[str, Any], record: Any, meta: dict[str, Any]) -> None:
    """``tensors``, ``record``'s losses and learning rates, and ``meta`` as a JSON string, in one
    file that ``torch.load(weights_only=True)`` reads back (:func:`_load`)."""
    torch.save(
        {
            **tensors,
            "losses": torch.tensor(record.losses, dtype=torch.float64),
            "learning_rates": torch.tensor(record.learning_rates, dtype=torch.float64),
            "metadata": json.dumps(meta),
        },
        path,
    )


def _load(path: str | Path, format_name: str, what: str, build: Callable[[dict[str, Any], dict[str, Any]], Any]) -> Any:
    """``build(stored, metadata)`` of a file saved with ``format_name``; ValueError naming the
    file for a truncated, foreign or damaged one (a missing file stays FileNotFoundError)."""
    try:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        meta = json.loads(stored["metadata"])
        found = meta.get("format")
    except OSError:
        raise
    except Exception as exc:
        raise ValueError(f"path: {str(path)!r} is not a readable {what} file ({type(exc).__name__}: {exc})") from exc
    if found != format_name:
        raise ValueError(f"path: {str(path)!r} is not a saved {what} (format {found!r}, expected {format_name!r})")
    try:
        return build(stored, meta)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"path: {str(path)!r} is a damaged {what} file ({type(exc).__name__}: {exc})") from exc


def _jsonable(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _record(cls: type, values: dict[str, Any]) -> Any:
    """A frozen plan record from its JSON dict (lists back to tuples)."""
    return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})


def _check_options(
    distribution: str, device: Any, nsamples: Any, niters: Any, lr: Any, tolerance: Any, alpha_ewma: Any,
    beta_o_alpha: Any, beta_o_beta: Any, epsilon: Any, minibatch_size: Any, safety_factor: Any, max_memory: Any, guide: Any,
) -> Caps:
    check_distribution(distribution)
    check_int(nsamples, "nsamples")
    check_int(niters, "niters", allow_none=True)
    check_int(minibatch_size, "minibatch_size", allow_none=True)
    resolve_safety_factor(safety_factor)
    check_fraction(alpha_ewma, "alpha_ewma")
    for value, what in ((lr, "lr"), (beta_o_alpha, "beta_o_alpha"), (beta_o_beta, "beta_o_beta"), (epsilon, "epsilon")):
        check_positive(value, what)
    check_positive(tolerance, "tolerance", allow_zero=True)
    check_choice(guide, GUIDE_CHOICES, "guide")
    name = device_name(device)
    if name != "auto":
        split_device(name, "device")  # whether this process sees it is asked of the call's memory reading
    return Caps.parse(max_memory)


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


# Sites' dimensions as Pyro returns them when the model nests plates to its full depth; with
# a single group there is no group plate, Pyro pads less, and these restore the same shapes.
SITE_DIMS = {"beta_o": 3, "o_y": 3, "mu_ntc": 3, "sigma_y": 3, "probs_baseline_raw": 5, "probs_baseline": 5}


def _pad(value: Tensor, ndim: int) -> Tensor:
    """``value`` with singleton dims after the sample dim up to ``ndim`` dims."""
    return value.reshape(value.shape[:1] + (1,) * (ndim - value.dim()) + value.shape[1:])


def _complete(samples: dict[str, Tensor], data: TechnicalData) -> dict[str, Tensor]:
    """bayesDREAM's shapes for every group count: pad per-feature sites, add the empty effect
    sites of a single group, and the full-C effect tensors."""
    samples = {name: _pad(value, SITE_DIMS[name]) if name in SITE_DIMS else value for name, value in samples.items()}
    n = next(iter(samples.values())).shape[0]
    tail = (data.n_features, data.n_categories) if data.distribution == "multinomial" else (data.n_features,)
    names = CATEGORY_EFFECT_SITES if data.distribution == "multinomial" else EFFECT_SITES
    for name in names:
        samples.setdefault(name, torch.zeros((n, 0) + tail))
    if data.distribution == "multinomial":
        effect = samples["alpha_logits_y_centered"]
        samples["alpha_y_add"] = torch.cat([torch.zeros((n, 1) + tail), effect], dim=1)
        return samples
    samples["alpha_y_mult"] = torch.cat([torch.ones((n, 1) + tail), samples["alpha_y_mul"]], dim=1)
    samples["alpha_y_add"] = torch.cat([torch.zeros((n, 1) + tail), samples["delta_y_add"]], dim=1)
    return samples


def _scatter(samples: dict[str, Tensor], data: TechnicalData) -> dict[str, Tensor]:
    """Every feature-wise site over all T features; excluded ones get the site's fill value."""
    fills = {**SITE_FILL, "alpha_y_mult": 1.0, "alpha_y_add": 0.0}
    keep = torch.from_numpy(data.feature_mask)
    out = {}
    for name, value in samples.items():
        if name not in fills:
            out[name] = value
            continue
        axis = -2 if name in CATEGORY_SITES or (name == "alpha_y_add" and data.distribution == "multinomial") else -1
        shape = list(value.shape)
        shape[axis] = keep.numel()
        full = torch.full(shape, fills[name], dtype=value.dtype)
        index = [slice(None)] * value.dim()
        index[axis] = keep
        full[tuple(index)] = value
        out[name] = full
    return out


# What the object path reads from a bayesDREAM object itself rather than from arguments.
OBJECT_ARGUMENTS = ("counts", "groups", "sum_factors", "denominator", "cells_axis", "distribution", "sum_factor_col", "modality")


def _fit_object(arguments: dict[str, Any]) -> TechnicalFit:
    """``fit_technical`` on a bayesDREAM object: its NTC cells in, the results written back."""
    for name in ("groups", "sum_factors", "denominator"):
        if arguments[name] is not None:
            raise ValueError(
                f"{name}: a bayesDREAM object brings its own groups, sum factors and denominator (meta's "
                "technical_group_code, the sum_factor_col column, the modality's denominator); pass options by keyword"
            )
    inputs = read_inputs(arguments["counts"], arguments["sum_factor_col"], arguments["modality"], arguments["distribution"])
    options = {name: value for name, value in arguments.items() if name not in OBJECT_ARGUMENTS}
    fit = fit_technical(
        inputs.counts, inputs.groups, inputs.sum_factors, distribution=inputs.distribution,
        denominator=inputs.denominator, cells_axis=1, **options,
    )
    write_back(arguments["counts"], inputs, fit)
    pyro.clear_param_store()  # as bayesDREAM's fit_technical leaves it, for the fits that follow
    return fit


def fit_technical(
    counts: Any,
    groups: Any = None,
    sum_factors: Any = None,
    *,
    distribution: str | None = None,
    denominator: Any = None,
    cells_axis: int = 0,
    device: str = "auto",
    nsamples: int = 1000,
    niters: int | None = None,
    lr: float = 1e-3,
    tolerance: float = 1e-4,
    alpha_ewma: float = 0.05,
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
) -> TechnicalFit:
    """Fit bayesDREAM's technical model on NTC cells and draw ``nsamples`` posterior samples.

    ``counts`` [cells, features] (``cells_axis=1`` for features x cells; multinomial [N, T, K]);
    ``distribution`` defaults to "negbinom";
    ``groups`` one label or code per cell, the first level (sorted, or a Categorical's
    order) being the baseline. ``sum_factors`` default to library size / mean (negbinom).
    ``device="auto"`` trains on the GPU when data, guide, optimizer state and one step fit its
    budget, else on the CPU; Predictive then goes wherever devicemem's planner puts it.
    ``niters`` defaults to bayesDREAM's 50,000 (100,000 for multinomial); training stops
    earlier once the loss's EWMA settles (moves by less than ``tolerance`` x |EWMA| per step
    over 1 / ``alpha_ewma`` steps). ``guide``: "normal"
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
    (tests inject fakes) or a ``MemoryView`` already read.

    Given a bayesDREAM object instead of counts (``fit_technical(model_obj,
    sum_factor_col="sum_factor", modality=None, ...)``), it fits that modality's NTC cells
    (its ``distribution`` unless one is given) and writes the results where bayesDREAM's own
    ``fit_technical`` does (:mod:`bayesDREAM_ext.bayesdream_object`), so that the object's
    ``fit_cis`` / ``fit_trans`` run next; the TechnicalFit (all features) is returned too.
    """
    arguments = dict(locals())
    if is_bayesdream_object(counts):
        return _fit_object(arguments)
    distribution = "negbinom" if distribution is None else distribution
    start = time.perf_counter()
    caps = _check_options(
        distribution, device, nsamples, niters, lr, tolerance, alpha_ewma, beta_o_alpha, beta_o_beta, epsilon,
        minibatch_size, safety_factor, max_memory, guide,
    )
    check_seed(seed)
    check_int(svi_chunk, "svi_chunk", allow_none=True)
    check_int(svi_minibatch, "svi_minibatch", allow_none=True)
    check_int(checkpoint_every, "checkpoint_every")
    if resume is not None and not Path(resume).is_file():
        raise ValueError(f"resume: no such checkpoint file {str(resume)!r}")
    data = prepare_technical(counts, groups, sum_factors, distribution=distribution, denominator=denominator, cells_axis=cells_axis)
    inputs = build_model_inputs(data, epsilon=epsilon, beta_o_alpha=beta_o_alpha, beta_o_beta=beta_o_beta)
    view = probe if isinstance(probe, MemoryView) else MemoryView.read(caps, probe)  # the call's one reading
    if device_name(device) != "auto":
        view.find(device)
    safety, _ = resolve_safety_factor(safety_factor, view.environ)
    niters = niters or DEFAULT_NITERS.get(distribution, DEFAULT_NITERS_OTHER)
    logger.info(
        "fit_technical: %d NTC cells x %d features (%d excluded), %d group(s), %s",
        data.n_cells, data.n_features, data.feature_mask.size - data.n_features, data.n_groups, distribution,
    )
    shape = (data.n_cells, data.n_features, data.n_groups)
    if guide_state is None:
        svi_plan = plan_training(
            *shape, data.n_categories, distribution=distribution, device=str(device), guide=guide,
            safety_factor=safety, view=view, chunk_cells=svi_chunk, minibatch=svi_minibatch,
            count_dtype="float32" if str(device) == "cpu" else str(compact_dtype(data.counts)).removeprefix("torch."),
        )
    else:
        svi_plan = guide_state.svi_plan
    predictive_plan = plan_technical(
        *shape, nsamples, n_categories=data.n_categories, distribution=distribution, guide=svi_plan.guide,
        device=str(device), minibatch_size=minibatch_size, safety_factor=safety_factor, view=view,
    )
    prepared = time.perf_counter()
    if guide_state is None:
        result = train(
            inputs, svi_plan, niters=niters, lr=lr, tolerance=tolerance, alpha_ewma=alpha_ewma, seed=seed,
            progress=progress, fallback_to_host=str(device) == "auto", view=view,
            checkpoint=checkpoint, checkpoint_every=checkpoint_every, resume=resume,
        )
        trained_guide, svi_plan = result.guide, result.plan
        losses, rates, svi_seconds = result.losses, result.learning_rates, result.seconds
    else:
        trained_guide = _restore_guide(inputs, guide_state, data)
        losses, rates, svi_seconds = guide_state.losses, guide_state.learning_rates, guide_state.training_s
    trained = time.perf_counter()
    predictive = Predictive(  # parallel=True: the technical models vectorise, no need to check
        inputs.model, guide=trained_guide, num_samples=nsamples, return_sites=_site_names(inputs), parallel=True,
        seed=seed, progress=progress, plan=predictive_plan, probe=view,
    )
    try:
        samples = predictive(**inputs.params_only())
    except (Exception, KeyboardInterrupt) as exc:
        raise _kept_guide(guide_state or _guide_state(data, result), exc) from exc
    sampled = time.perf_counter()
    posterior = _scatter(_complete(samples, data), data)
    timings = {
        "prepare_s": prepared - start,
        "training_s": trained - prepared,
        "svi_ms_per_step": 1e3 * svi_seconds / len(losses),
        "predictive_s": sampled - trained,
        "total_s": time.perf_counter() - start,
    }
    logger.info("fit_technical done: training %.1f s, Predictive %.2f s", timings["training_s"], timings["predictive_s"])
    return TechnicalFit(
        distribution=distribution,
        posterior_samples=posterior,
        feature_mask=torch.from_numpy(data.feature_mask.copy()),
        group_levels=data.group_levels,
        feature_names=data.feature_names,
        excluded=dict(data.excluded),
        losses=list(losses),
        learning_rates=list(rates),
        svi_plan=svi_plan,
        predictive_plan=predictive.plan,
        timings=timings,
    )

"""What a technical fit leaves behind, and how it is saved and read back.

:class:`TechnicalFit` is :func:`bayesDREAM_ext.fit.fit_technical`'s result; :class:`GuideState`
a trained guide detached from any device (enough to draw again without retraining). Each
saves to one file that ``torch.load(weights_only=True)`` reads: tensors, and a JSON string of
everything else (no code is unpickled).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import Tensor

from bayesDREAM_ext.memory import TrainingPlan
from devicemem.planner import Plan

if TYPE_CHECKING:
    import pandas as pd

FORMAT = "bayesDREAM_ext.TechnicalFit/1"
GUIDE_FORMAT = "bayesDREAM_ext.GuideState/1"


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
    schedule: str | None = None

    def save(self, path: str | Path) -> None:
        """One file that :meth:`load` reads (``torch.load`` with ``weights_only=True``)."""
        meta = {
            "format": GUIDE_FORMAT,
            "distribution": self.distribution,
            "guide": self.guide,
            "latent_size": self.latent_size,
            "svi_plan": dataclasses.asdict(self.svi_plan),
            "training_s": self.training_s,
            "schedule": self.schedule,
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
            schedule=meta.get("schedule"),
        ))


@dataclass(repr=False)
class TechnicalFit:
    """Result of :func:`fit_technical`; ``print(fit)`` is a few lines (no tensors),
    :meth:`summary` the per-feature table, :meth:`report` the plots.

    Fields (all saved by :meth:`save`; files from before a field existed load it as None):

    - ``distribution``: "negbinom", "normal", "studentt", "binomial" or "multinomial".
    - ``posterior_samples`` (CPU tensors over all T features, S = nsamples): ``log2_alpha_y``,
      ``alpha_y_mul``, ``delta_y_add`` [S, C-1, T]; ``o_y``, ``mu_ntc``, ``sigma_y`` [S, 1, T];
      ``beta_o`` [S, 1, 1]; ``alpha_y_mult`` [S, C, T] (baseline row 1) and ``alpha_y_add``
      [S, C, T] (baseline row 0). Multinomial has ``alpha_logits_y`` and
      ``alpha_logits_y_centered`` [S, C-1, T, K], ``probs_baseline_raw`` and ``probs_baseline``
      [S, 1, 1, T, K] and ``alpha_y_add`` [S, C, T, K] instead. Excluded features hold the
      no-effect value in effects (0 on additive and log scales, 1 for multiplicative ones)
      and NaN in baselines and scales.
    - ``feature_mask`` [T] bool: the features fitted; ``excluded``: how many were left out, by
      reason; ``feature_names`` [T] (None when the input had none).
    - ``group_levels``: the technical groups, the baseline first (C of them).
    - ``cell_names``: the NTC cells fitted (None when the input had no names); ``ntc``: how they
      were chosen; ``source``: what the counts were read from, and in which orientation.
    - ``losses``, ``learning_rates``: per SVI step; ``schedule``: the learning-rate schedule
      ("onecycle" or "bayesdream"); ``svi_plan`` (a ``TrainingPlan``) and
      ``predictive_plan`` (a ``devicemem.Plan``): where and how training and Predictive ran,
      with the memory predicted, measured and budgeted; ``timings``: seconds per stage.
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
    schedule: str | None = None
    cell_names: tuple[str, ...] | None = None
    ntc: str | None = None
    source: str | None = None

    def __repr__(self) -> str:
        from bayesDREAM_ext.summary import describe

        return describe(self)

    def summary(self, interval: float = 0.9) -> pd.DataFrame:
        """One row per (feature, non-baseline group): the effect's posterior mean, sd and
        central ``interval``, the baseline mean and the dispersion
        (:func:`bayesDREAM_ext.summary.summary`; needs pandas)."""
        from bayesDREAM_ext.summary import summary

        return summary(self, interval)

    def report(self, path: str | Path) -> Path:
        """Write the report to ``path`` (.png: the figure; .html: the figure, convergence, the
        memory plans and the largest effects; needs matplotlib) and return the path."""
        from bayesDREAM_ext.report import write_report

        return write_report(self, path)

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
            "schedule": self.schedule,
            "cell_names": None if self.cell_names is None else list(self.cell_names),
            "ntc": self.ntc,
            "source": self.source,
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
            schedule=meta.get("schedule"),
            cell_names=None if meta.get("cell_names") is None else tuple(meta["cell_names"]),
            ntc=meta.get("ntc"),
            source=meta.get("source"),
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

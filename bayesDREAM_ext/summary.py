"""What a person reads from a technical fit: a short description, convergence, and a table.

Everything here reads a :class:`FitRecord`, the fields of ``TechnicalFit`` it needs, so it
works on any record with them (a fit in memory, one loaded from a file, a test's fake).
:func:`describe` is a few lines instead of every tensor; :func:`convergence` judges the loss
curve; :func:`summary` is one row per (feature, non-baseline group) with the posterior mean,
sd and central interval of the effect, the baseline mean and the dispersion.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from devicemem.units import format_bytes

if TYPE_CHECKING:
    import pandas as pd
    from torch import Tensor

# fit_technical's defaults for the early stop, used to judge a record that does not say.
DEFAULT_TOLERANCE = 1e-4
DEFAULT_ALPHA_EWMA = 0.05
# The loss is "still falling" when its last quarter's least-squares slope is below -3 standard
# errors and that quarter's fall is over 5% of the EWMA's fall from its highest point.
TREND_T = 3.0
TREND_FRACTION = 0.05
TREND_MIN_STEPS = 20


class FitRecord(Protocol):
    """The fields of ``TechnicalFit`` these functions read. Optional, read when present:
    ``converged`` (bool), ``stop_reason`` (str) and ``niters`` (int), which training knows and
    a record may keep; ``ntc`` and ``source`` (str), which say what was fitted."""

    distribution: str
    posterior_samples: Mapping[str, Tensor]
    feature_mask: Tensor
    group_levels: Sequence[Any]
    feature_names: Sequence[str] | None
    excluded: Mapping[str, int]
    losses: Sequence[float]
    learning_rates: Sequence[float]
    svi_plan: Any
    predictive_plan: Any
    timings: Mapping[str, float]


@dataclass(frozen=True)
class EffectSites:
    """Where a distribution keeps its effect, baseline and dispersion, and what they mean."""

    effect: str
    scale: str
    baseline: str
    dispersion: str | None
    dispersion_meaning: str | None


SITES = {
    "negbinom": EffectSites(
        "log2_alpha_y", "log2", "mu_ntc", "o_y", "phi = 1 / o_y**2, the negative binomial's size (variance = mu + mu**2 / phi)"
    ),
    "normal": EffectSites("log2_alpha_y", "additive", "mu_ntc", "sigma_y", "sigma_y, the normal's sd"),
    "studentt": EffectSites("log2_alpha_y", "additive", "mu_ntc", "sigma_y", "sigma_y, the Student-t's scale"),
    "binomial": EffectSites("log2_alpha_y", "logit", "mu_ntc", None, None),
    "multinomial": EffectSites("alpha_logits_y_centered", "centred logit", "probs_baseline", None, None),
}


@dataclass(frozen=True)
class Convergence:
    """How SVI ended, and whether the loss had stopped falling.

    ``stopped_early``: the early-stop rule fired (the record's own ``converged`` flag when it
    has one, else the rule applied here to its losses with fit_technical's defaults: ``judged``
    True); ``change`` is the loss EWMA's relative move per step over the rule's window.
    ``still_falling``: over the last ``window`` steps the loss fell significantly (a least-squares
    slope ``slope`` per step at ``t`` < -3 standard errors) and by more than 5% of its total
    fall (``recent_fall``), whatever the rule said. ``converged`` is the rule without that.
    """

    stopped_early: bool
    judged: bool
    steps: int
    final_loss: float
    change: float
    tolerance: float
    window: int
    slope: float
    t: float
    recent_fall: float
    stop_reason: str | None = None

    @property
    def still_falling(self) -> bool:
        return bool(self.t < -TREND_T and self.recent_fall > TREND_FRACTION)

    @property
    def converged(self) -> bool:
        return self.stopped_early and not self.still_falling

    def status(self) -> str:
        """"converged", "NOT converged" or "stopped early, loss still falling"."""
        if self.stopped_early and self.still_falling:
            return "stopped early, loss still falling"
        return "converged" if self.converged else "NOT converged"

    def text(self) -> str:
        if self.judged:
            rule = (f"the early-stop rule {'holds' if self.stopped_early else 'does not hold'} at the last step "
                    f"(judged from the losses with tolerance {self.tolerance:g}: EWMA moving {self.change:.2g} per step)")
        else:
            rule = self.stop_reason or ("stopped by the early-stop rule" if self.stopped_early else "ran to the step limit")
            rule += f" (EWMA moving {self.change:.2g} per step)"
        trend = (f"the loss fell {self.recent_fall:.0%} of its total fall over the last {self.window} steps "
                 f"(slope {self.slope:.3g} per step, t = {self.t:.1f})")
        advice = "; more steps (--niters) or a smaller tolerance would change the fit" if not self.converged else ""
        return f"{self.status()} after {self.steps} steps, final loss {self.final_loss:.6g}: {rule}; {trend}{advice}"


def _sites(fit: FitRecord) -> EffectSites:
    if fit.distribution not in SITES:
        raise ValueError(f"distribution: no summary for {fit.distribution!r}; expected one of {', '.join(SITES)}")
    return SITES[fit.distribution]


def ewma(losses: Sequence[float], alpha: float = DEFAULT_ALPHA_EWMA) -> np.ndarray:
    """The losses' exponentially weighted moving average, as training tracks it."""
    values = np.asarray(losses, dtype=np.float64)
    out = np.empty_like(values)
    if values.size:
        out[0] = values[0]
    for i in range(1, values.size):
        out[i] = alpha * values[i] + (1 - alpha) * out[i - 1]
    return out


def ewma_change(losses: Sequence[float], alpha: float = DEFAULT_ALPHA_EWMA) -> float:
    """How far the loss's EWMA moved per step over its last 1/alpha steps, relative to its
    last value (fit_technical stops once this is under ``tolerance`` after warm-up); NaN when
    there are fewer steps than that."""
    window = math.ceil(1 / alpha)
    if len(losses) <= window:
        return float("nan")
    smooth = ewma(losses, alpha)
    return float(abs(smooth[-1] - smooth[-1 - window]) / (window * abs(smooth[-1])))


def _trend(losses: np.ndarray, window: int) -> tuple[float, float, float]:
    """(slope per step, its t statistic, the EWMA's fall over ``window`` as a fraction of its
    fall from its highest point) of the last ``window`` losses."""
    from scipy.stats import linregress

    recent = losses[-window:]
    fit = linregress(np.arange(recent.size, dtype=np.float64), recent)
    t = fit.slope / fit.stderr if fit.stderr > 0 else (0.0 if fit.slope == 0 else math.copysign(math.inf, fit.slope))
    smooth = ewma(losses)
    total = smooth.max() - smooth[-1]
    return float(fit.slope), float(t), float((smooth[-window] - smooth[-1]) / total) if total > 0 else 0.0


def convergence(fit: FitRecord, tolerance: float = DEFAULT_TOLERANCE, alpha_ewma: float = DEFAULT_ALPHA_EWMA) -> Convergence:
    """:class:`Convergence` of ``fit``'s training: the early-stop rule, and the loss's trend
    over its last quarter (at least TREND_MIN_STEPS steps)."""
    losses = np.asarray(fit.losses, dtype=np.float64)
    change = ewma_change(losses, alpha_ewma)
    recorded = getattr(fit, "converged", None)
    stopped = bool(recorded) if recorded is not None else bool(change < tolerance)
    window = max(TREND_MIN_STEPS, losses.size // 4)
    slope, t, fall = _trend(losses, window) if losses.size >= window else (math.nan, math.nan, math.nan)
    final = float(losses[-1]) if losses.size else math.nan
    return Convergence(stopped, recorded is None, int(losses.size), final, change, tolerance, window, slope, t, fall,
                       getattr(fit, "stop_reason", None))


def _groups(fit: FitRecord) -> str:
    levels = [str(level) for level in fit.group_levels]
    return f"{levels[0]} (baseline)" + "".join(f", {level}" for level in levels[1:])


def plan_lines(fit: FitRecord) -> list[str]:
    """One line each for the training plan and the Predictive plan that the fit used."""
    svi, pred = fit.svi_plan, fit.predictive_plan
    layout = "full-data steps" if getattr(svi, "chunk_cells", None) is None else f"chunks of {svi.chunk_cells} cells"
    measured = getattr(svi, "measured_peak_bytes", None)
    lines = [
        f"SVI on {svi.device} ({svi.guide} guide, {layout}): predicted peak {format_bytes(svi.predicted_peak_bytes)}, "
        f"measured {format_bytes(measured)}, budget {format_bytes(svi.budget_bytes)}"
    ]
    if pred is not None:
        lines.append(
            f"Predictive on {pred.device}: {pred.num_samples} samples in {pred.n_batches} "
            f"{'vectorised' if pred.vectorized else 'sequential'} batch(es) of {pred.batch_size}, predicted peak "
            f"{format_bytes(pred.predicted_peak_bytes)}, budget {format_bytes(pred.budget_bytes)}"
        )
    return lines


def _cells_line(fit: FitRecord) -> list[str]:
    """The line saying which cells were fitted, from what (none when the record does not say)."""
    ntc, source = getattr(fit, "ntc", None), getattr(fit, "source", None)
    if not ntc and not source:
        return []
    return [f"  {ntc or 'cells'}{'; counts from ' + source if source else ''}"]


def describe(fit: FitRecord) -> str:
    """A few lines on ``fit``: what was fitted, how training went, where it ran (a repr that
    does not print the tensors)."""
    mask = np.asarray(fit.feature_mask, dtype=bool)
    excluded = ", ".join(f"{n} {reason}" for reason, n in fit.excluded.items() if n)
    samples = fit.posterior_samples[_sites(fit).effect].shape[0]
    seconds = fit.timings.get("total_s")
    return "\n".join([
        f"{type(fit).__name__}: {fit.distribution}, {mask.size} features ({int(mask.sum())} fitted"
        f"{'; excluded: ' + excluded if excluded else ''}), groups {_groups(fit)}",
        *_cells_line(fit),
        f"  posterior: {samples} samples of {', '.join(fit.posterior_samples)}",
        f"  training: {convergence(fit).text()}",
        *(f"  {line}" for line in plan_lines(fit)),
        f"  {'total ' + format(seconds, '.1f') + ' s; ' if seconds is not None else ''}"
        "summary() for the per-feature table, report() for the plots",
    ])


def _numpy(fit: FitRecord, name: str) -> np.ndarray:
    return fit.posterior_samples[name].detach().cpu().numpy()


def _per_feature(fit: FitRecord, name: str | None, sites: EffectSites) -> np.ndarray:
    """Posterior mean per feature [T] (or [T, K]) of a baseline or dispersion site; NaN for none."""
    n_features = np.asarray(fit.feature_mask).size
    if name is None:
        return np.full(n_features, np.nan)
    values = _numpy(fit, name).astype(np.float64)
    if name == "o_y":
        values = 1.0 / values**2
    return values.mean(axis=0).reshape((n_features, -1) if sites.effect == "alpha_logits_y_centered" else (n_features,))


def summary(fit: FitRecord, interval: float = 0.9) -> pd.DataFrame:
    """One row per (feature, group other than the baseline) [, category for multinomial]: the
    ``group``'s effect against the ``baseline`` group on ``effect_scale`` (log2 for negbinom)
    as ``effect_mean``, ``effect_sd`` (ddof=1) and the central ``interval`` (``effect_q05``
    and ``effect_q95`` for 0.9); the baseline's posterior mean ``mu_ntc_mean`` and
    ``dispersion_mean`` (``.attrs["dispersion"]`` says what it is; NaN where the distribution
    has none). Features left out of the fit have ``fitted`` False and NaN statistics. Rows
    run feature by feature, in the input's order."""
    import pandas as pd

    if not 0 < interval < 1:
        raise ValueError(f"interval: expected a probability in (0, 1); got {interval!r}")
    sites = _sites(fit)
    effect = _numpy(fit, sites.effect)  # [S, C-1, T] or [S, C-1, T, K]
    n_groups, n_features = effect.shape[1], effect.shape[2]
    tail = effect.shape[3:]
    lo, hi = (1 - interval) / 2, (1 + interval) / 2
    names = [f"effect_q{100 * q:02.3g}" for q in (lo, hi)]
    stats = np.stack([
        effect.mean(axis=0, dtype=np.float64), effect.std(axis=0, ddof=1, dtype=np.float64),
        *np.quantile(effect, [lo, hi], axis=0),
    ], axis=-1).swapaxes(0, 1)  # [T, C-1, (K,) 4]: feature-major rows
    fitted = np.asarray(fit.feature_mask, dtype=bool)
    stats[~fitted] = np.nan
    per_group = int(np.prod(tail, dtype=int))
    per_row = per_group * n_groups
    frame = pd.DataFrame(stats.reshape(-1, 4), columns=["effect_mean", "effect_sd", *names])
    feature_names = list(fit.feature_names) if fit.feature_names is not None else [str(i) for i in range(n_features)]
    index = {
        "feature": np.repeat(feature_names, per_row),
        "group": np.tile(np.repeat([str(g) for g in list(fit.group_levels)[1:]], per_group), n_features),
    }
    if tail:
        index["category"] = np.tile(np.arange(tail[0]), n_features * n_groups)
    frame = pd.concat([pd.DataFrame(index), frame], axis=1)
    frame.insert(2, "baseline", str(fit.group_levels[0]))
    frame.insert(len(index) + 1, "effect_scale", sites.scale)
    baseline = _per_feature(fit, sites.baseline, sites)
    frame["mu_ntc_mean"] = np.repeat(baseline[:, None], n_groups, axis=1).reshape(-1)
    frame["dispersion_mean"] = np.repeat(_per_feature(fit, sites.dispersion, sites), per_row)
    frame["fitted"] = np.repeat(fitted, per_row)
    frame.attrs.update(interval=interval, dispersion=sites.dispersion_meaning)
    return frame

"""bayesDREAM's technical model, one Pyro model per observation distribution.

Counts are [N cells, T features] ([N, T, K] for multinomial); ``groups`` holds each cell's
technical group in 0..C-1 (0 = baseline). Plates follow bayesDREAM: ``c_plate`` (the C-1
groups except the baseline) at dim -2, ``feature_plate_technical`` at dim -1, ``cell_plate``
at dim -2 for the likelihood, so ``max_plate_nesting`` is 2 (3 for multinomial, whose effects
carry a trailing category plate). The deterministic ``alpha_y_mul`` / ``delta_y_add`` live
inside both plates, so a vectorised Predictive returns them as [S, C-1, T] like the sample
site ``log2_alpha_y``. With a single group (C = 1) there is no effect site at all (Pyro has no
empty plates); :func:`bayesDREAM_ext.fit.fit_technical` adds the empty [S, 0, T] tensors.

Every model takes ``observe``: False skips the likelihood (parameters only, what bayesDREAM's
Predictive step draws), so the counts may then be None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor

from bayesDREAM_ext.counts import Counts
from devicemem.checks import check_positive

if TYPE_CHECKING:
    from bayesDREAM_ext.data import TechnicalData

MAX_PLATE_NESTING = 2
EPS = 1e-8
FEATURE_PLATE = "feature_plate_technical"
EFFECT_DF = 3.0
EFFECT_SCALE = 20.0
# Statistics over cells (means, medians) go through the counts this many bytes of features at a
# time, so that preparing the priors never copies the whole matrix.
FEATURE_BLOCK_BYTES = 8 * 2**20

TechnicalModel = Callable[..., None]


def _unbroadcast(t: Tensor) -> Tensor:
    """``t`` without the dims that ``expand`` added (stride 0), kept as size 1 so it broadcasts back."""
    return t[tuple(slice(0, 1) if stride == 0 and size > 1 else slice(None) for size, stride in zip(t.shape, t.stride()))]


class TechnicalNegativeBinomial(dist.NegativeBinomial):
    """Pyro's NegativeBinomial (``total_count`` > 0) with a cheaper ``log_prob`` on [N, T] data.

    The value is the same; ``lgamma(total_count)`` (and its digamma in the backward pass) is
    computed on the per-feature dispersion before it is broadcast over cells instead of on
    all N x T copies, which takes about a third off an SVI step on the CPU.
    """

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        phi, logits = self.total_count, self.logits
        return (
            phi * F.logsigmoid(-logits)
            + value * F.logsigmoid(logits)
            + torch.lgamma(phi + value)
            - torch.lgamma(1.0 + value)
            - torch.lgamma(_unbroadcast(phi))
        )


def _effect_prior(scale: Tensor | float, like: Tensor) -> dist.StudentT:
    """StudentT(df=3, 0, scale): bayesDREAM's prior on every technical effect."""
    return dist.StudentT(
        torch.tensor(EFFECT_DF, device=like.device, dtype=like.dtype), torch.zeros((), device=like.device, dtype=like.dtype),
        scale,
    )


def _effects(n_groups: int, features: pyro.plate, scale: Tensor | float, like: Tensor, multiplicative: bool) -> Tensor:
    """Sample ``log2_alpha_y`` [C-1, T] and its deterministic views; return ``log2_alpha_y``
    with the baseline row of zeros prepended ([..., C, T])."""
    if n_groups == 1:
        return torch.zeros((1, features.size), device=like.device, dtype=like.dtype)
    with features, pyro.plate("c_plate", n_groups - 1, dim=-2):
        log2_alpha_y = pyro.sample("log2_alpha_y", _effect_prior(scale, like))
        if multiplicative:
            pyro.deterministic("alpha_y_mul", 2.0**log2_alpha_y)
        else:
            pyro.deterministic("alpha_y_mul", torch.ones_like(log2_alpha_y))
        pyro.deterministic("delta_y_add", log2_alpha_y)
    return torch.cat([torch.zeros_like(log2_alpha_y[..., :1, :]), log2_alpha_y], dim=-2)


def _feature_blocks(n_cells: int, n_features: int) -> Iterator[slice]:
    """Blocks of features whose [N, block] float32 slice is about ``FEATURE_BLOCK_BYTES``."""
    width = max(1, FEATURE_BLOCK_BYTES // (4 * max(n_cells, 1)))
    for start in range(0, n_features, width):
        yield slice(start, start + width)


def _per_feature(fn: Callable[..., tuple[Tensor, ...]], *columns: Counts | Tensor) -> tuple[Tensor, ...]:
    """``fn`` over blocks of features (axis 1 of each [N, T] argument), its results joined on
    their last axis: statistics over cells whose temporaries stay block-sized."""
    values = [Counts.wrap(c) for c in columns]
    parts = [fn(*(c.columns(block) for c in values)) for block in _feature_blocks(*values[0].shape[:2])]
    return tuple(torch.cat(items, dim=-1) for items in zip(*parts))


def _group_sums(values: Tensor, groups: Tensor, n_groups: int) -> Tensor:
    """[C, ...] sums of ``values`` [N, ...] over each group's cells, without copying rows."""
    return torch.zeros((n_groups,) + values.shape[1:], dtype=values.dtype).index_add_(0, groups, values)


def mu_ntc_prior(counts: Counts | Tensor, groups: Tensor, sum_factors: Tensor, epsilon: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Per-feature mean and robust sd of the baseline group's normalised counts.

    m = mean(y / s) over baseline cells; s = max(1.4826 * MAD / sqrt(N) + eps, 0.1 * (m + eps)).
    """
    rows = (groups == 0).nonzero().squeeze(-1)
    factors = sum_factors[rows, None]

    def stats(block: Tensor) -> tuple[Tensor, Tensor]:
        base = block[rows] / factors
        return base.mean(dim=0), (base - base.median(dim=0).values).abs().median(dim=0).values

    m, mad = _per_feature(stats, counts)
    sd = torch.maximum(1.4826 * mad / rows.numel() ** 0.5 + epsilon, 0.1 * (m + epsilon))
    return m, sd


def technical_model(
    counts: Tensor | None,
    groups: Tensor,
    sum_factors: Tensor,
    mu_prior_mean: Tensor,
    mu_prior_sd: Tensor,
    n_groups: int,
    beta_o_alpha: float = 9.0,
    beta_o_beta: float = 3.0,
    observe: bool = True,
) -> None:
    """Negative-binomial technical model (bayesDREAM's default).

    ``log2_alpha_y`` [C-1, T] ~ StudentT(3, 0, 20); ``beta_o`` ~ Gamma(9, 3); ``o_y`` [T] ~
    Exponential(beta_o), dispersion phi = 1 / o_y**2; ``mu_ntc`` [T] ~ Gamma with mean
    ``mu_prior_mean`` and sd ``mu_prior_sd``; y[n, t] ~ NB(phi_t, mean mu_t * 2**log2_alpha[g_n, t]
    * s_n). ``counts=None`` with ``observe=True`` samples ``y_obs`` [N, T] (posterior
    predictive); ``observe=False`` skips the likelihood.
    """
    n_features = mu_prior_mean.shape[-1]
    features = pyro.plate(FEATURE_PLATE, n_features, dim=-1)
    log2_full = _effects(n_groups, features, EFFECT_SCALE, mu_prior_mean, multiplicative=True)
    beta_o = pyro.sample(
        "beta_o", dist.Gamma(torch.tensor(beta_o_alpha, device=mu_prior_mean.device, dtype=mu_prior_mean.dtype), beta_o_beta)
    )
    with features:
        o_y = pyro.sample("o_y", dist.Exponential(beta_o))
        mu_ntc = pyro.sample(
            "mu_ntc", dist.Gamma(mu_prior_mean**2 / mu_prior_sd**2, mu_prior_mean / mu_prior_sd**2)
        )
    if not observe:
        return
    phi_y = 1.0 / o_y**2
    mu_final = mu_ntc * (2.0**log2_full)[..., groups, :] * sum_factors[:, None]
    logits = torch.log(mu_final + EPS) - torch.log(phi_y + EPS)
    with pyro.plate("cell_plate", groups.shape[0], dim=-2), features:
        pyro.sample("y_obs", TechnicalNegativeBinomial(total_count=phi_y, logits=logits), obs=counts)


def gaussian_technical_model(
    counts: Tensor | None,
    groups: Tensor,
    mu_prior_mean: Tensor,
    mu_prior_sd: Tensor,
    sigma_hat: Tensor,
    effect_scale: Tensor,
    n_groups: int,
    studentt: bool = False,
    observe: bool = True,
) -> None:
    """Normal (or Student-t, df = 3) technical model with additive effects.

    ``log2_alpha_y`` [C-1, T] ~ StudentT(3, 0, effect_scale) (the robust sd of the feature) is
    the additive shift in data units
    (``alpha_y_mul`` is fixed to 1); ``sigma_y`` [T] ~ HalfNormal(2 * sigma_hat); ``mu_ntc``
    [T] ~ Normal(mu_prior_mean, mu_prior_sd); y[n, t] ~ Normal(mu_t + delta[g_n, t], sigma_t).
    """
    n_features = mu_prior_mean.shape[-1]
    features = pyro.plate(FEATURE_PLATE, n_features, dim=-1)
    add_full = _effects(n_groups, features, effect_scale, mu_prior_mean, multiplicative=False)
    with features:
        sigma_y = pyro.sample("sigma_y", dist.HalfNormal(2.0 * sigma_hat))
        mu_ntc = pyro.sample("mu_ntc", dist.Normal(mu_prior_mean, mu_prior_sd))
    if not observe:
        return
    loc = mu_ntc + add_full[..., groups, :]
    if studentt:
        likelihood = dist.StudentT(torch.tensor(EFFECT_DF, device=loc.device, dtype=loc.dtype), loc, sigma_y)
    else:
        likelihood = dist.Normal(loc, sigma_y)
    with pyro.plate("cell_plate", groups.shape[0], dim=-2), features:
        pyro.sample("y_obs", likelihood, obs=counts)


def binomial_technical_model(
    counts: Tensor | None,
    groups: Tensor,
    denominator: Tensor,
    prior_a: Tensor,
    prior_b: Tensor,
    n_groups: int,
    observe: bool = True,
) -> None:
    """Binomial technical model: effects on the logit scale.

    ``log2_alpha_y`` [C-1, T] ~ StudentT(3, 0, 20) is added to logit(``mu_ntc``), where
    ``mu_ntc`` [T] ~ Beta(prior_a, prior_b) is the baseline success probability;
    y[n, t] ~ Binomial(denominator[n, t], sigmoid(logit(mu_t) + delta[g_n, t])). Cells with a
    zero denominator contribute nothing.
    """
    n_features = prior_a.shape[-1]
    features = pyro.plate(FEATURE_PLATE, n_features, dim=-1)
    add_full = _effects(n_groups, features, EFFECT_SCALE, prior_a, multiplicative=True)
    with features:
        mu_ntc = pyro.sample("mu_ntc", dist.Beta(prior_a, prior_b))
    if not observe:
        return
    p = mu_ntc.clamp(1e-6, 1 - 1e-6)
    logits = torch.log(p) - torch.log1p(-p) + add_full[..., groups, :]
    with pyro.plate("cell_plate", groups.shape[0], dim=-2), features:
        pyro.sample("y_obs", dist.Binomial(total_count=denominator, logits=logits), obs=counts)


def multinomial_technical_model(
    counts: Tensor | None,
    groups: Tensor,
    zero_cat_mask: Tensor,
    concentration: Tensor,
    n_groups: int,
    observe: bool = True,
) -> None:
    """Multinomial technical model: per-category logit effects around a Dirichlet baseline.

    ``alpha_logits_y`` [C-1, T, K] ~ StudentT(3, 0, 20), zeroed on masked categories (absent in
    some group) and centred over the active ones (``alpha_logits_y_centered``);
    ``probs_baseline_raw`` [T, K] ~ Dirichlet(concentration), masked and renormalised into
    ``probs_baseline``. y[n, t, :] ~ Multinomial(sum over active categories, softmax(log
    probs_baseline + alpha[g_n])) over the active categories only.
    """
    n_features, n_categories = zero_cat_mask.shape
    active = ~zero_cat_mask
    features = pyro.plate(FEATURE_PLATE, n_features, dim=-1)
    if n_groups > 1:
        with (
            pyro.plate("c_plate_multi", n_groups - 1, dim=-3),
            pyro.plate("f_plate_multi", n_features, dim=-2),
            pyro.plate("k_plate", n_categories, dim=-1),
        ):
            alpha = pyro.sample("alpha_logits_y", _effect_prior(EFFECT_SCALE, concentration))
            alpha = alpha.masked_fill(zero_cat_mask, 0.0)
            n_active = active.sum(dim=-1, keepdim=True).clamp_min(1)
            alpha = (alpha - alpha.sum(dim=-1, keepdim=True) / n_active).masked_fill(zero_cat_mask, 0.0)
            alpha = pyro.deterministic("alpha_logits_y_centered", alpha)
        alpha_full = torch.cat([torch.zeros_like(alpha[..., :1, :, :]), alpha], dim=-3)
    else:
        alpha_full = torch.zeros((1, n_features, n_categories), device=concentration.device, dtype=concentration.dtype)
    with features:
        probs_raw = pyro.sample("probs_baseline_raw", dist.Dirichlet(concentration))
        probs = probs_raw * active
        probs = pyro.deterministic("probs_baseline", probs / probs.sum(dim=-1, keepdim=True).clamp_min(1e-12), event_dim=1)
    if not observe:
        return
    # Cells take the effect plates' dim -3 slot after indexing; unsqueeze keeps an outer
    # (vectorised) sample dim apart from it, or a batch of B would broadcast to B x B.
    logits = torch.log(probs.clamp_min(1e-12)) + alpha_full[..., groups, :, :].unsqueeze(-4)
    log_p = torch.log_softmax(logits.masked_fill(zero_cat_mask, float("-inf")), dim=-1)
    y = counts.masked_fill(zero_cat_mask, 0.0)
    total = y.sum(dim=-1)
    log_lik = (
        torch.lgamma(total + 1.0)
        - torch.lgamma(y + 1.0).sum(dim=-1)
        + torch.where(active, y * log_p, torch.zeros_like(log_p)).sum(dim=-1)
    )
    with pyro.plate("cell_plate", groups.shape[0], dim=-2), features:
        pyro.factor("y_obs", log_lik)


# How each returned site is scattered back over all T features: the value excluded features
# get (no effect for effects: 0 on additive/log scales, 1 for multiplicative; NaN for
# baselines and scales) and the axis that holds the features (-2 when categories follow).
SITE_FILL = {
    "log2_alpha_y": 0.0,
    "delta_y_add": 0.0,
    "alpha_y_mul": 1.0,
    "alpha_logits_y": 0.0,
    "alpha_logits_y_centered": 0.0,
    "mu_ntc": float("nan"),
    "o_y": float("nan"),
    "sigma_y": float("nan"),
    "probs_baseline_raw": float("nan"),
    "probs_baseline": float("nan"),
}
CATEGORY_SITES = ("alpha_logits_y", "alpha_logits_y_centered", "probs_baseline_raw", "probs_baseline")


@dataclass(frozen=True)
class Priors:
    """The technical model's prior settings, bayesDREAM's defaults: ``epsilon`` keeps prior
    scales and means off zero; ``beta_o`` ~ Gamma(``beta_o_alpha``, ``beta_o_beta``)."""

    epsilon: float = 1e-6
    beta_o_alpha: float = 9.0
    beta_o_beta: float = 3.0

    def __post_init__(self) -> None:
        for name in ("beta_o_alpha", "beta_o_beta", "epsilon"):
            check_positive(getattr(self, name), name)


@dataclass(frozen=True)
class ModelInputs:
    """A technical model with everything it needs: its keyword ``arguments`` (on the CPU,
    ``observe=True``; the data matrices named in ``data_keys`` kept as
    :class:`~bayesDREAM_ext.counts.Counts`, sparse when the input was) for training, and
    data-driven ``init_values`` for the guide (every other site starts at its prior median)."""

    model: TechnicalModel
    arguments: dict[str, Any]
    init_values: dict[str, Tensor]
    max_plate_nesting: int
    data_keys: tuple[str, ...]

    @property
    def kwargs(self) -> dict[str, Any]:
        """The model's keyword arguments as it takes them, for a full-data run: the data
        matrices as dense tensors (a sparse matrix densified whole)."""
        return {**self.arguments, **{key: self.arguments[key].dense() for key in self.data_keys}}

    def params_only(self) -> dict[str, Any]:
        """The kwargs for a parameters-only run: no likelihood, no data matrices."""
        return {**self.arguments, **{key: None for key in self.data_keys}, "observe": False}

    @property
    def cell_keys(self) -> tuple[str, ...]:
        """The arguments with one row per cell (the data matrices, groups, sum factors): what a
        chunk of cells replaces."""
        return self.data_keys + tuple(key for key in ("groups", "sum_factors") if key in self.arguments)

    def cells(self) -> dict[str, Counts | Tensor]:
        """The cell-wise arguments as they are kept (what training's chunks are cut from)."""
        return {key: self.arguments[key] for key in self.cell_keys}

    @property
    def value_shape(self) -> tuple[int, int, int]:
        """(cells, features, categories) of the counts."""
        counts = self.arguments[self.data_keys[0]]
        return counts.n_cells, counts.n_features, counts.n_categories


def _robust_sd(values: Tensor, epsilon: float) -> Tensor:
    """1.4826 * MAD per feature, the plain sd where the MAD is (near) 0."""
    mad = 1.4826 * (values - values.median(dim=0).values).abs().median(dim=0).values
    return torch.where(mad > epsilon, mad, values.std(dim=0, unbiased=False))


def _logit(p: Tensor) -> Tensor:
    return torch.log(p) - torch.log1p(-p)


def build_model_inputs(
    data: TechnicalData, epsilon: float = 1e-6, beta_o_alpha: float = 9.0, beta_o_beta: float = 3.0
) -> ModelInputs:
    """Priors, initial values and model arguments for ``data``'s distribution, as bayesDREAM
    derives them from the NTC cells (group 0 = baseline). The data matrices go into the
    arguments as :class:`~bayesDREAM_ext.counts.Counts` (:attr:`ModelInputs.kwargs` gives them
    dense, as the model takes them)."""
    y, groups, n_groups = Counts.wrap(data.counts), data.groups, data.n_groups
    sizes = torch.bincount(groups, minlength=n_groups).to(torch.float32)[:, None]
    base = (groups == 0).nonzero().squeeze(-1)
    if data.distribution == "negbinom":
        mean, sd = mu_ntc_prior(y, groups, data.sum_factors, epsilon)
        factors = data.sum_factors[:, None]
        (sums,) = _per_feature(lambda block: (_group_sums(block / factors, groups, n_groups),), y)
        means = sums / sizes + EPS
        kwargs = dict(
            counts=y, groups=groups, sum_factors=data.sum_factors, mu_prior_mean=mean + epsilon,
            mu_prior_sd=sd, n_groups=n_groups, beta_o_alpha=beta_o_alpha, beta_o_beta=beta_o_beta,
        )
        return ModelInputs(technical_model, kwargs, {"log2_alpha_y": torch.log2(means[1:] / means[:1])}, 2, ("counts",))
    if data.distribution in ("normal", "studentt"):
        def stats(block: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            return _robust_sd(block, epsilon), block[base].std(dim=0, unbiased=False), _group_sums(block, groups, n_groups)

        robust, spread, sums = _per_feature(stats, y)
        means = sums / sizes
        mean = means[0]
        mean_sd = torch.maximum(robust / y.shape[0] ** 0.5 + epsilon, torch.clamp(0.1 * mean.abs(), min=0.1))
        kwargs = dict(
            counts=y, groups=groups, mu_prior_mean=mean, mu_prior_sd=mean_sd,
            sigma_hat=spread + epsilon, effect_scale=robust.clamp_min(epsilon),
            n_groups=n_groups, studentt=data.distribution == "studentt",
        )
        return ModelInputs(gaussian_technical_model, kwargs, {"log2_alpha_y": means[1:] - means[:1]}, 2, ("counts",))
    if data.distribution == "binomial":
        denominator = Counts.wrap(data.denominator)
        successes = _group_sums(y.dense(), groups, n_groups) + 0.5
        trials = _group_sums(denominator.dense(), groups, n_groups) + 1.0
        logits = _logit((successes / trials).clamp(1e-6, 1 - 1e-6))
        p_hat = logits[0].sigmoid()
        kappa = (trials[0] - 1.0).clamp(20.0, 200.0)
        kwargs = dict(
            counts=y, groups=groups, denominator=denominator, prior_a=p_hat * kappa + 1e-3,
            prior_b=(1.0 - p_hat) * kappa + 1e-3, n_groups=n_groups,
        )
        return ModelInputs(binomial_technical_model, kwargs, {"log2_alpha_y": logits[1:] - logits[:1]}, 2, ("counts", "denominator"))
    totals = _group_sums(y.dense(), groups, n_groups)  # [C, T, K]
    zero_cat_mask = (totals == 0).any(dim=0)
    props = (totals + 0.5) / (totals + 0.5).sum(dim=-1, keepdim=True)
    log_ratio = torch.log(props[1:]) - torch.log(props[:1])
    floor = 1e-3 / y.shape[-1]
    simplex = (totals[0] + 1.0) / (totals[0] + 1.0).sum(dim=-1, keepdim=True)
    simplex = (simplex + floor) / (1.0 + floor * y.shape[-1])
    kwargs = dict(
        counts=y, groups=groups, zero_cat_mask=zero_cat_mask,
        concentration=torch.where(zero_cat_mask, torch.ones_like(simplex), totals[0] + 1.0), n_groups=n_groups,
    )
    init = {"alpha_logits_y": log_ratio.masked_fill(zero_cat_mask, 0.0), "probs_baseline_raw": simplex}
    return ModelInputs(multinomial_technical_model, kwargs, init, 3, ("counts",))

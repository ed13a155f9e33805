"""Input validation and conversion for ``fit_technical``: everything is checked here, before
any training, and every problem is a ValueError that names the argument.

Accepted counts: a counts file or 10x folder, a :class:`~bayesDREAM_ext.readers.CountsFile`,
AnnData objects (duck-typed on ``.X``, ``.obs_names``, ``.var_names``), pandas DataFrames,
numpy arrays, scipy.sparse matrices and torch tensors, all read by
:func:`bayesDREAM_ext.readers.load` (cells first, names kept; the orientation from the format,
the metadata or the groups' length, or ``cells_axis``: bayesDREAM stores genes x cells, so it
uses ``cells_axis=1``); multinomial counts are [N, T, K]. ``groups`` and ``sum_factors`` may
name columns of the cell metadata; the NTC cells are chosen (:func:`select_cells`, with
:mod:`bayesDREAM_ext.ntc`) before anything else is worked out. The counts (and a binomial
denominator) are value-checked into :class:`~bayesDREAM_ext.counts.Counts` once; here the
groups, sum factors and excluded features are worked out from them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bayesDREAM_ext.counts import FLOAT32_MAX, Counts, all_zero, check_values, input_ndim
from bayesDREAM_ext.ntc import choose_ntc
from bayesDREAM_ext.readers import CountsFile, load
from devicemem.checks import check_choice

logger = logging.getLogger("devicemem.bayesdream")

# The technical model's observation distributions (one Pyro model each, bayesDREAM_ext.model).
DISTRIBUTIONS = ("negbinom", "normal", "studentt", "binomial", "multinomial")
COUNT_DISTRIBUTIONS = ("negbinom", "binomial", "multinomial")


@dataclass(frozen=True)
class TechnicalData:
    """Validated inputs, cells first, restricted to the features that can be fitted.

    ``counts`` is :class:`~bayesDREAM_ext.counts.Counts` [N, T_fit] ([N, T_fit, K] for
    multinomial) of float32, sparse when the input was (not for binomial, whose denominator is
    dense): training densifies it one chunk of cells at a time; ``groups`` [N] int64
    codes with 0 the baseline (``group_levels[code]`` is the user's label); ``sum_factors``
    [N] (ones where the distribution does not use them); ``denominator`` [N, T_fit] for
    binomial. ``feature_mask`` [T] is True for the fitted features; ``excluded`` counts the
    excluded ones by reason. ``cell_names`` are the NTC cells' names (None when the input has
    none), ``ntc`` says how they were chosen and ``source`` what the counts were read from.
    """

    distribution: str
    counts: Counts
    groups: Tensor
    sum_factors: Tensor
    denominator: Counts | None
    feature_mask: np.ndarray
    group_levels: tuple[Any, ...]
    feature_names: tuple[str, ...] | None
    excluded: dict[str, int]
    cell_names: tuple[str, ...] | None = None
    ntc: str = ""
    source: str = ""

    @property
    def n_cells(self) -> int:
        return self.counts.n_cells

    @property
    def n_features(self) -> int:
        """Features fitted (T_fit); ``feature_mask.size`` is the full T."""
        return self.counts.n_features

    @property
    def n_groups(self) -> int:
        return len(self.group_levels)

    @property
    def n_categories(self) -> int:
        return self.counts.n_categories


def check_distribution(distribution: Any) -> str:
    """The distribution name, or ValueError listing the accepted ones."""
    return check_choice(distribution, DISTRIBUTIONS, "distribution")


def _group_codes(groups: Any, n_cells: int) -> tuple[np.ndarray, tuple[Any, ...]]:
    """Integer codes (0 = the first level) and the levels; ValueError on length or missing values."""
    categories = getattr(getattr(groups, "cat", None), "categories", None)
    categories = getattr(groups, "categories", categories)
    values = np.asarray(groups.to_numpy() if hasattr(groups, "to_numpy") else groups)
    if values.ndim != 1:
        raise ValueError(f"groups: expected one label per cell (1-D); got shape {values.shape}")
    if values.shape[0] != n_cells:
        raise ValueError(f"groups: has {values.shape[0]} labels but counts have {n_cells} cells")
    missing = np.array([v is None or (isinstance(v, float) and np.isnan(v)) for v in values.tolist()])
    if missing.any():
        raise ValueError(f"groups: {int(missing.sum())} cell(s) have a missing group label")
    if categories is not None:
        levels = [level for level in categories if (values == level).any()]
        codes = np.array([levels.index(v) for v in values.tolist()], dtype=np.int64) if levels else np.zeros(0, np.int64)
        return codes, tuple(levels)
    levels, codes = np.unique(values, return_inverse=True)
    return codes.astype(np.int64), tuple(levels.tolist())


def _sum_factors(sum_factors: Any, counts: Counts, distribution: str) -> np.ndarray:
    n_cells = counts.n_cells
    if sum_factors is None:
        if distribution != "negbinom":
            return np.ones(n_cells, dtype=np.float32)
        totals = counts.cell_totals()
        if (totals <= 0).any():
            raise ValueError(
                f"sum_factors: not given, and {int((totals <= 0).sum())} cell(s) have no counts, so their "
                "library-size factor would be 0; pass sum_factors or drop those cells"
            )
        logger.info("sum_factors not given: using library size / mean library size")
        return (totals / totals.mean()).astype(np.float32)
    values = np.asarray(sum_factors.to_numpy() if hasattr(sum_factors, "to_numpy") else sum_factors, dtype=np.float64)
    if values.ndim != 1 or values.shape[0] != n_cells:
        raise ValueError(f"sum_factors: expected {n_cells} values (one per cell); got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ValueError(f"sum_factors: {int((~np.isfinite(values)).sum())} value(s) are NaN or infinite")
    if (values <= 0).any():
        raise ValueError(f"sum_factors: {int((values <= 0).sum())} value(s) are <= 0; sum factors must be > 0")
    if (values > FLOAT32_MAX).any():
        raise ValueError(f"sum_factors: {int((values > FLOAT32_MAX).sum())} value(s) exceed float32's range ({FLOAT32_MAX:.3g})")
    return values.astype(np.float32)


def _constant(values: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Per feature (axis 1), whether every (valid) cell has the same value: zero std, found
    with min == max so that no array-sized float temporaries are made."""
    if valid is None:
        return values.max(axis=0) == values.min(axis=0)
    return np.where(valid, values, -np.inf).max(axis=0) <= np.where(valid, values, np.inf).min(axis=0)


def exclusion_masks(
    values: Counts, groups: np.ndarray, denominator_values: Counts | None, distribution: str, n_groups: int
) -> dict[str, np.ndarray]:
    """Boolean [T] masks of features that cannot be fitted, by reason (bayesDREAM's filters);
    ``values`` (and ``denominator_values``) cells first, ``groups`` codes 0..n_groups-1."""
    if distribution not in ("multinomial", "binomial"):
        top, bottom = values.feature_extremes()
        return {"zero NTC counts": (top == 0) & (bottom == 0), "zero std": top == bottom}
    counts = values.array()
    if distribution == "multinomial":
        totals = counts.sum(axis=2, keepdims=True)
        ratios = counts / np.maximum(totals, 1)
        present = np.ones(counts.shape[1:], dtype=bool)
        for g in range(n_groups):
            present &= counts[groups == g].sum(axis=0) > 0
        return {
            "zero NTC counts": counts.sum(axis=(0, 2)) == 0,
            "zero std": _constant(ratios).all(axis=-1),
            "<= 1 category present in every group": present.sum(axis=-1) <= 1,
        }
    assert denominator_values is not None  # prepare_technical requires one for binomial
    denominator = denominator_values.array()
    reasons = {"zero NTC counts": ~counts.any(axis=0), "zero std": _constant(counts)}
    valid = denominator > 0
    ratio = counts / np.maximum(denominator, 1)
    reasons["zero std"] |= _constant(ratio, valid)
    boundary = np.zeros(counts.shape[1], dtype=bool)
    for g in range(n_groups):
        in_g = groups == g
        g_valid = valid[in_g]
        at_zero = np.where(g_valid, counts[in_g] == 0, True).all(axis=0)
        at_one = np.where(g_valid, counts[in_g] == denominator[in_g], True).all(axis=0)
        boundary |= ~g_valid.any(axis=0) | at_zero | at_one
    reasons["a group all at 0 or all at the denominator"] = boundary
    return reasons


@dataclass(frozen=True)
class Cells:
    """The NTC cells a fit uses, read and chosen: ``counts`` (and ``denominator``) cells first
    with their names, ``groups`` and ``sum_factors`` one per cell (as given, or the metadata's
    columns), ``ntc`` a line saying how the cells were chosen."""

    counts: CountsFile
    groups: Any
    sum_factors: Any
    denominator: CountsFile | None
    ntc: str


def _length(values: Any) -> int | None:
    """How many values a per-cell argument holds (None for a column name or nothing)."""
    if values is None or isinstance(values, str):
        return None
    try:
        return len(values)
    except TypeError:
        return None


def _per_cell(values: Any, record: CountsFile, what: str, option: str) -> Any:
    """``values`` as given, or the cell metadata's column when ``values`` names one."""
    if not isinstance(values, str):
        return values
    meta = record.cell_meta
    if meta is None or values not in meta.columns:
        has = ("it has " + (", ".join(map(str, meta.columns)) or "no columns") if meta is not None
               else "the counts came with none: pass --meta FILE (meta= in Python)")
        raise ValueError(f"{what}: no column {values!r} in the cell metadata ({option}); {has}")
    return meta[values]


def _take(values: Any, mask: np.ndarray, what: str) -> Any:
    """The NTC cells' entries of a per-cell argument (a Series or Categorical keeps its type)."""
    if values is None:
        return None
    if _length(values) != mask.size:
        raise ValueError(f"{what}: has {_length(values)} values but the counts have {mask.size} cells (before the NTC selection)")
    if hasattr(values, "iloc"):
        return values.iloc[mask]
    if isinstance(values, Tensor):
        return values[torch.from_numpy(mask)]
    return values[mask] if hasattr(values, "categories") else np.asarray(values)[mask]


def select_cells(
    counts: Any, groups: Any, sum_factors: Any = None, *, denominator: Any = None, cells_axis: int | None = None,
    meta: Any = None, layer: str | None = None, ntc: Any = None, ntc_col: str | None = None, ntc_value: Any = None,
) -> Cells:
    """Read ``counts`` (:func:`~bayesDREAM_ext.readers.load`: any input, cells first, the
    orientation from ``cells_axis``, the metadata or the groups' length), look up ``groups`` /
    ``sum_factors`` given as column names of the cell metadata (``meta``, or AnnData's obs),
    and keep the NTC cells (``ntc``, or ``ntc_col`` / ``ntc_value``; every cell without them)."""
    record = load(counts, meta=meta, cells_axis=cells_axis, layer=layer, n_cells=_length(groups))
    groups = _per_cell(groups, record, "groups", "--group-col")
    sum_factors = _per_cell(sum_factors, record, "sum_factors", "--sum-factor-col")
    denom = None if denominator is None else load(
        denominator, what="denominator", cells_axis=cells_axis, n_cells=record.shape[0], cells_from="cells of the counts", layer=layer,
    )
    mask, how = choose_ntc(record.shape[0], record.cell_meta, ntc, ntc_col, ntc_value)
    if mask is None:
        return Cells(record, groups, sum_factors, denom, how)
    return Cells(record.take_cells(mask), _take(groups, mask, "groups"), _take(sum_factors, mask, "sum_factors"),
                 None if denom is None else denom.take_cells(mask), how)


def prepare_technical(
    counts: Any,
    groups: Any,
    sum_factors: Any = None,
    *,
    distribution: str = "negbinom",
    denominator: Any = None,
    **selection: Any,
) -> TechnicalData:
    """Check and convert ``fit_technical``'s data arguments (:func:`select_cells`, which takes
    the ``selection`` keywords: ``cells_axis``, ``meta``, ``layer``, ``ntc``, ``ntc_col``,
    ``ntc_value``; then the values); ValueError for every bad input. The counts become
    :class:`~bayesDREAM_ext.counts.Counts` here, once."""
    check_distribution(distribution)
    cells = select_cells(counts, groups, sum_factors, denominator=denominator, **selection)
    logger.info("%s", cells.ntc)
    values = _read_counts(cells.counts, distribution)
    codes, levels = _group_codes(cells.groups, values.n_cells)
    sizes = np.bincount(codes, minlength=len(levels))
    small = [f"{levels[g]!r} ({int(sizes[g])} cell{'s' if sizes[g] != 1 else ''})" for g in range(len(levels)) if sizes[g] < 2]
    if small:
        raise ValueError(f"groups: every technical group needs at least 2 NTC cells; too few in {', '.join(small)}")
    denom = _read_denominator(cells.denominator, distribution, values)
    factors = _sum_factors(cells.sum_factors, values, distribution)
    keep, excluded = _kept_features(exclusion_masks(values, codes, denom, distribution, len(levels)))
    return TechnicalData(
        distribution=distribution,
        counts=values.kept(keep),
        groups=torch.from_numpy(codes),
        sum_factors=torch.from_numpy(factors),
        denominator=None if denom is None else denom.kept(keep),
        feature_mask=keep,
        group_levels=levels,
        feature_names=cells.counts.feature_names,
        excluded={reason: n for reason, n in excluded.items() if n},
        cell_names=cells.counts.cell_names,
        ntc=cells.ntc,
        source=f"{cells.counts.source} ({cells.counts.orientation})",
    )


def _read_counts(record: CountsFile, distribution: str) -> Counts:
    """The checked counts (sparse input stays sparse unless binomial)."""
    matrix = record.counts
    ndim = input_ndim(matrix)
    expected_ndim = 3 if distribution == "multinomial" else 2
    if ndim != expected_ndim:
        form = "[cells, features, categories]" if expected_ndim == 3 else "[cells, features]"
        raise ValueError(f"counts: distribution {distribution!r} needs {expected_ndim}-D counts {form}; got {ndim}-D")
    integer = distribution in COUNT_DISTRIBUTIONS
    check_values(matrix, "counts", integer=integer, non_negative=integer)
    values = Counts.from_input(matrix, keep_sparse=distribution != "binomial")
    if values.n_cells == 0 or values.n_features == 0:
        raise ValueError(f"counts: empty matrix of shape {values.shape}")
    if all_zero(matrix):
        raise ValueError("counts: every value is zero; nothing to fit")
    return values


def _read_denominator(record: CountsFile | None, distribution: str, counts: Counts) -> Counts | None:
    """The binomial's checked denominator, dense and cells first (None for the others)."""
    if distribution != "binomial":
        if record is not None:
            raise ValueError(f"denominator: only the 'binomial' distribution uses one; got one with {distribution!r}")
        return None
    if record is None:
        raise ValueError("denominator: distribution 'binomial' needs a denominator matrix (same shape as counts)")
    check_values(record.counts, "denominator", integer=True, non_negative=True)
    denom = Counts.from_input(record.counts, keep_sparse=False)
    if denom.shape != counts.shape:
        raise ValueError(f"denominator: shape {denom.shape} (cells first) differs from counts' {counts.shape}")
    smaller = denom.array() < counts.array()
    if smaller.any():
        raise ValueError(f"denominator: {int(smaller.sum())} value(s) are smaller than the counts; need denominator >= counts")
    return denom


def _kept_features(reasons: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, int]]:
    """(the features to fit, how many each reason excluded first); ValueError when none is left."""
    n_features = len(next(iter(reasons.values())))
    excluded_mask = np.zeros(n_features, dtype=bool)
    excluded = {}
    for reason, mask in reasons.items():
        excluded[reason] = int((mask & ~excluded_mask).sum())
        excluded_mask |= mask
    if excluded_mask.all():
        raise ValueError(f"counts: no feature left to fit after excluding {n_features} ({_describe(excluded)})")
    if excluded_mask.any():
        logger.warning(
            "%d of %d feature(s) excluded from the fit (%s); their effects are reported as no effect "
            "and their baselines as NaN", int(excluded_mask.sum()), n_features, _describe(excluded),
        )
    return ~excluded_mask, excluded


def _describe(excluded: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in excluded.items() if n) or "none"

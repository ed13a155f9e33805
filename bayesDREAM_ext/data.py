"""Input validation and conversion for ``fit_technical``: everything is checked here, before
any training, and every problem is a ValueError that names the argument.

Accepted counts: numpy arrays, scipy.sparse matrices, pandas DataFrames, torch tensors and
AnnData objects (duck-typed on ``.X``, ``.obs_names``, ``.var_names``; anndata itself is only
needed to build one). ``cells_axis`` says which axis holds the cells (bayesDREAM stores genes x
cells, so it uses ``cells_axis=1``); multinomial counts are [N, T, K] (or [T, N, K] with
``cells_axis=1``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from bayesDREAM_ext.sparsity import issparse
from devicemem.checks import check_choice

if TYPE_CHECKING:
    from scipy.sparse import csr_matrix, spmatrix

logger = logging.getLogger("devicemem.bayesdream")

# The technical model's observation distributions (one Pyro model each, bayesDREAM_ext.model).
DISTRIBUTIONS = ("negbinom", "normal", "studentt", "binomial", "multinomial")
COUNT_DISTRIBUTIONS = ("negbinom", "binomial", "multinomial")


@dataclass(frozen=True)
class TechnicalData:
    """Validated inputs, cells first, restricted to the features that can be fitted.

    ``counts`` is [N, T_fit] ([N, T_fit, K] for multinomial) float32, a float32
    ``scipy.sparse.csr_matrix`` when the input was sparse (not for binomial, whose
    denominator is dense): training densifies it one chunk of cells at a time; ``groups`` [N] int64
    codes with 0 the baseline (``group_levels[code]`` is the user's label); ``sum_factors``
    [N] (ones where the distribution does not use them); ``denominator`` [N, T_fit] for
    binomial. ``feature_mask`` [T] is True for the fitted features; ``excluded`` counts the
    excluded ones by reason.
    """

    distribution: str
    counts: Tensor
    groups: Tensor
    sum_factors: Tensor
    denominator: Tensor | None
    feature_mask: np.ndarray
    group_levels: tuple[Any, ...]
    feature_names: tuple[str, ...] | None
    excluded: dict[str, int]

    @property
    def n_cells(self) -> int:
        return int(self.counts.shape[0])

    @property
    def n_features(self) -> int:
        """Features fitted (T_fit); ``feature_mask.size`` is the full T."""
        return int(self.counts.shape[1])

    @property
    def n_groups(self) -> int:
        return len(self.group_levels)

    @property
    def n_categories(self) -> int:
        return int(self.counts.shape[2]) if len(self.counts.shape) == 3 else 1


def check_distribution(distribution: Any) -> str:
    """The distribution name, or ValueError listing the accepted ones."""
    return check_choice(distribution, DISTRIBUTIONS, "distribution")


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _is_anndata(obj: Any) -> bool:
    return all(hasattr(obj, name) for name in ("X", "obs_names", "var_names"))


def _as_array(values: Any, what: str) -> tuple[np.ndarray | spmatrix, tuple[tuple[str, ...] | None, tuple[str, ...] | None]]:
    """(dense array or CSR matrix, (row names, column names) where the container has them)."""
    names: tuple[tuple[str, ...] | None, tuple[str, ...] | None] = (None, None)
    if _is_anndata(values):
        names = tuple(map(str, values.obs_names)), tuple(map(str, values.var_names))
        values = values.X
    elif hasattr(values, "to_numpy") and hasattr(values, "columns"):
        names = tuple(map(str, values.index)), tuple(map(str, values.columns))
        if any(hasattr(dtype, "sparse") for dtype in values.dtypes):
            from scipy.sparse import csr_matrix

            values = csr_matrix(values.sparse.to_coo())
        else:
            values = values.to_numpy()
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    if issparse(values):
        return values.tocsr(), names
    try:
        array = np.asarray(values)
    except Exception as exc:
        raise ValueError(f"{what}: expected a numpy array, scipy.sparse matrix, pandas DataFrame or AnnData; got {type(values).__name__}") from exc
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ValueError(f"{what}: expected numeric values; got dtype {array.dtype}")
    return array, names


def _stored_values(matrix: np.ndarray | spmatrix) -> np.ndarray:
    """The explicitly stored values (all of a dense array), for value checks without densifying."""
    return matrix.data if issparse(matrix) else np.asarray(matrix).ravel()


def _check_values(matrix: np.ndarray | spmatrix, what: str, integer: bool, non_negative: bool) -> None:
    """ValueError for NaN/inf, negative or fractional values, checked in chunks so that the
    temporaries stay small next to the data."""
    values = _stored_values(matrix)
    chunk = 1 << 22
    for start in range(0, values.size, chunk):
        part = values[start : start + chunk]
        for problem, bad in (
            ("NaN or infinite values; they must be finite", lambda: ~np.isfinite(part)),
            (f"values beyond float32's range (|x| > {FLOAT32_MAX:.3g}); they would become infinite",
             lambda: np.abs(part) > FLOAT32_MAX if part.dtype.kind == "f" and part.dtype.itemsize > 4 else None),
            ("negative values; they must be >= 0", lambda: part < 0 if non_negative else None),
            ("non-integer values; this distribution needs integer counts", lambda: part != np.round(part) if integer else None),
        ):
            found = bad()
            if found is not None and found.any():
                first = int(np.argmax(found))
                raise ValueError(f"{what}: has {problem} (e.g. {part[first]:g} at stored position {start + first})")


def _orient(matrix: np.ndarray | spmatrix, cells_axis: int, ndim: int) -> np.ndarray | spmatrix:
    """Cells first: [N, T] or [N, T, K]."""
    if cells_axis == 0:
        return matrix
    return matrix.T.tocsr() if issparse(matrix) else np.swapaxes(matrix, 0, 1)


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


def _sum_factors(
    sum_factors: Any, counts: np.ndarray, distribution: str, n_cells: int
) -> np.ndarray:
    if sum_factors is None:
        if distribution != "negbinom":
            return np.ones(n_cells, dtype=np.float32)
        totals = np.asarray(counts.sum(axis=1)).ravel() if issparse(counts) else counts.reshape(n_cells, -1).sum(axis=1)
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
    counts: np.ndarray, groups: np.ndarray, denominator: np.ndarray | None, distribution: str, n_groups: int
) -> dict[str, np.ndarray]:
    """Boolean [T] masks of features that cannot be fitted, by reason (bayesDREAM's filters);
    ``counts`` (and ``denominator``) cells first, ``groups`` codes 0..n_groups-1."""
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
    if issparse(counts):
        top, bottom = (np.asarray(m.toarray()).ravel() for m in (counts.max(axis=0), counts.min(axis=0)))
        return {"zero NTC counts": (top == 0) & (bottom == 0), "zero std": top == bottom}
    reasons = {"zero NTC counts": ~counts.any(axis=0), "zero std": _constant(counts)}
    if distribution == "binomial":
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


def prepare_technical(
    counts: Any,
    groups: Any,
    sum_factors: Any = None,
    *,
    distribution: str = "negbinom",
    denominator: Any = None,
    cells_axis: int = 0,
) -> TechnicalData:
    """Check and convert ``fit_technical``'s data arguments; ValueError for every bad input."""
    check_distribution(distribution)
    if cells_axis not in (0, 1) or isinstance(cells_axis, bool):
        raise ValueError(f"cells_axis: expected 0 (cells x features) or 1 (features x cells); got {cells_axis!r}")
    matrix, axis_names = _as_array(counts, "counts")
    ndim = 2 if issparse(matrix) else matrix.ndim
    expected_ndim = 3 if distribution == "multinomial" else 2
    if ndim != expected_ndim:
        form = "[cells, features, categories]" if expected_ndim == 3 else "[cells, features]"
        raise ValueError(f"counts: distribution {distribution!r} needs {expected_ndim}-D counts {form}; got {ndim}-D")
    _check_values(matrix, "counts", integer=distribution in COUNT_DISTRIBUTIONS, non_negative=distribution in COUNT_DISTRIBUTIONS)
    matrix = _orient(matrix, cells_axis, ndim)
    n_cells = matrix.shape[0]
    if n_cells == 0 or matrix.shape[1] == 0:
        raise ValueError(f"counts: empty matrix of shape {tuple(matrix.shape)}")
    if _stored_values(matrix).size == 0 or not _stored_values(matrix).any():
        raise ValueError("counts: every value is zero; nothing to fit")
    keep_sparse = issparse(matrix) and distribution != "binomial"
    values = matrix.astype(np.float32) if keep_sparse else (matrix.toarray() if issparse(matrix) else np.asarray(matrix)).astype(np.float32, copy=False)

    codes, levels = _group_codes(groups, n_cells)
    sizes = np.bincount(codes, minlength=len(levels))
    small = [f"{levels[g]!r} ({int(sizes[g])} cell{'s' if sizes[g] != 1 else ''})" for g in range(len(levels)) if sizes[g] < 2]
    if small:
        raise ValueError(f"groups: every technical group needs at least 2 NTC cells; too few in {', '.join(small)}")

    denom = None
    if distribution == "binomial":
        if denominator is None:
            raise ValueError("denominator: distribution 'binomial' needs a denominator matrix (same shape as counts)")
        denom_matrix, _ = _as_array(denominator, "denominator")
        _check_values(denom_matrix, "denominator", integer=True, non_negative=True)
        denom_matrix = _orient(denom_matrix, cells_axis, 2)
        denom = (denom_matrix.toarray() if issparse(denom_matrix) else np.asarray(denom_matrix)).astype(np.float32, copy=False)
        if denom.shape != values.shape:
            raise ValueError(f"denominator: shape {denom.shape} (cells first) differs from counts' {values.shape}")
        if (denom < values).any():
            raise ValueError(f"denominator: {int((denom < values).sum())} value(s) are smaller than the counts; need denominator >= counts")
    elif denominator is not None:
        raise ValueError(f"denominator: only the 'binomial' distribution uses one; got one with {distribution!r}")

    factors = _sum_factors(sum_factors, values, distribution, n_cells)
    reasons = exclusion_masks(values, codes, denom, distribution, len(levels))
    excluded_mask = np.zeros(values.shape[1], dtype=bool)
    excluded = {}
    for reason, mask in reasons.items():
        excluded[reason] = int((mask & ~excluded_mask).sum())
        excluded_mask |= mask
    keep = ~excluded_mask
    if not keep.any():
        raise ValueError(f"counts: no feature left to fit after excluding {values.shape[1]} ({_describe(excluded)})")
    if excluded_mask.any():
        logger.warning(
            "%d of %d feature(s) excluded from the fit (%s); their effects are reported as no effect "
            "and their baselines as NaN", int(excluded_mask.sum()), values.shape[1], _describe(excluded),
        )
    return TechnicalData(
        distribution=distribution,
        counts=_kept(values, keep),
        groups=torch.from_numpy(codes),
        sum_factors=torch.from_numpy(factors),
        denominator=None if denom is None else _kept(denom, keep),
        feature_mask=keep,
        group_levels=levels,
        feature_names=axis_names[1 - cells_axis],
        excluded={reason: n for reason, n in excluded.items() if n},
    )


def _kept(values: np.ndarray | csr_matrix, keep: np.ndarray) -> Tensor | csr_matrix:
    """The kept features of [N, T, ...] ``values`` as a contiguous tensor (no copy when all are
    kept and ``values`` is already contiguous); a CSR matrix stays one."""
    if issparse(values):
        return values if keep.all() else values[:, keep].tocsr()
    return torch.from_numpy(np.ascontiguousarray(values if keep.all() else values[:, keep]))


def _describe(excluded: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in excluded.items() if n) or "none"

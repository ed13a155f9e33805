"""Reading a bayesDREAM object's technical-fit inputs and writing our fit back into it.

bayesDREAM is not a dependency: the object is duck-typed (``meta``, ``modalities``,
``cis_gene``), and pandas, which such an object always brings, is only imported to create a
``counts_meta`` table that the object lacks. :func:`read_inputs` takes what bayesDREAM's own ``fit_technical`` takes (the NTC
cells of ``meta``, their ``technical_group_code`` and sum factors, the counts as stored, the
modality's distribution); :func:`write_back` stores the results under the names and shapes its
``fit_cis`` / ``fit_trans`` read:

- gene modality: ``alpha_y_prefit_mult`` (negbinom) or ``alpha_y_prefit_add`` [S, C, T'],
  ``alpha_y_type = 'posterior'``, ``posterior_samples_technical``, ``loss_technical``;
- with a cis gene fitted from the object's ``counts``: ``alpha_x_prefit`` [S, C] and
  ``alpha_x_type`` on the object, the cis gene's sites on the ``cis`` modality, and T' = the
  features without the cis gene in every feature-wise site of the gene modality;
- per-feature flags (``ntc_zero_count``, ``ntc_zero_std``, ``ntc_single_category``,
  ``ntc_excluded_from_fit``, ``technical_correction_applied``) in ``counts_meta`` when the
  object's ``counts`` were fitted, else in the modality's ``feature_meta``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from bayesDREAM_ext.counts import Counts, issparse
from bayesDREAM_ext.data import exclusion_masks

if TYPE_CHECKING:
    from bayesDREAM_ext.records import TechnicalFit

logger = logging.getLogger("devicemem.bayesdream")

NTC = "ntc"
GROUP_COLUMN = "technical_group_code"
# The flag columns and the exclusion reasons (bayesDREAM_ext.data) each one reports.
FLAG_REASONS = {
    "ntc_zero_count": ("zero NTC counts",),
    "ntc_zero_std": ("zero std", "a group all at 0 or all at the denominator"),
    "ntc_single_category": ("<= 1 category present in every group",),
}
# Feature-wise sites that lose the cis gene, and their names on the cis modality.
CIS_SITES = {"log2_alpha_y": "log2_alpha_x", "alpha_y_mul": "alpha_x_mul", "delta_y_add": "delta_x_add", "o_y": "o_x", "mu_ntc": "mu_ntc"}


def is_bayesdream_object(obj: Any) -> bool:
    """Whether ``obj`` looks like a bayesDREAM model (``meta``, ``modalities``, ``cis_gene``)."""
    return all(hasattr(obj, name) for name in ("meta", "modalities", "cis_gene"))


@dataclass(frozen=True)
class ObjectInputs:
    """The arrays to fit (features x cells ([T, N, K] for multinomial), NTC cells only) and
    where the results go.

    ``cis_index`` is the cis gene's row in ``counts`` when it is fitted with the gene modality
    (the object's own ``counts`` hold it), else None.
    """

    modality_name: str
    distribution: str
    counts: np.ndarray
    groups: np.ndarray
    sum_factors: np.ndarray | None
    denominator: np.ndarray | None
    cis_index: int | None
    from_object_counts: bool


def _modality(model_obj: Any, name: str) -> Any:
    getter = getattr(model_obj, "get_modality", None)
    if getter is not None:
        return getter(name)
    if name not in model_obj.modalities:
        raise ValueError(f"modality: {name!r} is not one of the object's modalities ({', '.join(model_obj.modalities)})")
    return model_obj.modalities[name]


def _is_frame(values: Any) -> bool:
    return hasattr(values, "columns") and hasattr(values, "index") and hasattr(values, "to_numpy")


def _array(values: Any) -> Any:
    """A DataFrame's values, a sparse matrix as it is, anything else as a numpy array."""
    if _is_frame(values):
        return values.to_numpy()
    return values if issparse(values) else np.asarray(values)


def _source(model_obj: Any, name: str, modality: Any) -> tuple[Any, list[str], int, bool]:
    """(counts, their cell names, cells axis, whether they are the object's own ``counts``).

    Like bayesDREAM, the primary modality is fitted from the object's ``counts`` (which keep
    the cis gene); other modalities from their own counts.
    """
    meta_cells = list(model_obj.meta["cell"])
    if name == getattr(model_obj, "primary_modality", None) and getattr(model_obj, "counts", None) is not None:
        counts = model_obj.counts
        cells = list(counts.columns) if _is_frame(counts) else meta_cells[: counts.shape[1]]
        return _array(counts), cells, 1, True
    axis = 1 if np.ndim(modality.counts) == 3 else getattr(modality, "cells_axis", 1)
    cells = getattr(modality, "cell_names", None)
    cells = list(cells) if cells is not None else meta_cells[: modality.counts.shape[axis]]
    return _array(modality.counts), cells, axis, False


def _features_first(values: Any, cells: list[int], axis: int) -> np.ndarray:
    """The ``cells`` of ``values`` (cells on ``axis``; sparse matrices densified only for
    those), features first: [T, N] or [T, N, K]."""
    if issparse(values):
        values = (values.tocsc()[:, cells] if axis == 1 else values.tocsr()[cells, :]).toarray()
        return values if axis == 1 else values.T
    return np.moveaxis(np.take(values, cells, axis=axis), axis, 1)


def read_inputs(model_obj: Any, sum_factor_col: str | None, modality: str | None, distribution: str | None) -> ObjectInputs:
    """The NTC cells' counts (features x cells), group codes and sum factors of ``modality``
    (default: the primary one); ValueError naming what is missing before any fitting."""
    meta = model_obj.meta
    for column in ("cell", "target", GROUP_COLUMN):
        if column not in meta.columns:
            hint = " (call set_technical_groups(covariates) first)" if column == GROUP_COLUMN else ""
            raise ValueError(f"model_obj: meta has no {column!r} column{hint}")
    name = modality if modality is not None else getattr(model_obj, "primary_modality", None)
    if name is None:
        raise ValueError("modality: the object has no primary_modality; name the modality to fit")
    mod = _modality(model_obj, name)
    distribution = distribution if distribution is not None else mod.distribution
    counts, cells, axis, from_object = _source(model_obj, name, mod)
    if from_object and model_obj.cis_gene is not None and "cis" in model_obj.modalities and distribution != "negbinom":
        raise ValueError(f"distribution: the cis gene needs 'negbinom' on the primary modality; got {distribution!r}")

    rows = meta.set_index("cell")
    known = rows.index.intersection(cells)
    all_codes = set(rows.loc[known, GROUP_COLUMN].tolist())
    ntc = [i for i, cell in enumerate(cells) if cell in rows.index and rows.at[cell, "target"] == NTC]
    if not ntc:
        raise ValueError(f"model_obj: no NTC cells (meta 'target' == {NTC!r}) among modality {name!r}'s cells")
    ntc_rows = rows.loc[[cells[i] for i in ntc]]
    groups = ntc_rows[GROUP_COLUMN].to_numpy()
    missing = sorted(all_codes - set(groups.tolist()))
    if missing:
        raise ValueError(f"model_obj: technical group code(s) {missing} have no NTC cell; every group needs NTC cells")
    if sorted(all_codes) != list(range(len(all_codes))):
        raise ValueError(f"model_obj: meta {GROUP_COLUMN!r} must be the codes 0..C-1; got {sorted(all_codes)}")

    sum_factors = None
    if distribution == "negbinom" and sum_factor_col is not None:
        if sum_factor_col not in meta.columns:
            raise ValueError(f"sum_factor_col: meta has no column {sum_factor_col!r}")
        sum_factors = ntc_rows[sum_factor_col].to_numpy(dtype=np.float64)
    denominator = getattr(mod, "denominator", None)
    cis_index = None
    if from_object and model_obj.cis_gene is not None and "cis" in model_obj.modalities:
        genes = list(model_obj.counts.index) if _is_frame(model_obj.counts) else []
        cis_index = genes.index(model_obj.cis_gene) if model_obj.cis_gene in genes else None
    return ObjectInputs(
        modality_name=name,
        distribution=distribution,
        counts=_features_first(counts, ntc, axis),
        groups=groups.astype(np.int64),
        sum_factors=sum_factors,
        denominator=None if denominator is None else _features_first(_array(denominator), ntc, axis),
        cis_index=cis_index,
        from_object_counts=from_object,
    )


def feature_flags(inputs: ObjectInputs, n_groups: int) -> dict[str, np.ndarray]:
    """bayesDREAM's per-feature flag columns (one value per feature of ``inputs.counts``)."""
    counts = Counts(torch.from_numpy(np.moveaxis(inputs.counts, 1, 0)))
    denominator = None if inputs.denominator is None else Counts(torch.from_numpy(np.moveaxis(inputs.denominator, 1, 0)))
    masks = exclusion_masks(counts, inputs.groups, denominator, inputs.distribution, n_groups)
    flags = {
        column: np.logical_or.reduce([masks[r] for r in reasons if r in masks] or [np.zeros(counts.shape[1], bool)])
        for column, reasons in FLAG_REASONS.items()
    }
    excluded = np.logical_or.reduce(list(masks.values()))
    return {**flags, "ntc_excluded_from_fit": excluded, "technical_correction_applied": ~excluded}


def _set_flags(model_obj: Any, modality: Any, inputs: ObjectInputs, flags: dict[str, np.ndarray]) -> None:
    n_features = len(flags["ntc_excluded_from_fit"])
    if inputs.from_object_counts:
        import pandas as pd

        counts = model_obj.counts
        index = counts.index if _is_frame(counts) else pd.RangeIndex(n_features)
        table = getattr(model_obj, "counts_meta", None)
        table = pd.DataFrame(index=index) if table is None else table.reindex(index)
        model_obj.counts_meta = table
    else:
        table = modality.feature_meta
        if len(table) != n_features:
            raise ValueError(f"model_obj: modality feature_meta has {len(table)} rows but the counts have {n_features} features")
    for column, values in flags.items():
        table[column] = values


def _without(samples: dict[str, Tensor], index: int, n_features: int) -> dict[str, Tensor]:
    """Every feature-wise site (feature axis last; ``beta_o`` has none) without feature ``index``."""
    keep = torch.arange(n_features) != index
    return {name: value if name == "beta_o" else value[..., keep] for name, value in samples.items()}


def _cis_samples(samples: dict[str, Tensor], index: int) -> dict[str, Tensor]:
    """The cis gene's sites, renamed as bayesDREAM stores them on its ``cis`` modality."""
    cis = {new: samples[old][..., index : index + 1] for old, new in CIS_SITES.items() if old in samples}
    cis["alpha_x_mult"] = samples["alpha_y_mult"][..., index : index + 1]
    cis["alpha_x"] = cis["alpha_x_mult"]
    cis["alpha_x_add"] = samples["alpha_y_add"][..., index : index + 1]
    return cis


def write_back(model_obj: Any, inputs: ObjectInputs, fit: TechnicalFit) -> None:
    """Store ``fit`` where bayesDREAM's own ``fit_technical`` stores its results."""
    modality = _modality(model_obj, inputs.modality_name)
    samples = dict(fit.posterior_samples)
    additive = modality.distribution != "negbinom"
    samples["alpha_y"] = samples["alpha_y_add"] if additive else samples["alpha_y_mult"]
    _set_flags(model_obj, modality, inputs, feature_flags(inputs, len(fit.group_levels)))
    if inputs.cis_index is not None:
        model_obj.alpha_x_prefit = samples["alpha_y_mult"][..., inputs.cis_index]
        model_obj.alpha_x_type = "posterior"
        _modality(model_obj, "cis").posterior_samples_technical = _cis_samples(samples, inputs.cis_index)
        samples = _without(samples, inputs.cis_index, fit.feature_mask.numel())
        logger.info("fit_technical: cis gene %r -> alpha_x_prefit %s", model_obj.cis_gene, tuple(model_obj.alpha_x_prefit.shape))
    modality.alpha_y_type = "posterior"
    if additive:
        modality.alpha_y_prefit_add = samples["alpha_y_add"]
    else:
        modality.alpha_y_prefit_mult = samples["alpha_y_mult"]
    modality.posterior_samples_technical = samples
    modality.loss_technical = list(fit.losses)
    if getattr(modality, "is_exon_skipping", lambda: False)():
        modality.mark_technical_fit_complete()
    logger.info("fit_technical: results stored in modality %r", inputs.modality_name)

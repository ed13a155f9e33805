"""Which cells are non-targeting controls (NTC): the technical fit uses only those.

bayesDREAM fits technical effects on NTC cells alone; a guide's target column in the cell
metadata tells them apart (bayesDREAM's own convention: ``target == "ntc"``). Without a
selection every cell given is taken as an NTC cell, and :data:`ALL_CELLS_NTC` says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

ALL_CELLS_NTC = (
    "No NTC selection given: every cell is taken as an NTC (non-targeting control) cell. To fit only "
    "the controls, select them from the metadata: --ntc-col COL --ntc-value VALUE on the command line, "
    "select_ntc(meta, COL, VALUE) in Python."
)
SHOWN_VALUES = 12


def _values_listed(column: pd.Series) -> str:
    """The column's most frequent values with their counts, for an error message."""
    counts = column.astype(str).value_counts()
    shown = ", ".join(f"{value!r} ({n})" for value, n in counts.head(SHOWN_VALUES).items())
    more = len(counts) - SHOWN_VALUES
    return shown + (f" and {more} more" if more > 0 else "")


def _as_list(values: Any | Sequence[Any]) -> list[str]:
    """One value or a sequence of them, as text."""
    items = [values] if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) else list(values)
    return [str(value) for value in items]


def select_ntc(meta: pd.DataFrame, column: str, values: Any | Sequence[Any]) -> np.ndarray:
    """Boolean mask [len(meta)] of the cells whose ``meta[column]`` is one of ``values`` (one
    value or a list of them), compared as text so that ``"0"`` from a command line matches an
    integer column. ValueError naming the columns that exist when ``column`` does not, the
    values the column holds when none matches, and when the selection leaves fewer than 2 cells."""
    if column not in meta.columns:
        raise ValueError(f"ntc-col: no column {column!r} in the cell metadata; it has {', '.join(map(str, meta.columns)) or 'no columns'}")
    wanted = _as_list(values)
    if not wanted:
        raise ValueError("ntc-value: expected at least one value")
    text = meta[column].astype(str)
    mask = text.isin(wanted).to_numpy()
    n = int(mask.sum())
    if n == 0:
        raise ValueError(
            f"ntc-value: no cell has {column} in {wanted}; the column holds {_values_listed(meta[column])}"
        )
    if n < 2:
        raise ValueError(f"ntc-value: only {n} cell has {column} in {wanted}; the technical fit needs at least 2 NTC cells")
    return mask


def describe_ntc(mask: np.ndarray, column: str, values: Any | Sequence[Any]) -> str:
    """One line for the log: how many cells the selection took."""
    wanted = _as_list(values)
    return f"NTC cells: {int(np.sum(mask))} of {len(mask)} cells have {column} in {wanted}"


def choose_ntc(
    n_cells: int, meta: pd.DataFrame | None, ntc: Any = None, column: str | None = None, values: Any = None
) -> tuple[np.ndarray | None, str]:
    """(the NTC cells as a boolean mask [n_cells], or None for every cell; a line saying which)
    from ``ntc`` (a boolean mask, or the indices of the NTC cells) or from ``column`` and
    ``values`` of the cell metadata ``meta`` (:func:`select_ntc`). ValueError when both ways,
    or half of the second, are given."""
    if ntc is not None and (column is not None or values is not None):
        raise ValueError("ntc: give either ntc= (the NTC cells) or ntc_col= with ntc_value=, not both")
    if (column is None) != (values is None):
        given, missing = ("ntc_col", "ntc_value") if values is None else ("ntc_value", "ntc_col")
        raise ValueError(f"{missing}: {given} was given without it; the NTC cells are those whose ntc_col column is one of ntc_value")
    if column is not None:
        if meta is None:
            raise ValueError(f"ntc_col: {column!r} names a column of the cell metadata, but the counts came with none; pass meta= "
                             "(--meta FILE): a table with one row per cell")
        mask = select_ntc(meta, column, values)
        return mask, describe_ntc(mask, column, values)
    if ntc is None:
        return None, f"NTC cells: all {n_cells} cells (no NTC selection given)"
    mask = _mask(ntc, n_cells)
    return mask, f"NTC cells: {int(mask.sum())} of {n_cells} cells (given as ntc=)"


def _mask(ntc: Any, n_cells: int) -> np.ndarray:
    """A boolean mask [n_cells] from a boolean mask or cell indices; ValueError otherwise."""
    chosen = np.asarray(ntc.to_numpy() if hasattr(ntc, "to_numpy") else ntc)
    if chosen.dtype == bool:
        if chosen.shape != (n_cells,):
            raise ValueError(f"ntc: a boolean mask needs one value per cell ({n_cells}); got shape {chosen.shape}")
        mask = chosen
    elif chosen.ndim == 1 and np.issubdtype(chosen.dtype, np.integer):
        if chosen.size and (chosen.min() < 0 or chosen.max() >= n_cells):
            raise ValueError(f"ntc: cell indices must be in [0, {n_cells}); got {chosen.min()} .. {chosen.max()}")
        mask = np.zeros(n_cells, dtype=bool)
        mask[chosen] = True
    else:
        raise ValueError(f"ntc: expected a boolean mask or integer indices of the NTC cells; got dtype {chosen.dtype}")
    if mask.sum() < 2:
        raise ValueError(f"ntc: selects {int(mask.sum())} cell(s); the technical fit needs at least 2 NTC cells")
    return mask

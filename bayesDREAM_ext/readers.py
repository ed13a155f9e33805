"""Counts files as single-cell users have them, read into one record, cells first.

Formats (``.gz`` wherever the format allows it): a 10x directory (Cell Ranger v3
``matrix.mtx.gz`` + ``features.tsv.gz`` + ``barcodes.tsv.gz``, or v2 ``matrix.mtx`` +
``genes.tsv`` + ``barcodes.tsv``; an ``outs/`` folder or the run folder above it is searched for
``filtered_feature_bc_matrix/``, ``filtered_gene_bc_matrices/<genome>/`` or
``filtered_feature_bc_matrix.h5``), a 10x ``.h5`` (v3 and v2, via h5py), a Matrix Market
``.mtx`` (a 10x set when ``barcodes.tsv`` lies beside it), ``.h5ad`` (AnnData's ``X``, a layer
or ``raw``), ``.npz`` (scipy.sparse or one numpy array) and ``.csv`` / ``.tsv`` (dense, first
row = column names, first column = row names). Each is read with the field's library (scipy.io,
h5py, anndata, pandas); sparse stays sparse.

In memory, :func:`load` takes the same role for everything ``fit_technical`` accepts: a path
(read as above), a :class:`CountsFile`, an AnnData object, a pandas DataFrame, a numpy array, a
scipy.sparse matrix or a torch tensor. Every input, from the command line or from Python,
becomes a :class:`CountsFile` here and nowhere else.

The orientation comes from the format where it fixes one (10x: features x cells; AnnData: cells
x features), else from which axis the metadata, the cell names, the number of cells (the
groups' length) or the feature names match, else ``cells_axis`` must be given;
:attr:`CountsFile.orientation` says which it was.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bayesDREAM_ext.counts import issparse, scipy_sparse
from bayesDREAM_ext.extras import MissingDependencyError, require

if TYPE_CHECKING:
    import pandas as pd
    from scipy.sparse import csr_matrix

__all__ = ["CountsFile", "MissingDependencyError", "detect_cells_axis", "load", "read_10x_h5", "read_10x_mtx",
           "read_counts", "read_h5ad", "read_meta"]

logger = logging.getLogger("devicemem.bayesdream")

CELLS_AXIS_HINT = "pass --cells-axis 0 (cells x features) or 1 (features x cells); cells_axis= in Python"
GENE_EXPRESSION = "Gene Expression"
TENX_MATRIX_DIRS = ("filtered_feature_bc_matrix", "outs/filtered_feature_bc_matrix")
TENX_V2_DIRS = ("filtered_gene_bc_matrices", "outs/filtered_gene_bc_matrices")
TENX_H5 = ("filtered_feature_bc_matrix.h5", "outs/filtered_feature_bc_matrix.h5")
SUFFIXES = (".h5ad", ".h5", ".mtx", ".npz", ".csv", ".tsv")


@dataclass(frozen=True)
class CountsFile:
    """What a counts file held, cells first.

    ``counts`` [cells, features] ([cells, features, categories] for multinomial arrays): a
    ``scipy.sparse.csr_matrix`` when the input is sparse, else a numpy array, with the input's
    dtype. ``cell_names`` / ``feature_names`` are None where the input has none. ``cell_meta``
    has one row per cell in ``counts``' order (AnnData's ``obs``, then the columns of any
    metadata table given; no columns when there is neither), or is None for an array or
    matrix without names or metadata (so that pandas is not needed for them).
    ``feature_meta`` holds 10x's feature ids and types (None for other formats).
    ``cells_axis`` is the file's axis that held the cells, ``orientation`` why.
    """

    counts: np.ndarray | csr_matrix
    cell_names: tuple[str, ...] | None
    feature_names: tuple[str, ...] | None
    cell_meta: pd.DataFrame | None
    orientation: str
    cells_axis: int
    source: str
    feature_meta: pd.DataFrame | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(cells, features)."""
        return int(self.counts.shape[0]), int(self.counts.shape[1])

    def take_cells(self, mask: np.ndarray) -> CountsFile:
        """The cells where the boolean ``mask`` [cells] is True, names and metadata alike."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (self.shape[0],):
            raise ValueError(f"mask: expected {self.shape[0]} booleans (one per cell); got shape {mask.shape}")
        names = None if self.cell_names is None else tuple(np.asarray(self.cell_names, dtype=object)[mask])
        meta = None if self.cell_meta is None else self.cell_meta.loc[mask]
        return replace(self, counts=self.counts[mask], cell_names=names, cell_meta=meta)


def _require(module: str, what: str) -> Any:
    return require(module, f"reading {what}")


def _pandas() -> Any:
    return _require("pandas", "names and metadata tables")


def _kind(path: Path) -> str:
    """The format of ``path``: "10x-dir", or one of SUFFIXES (a trailing .gz ignored)."""
    if path.is_dir():
        return "10x-dir"
    name = path.name.lower().removesuffix(".gz")
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix
    raise ValueError(
        f"counts: cannot read {path.name!r}; expected a 10x directory or a file ending in "
        f"{', '.join(SUFFIXES)} (.mtx, .csv and .tsv may be gzipped)"
    )


def _first(folder: Path, names: Sequence[str]) -> Path | None:
    """The first of ``names`` (each also tried with .gz) that exists in ``folder``."""
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _tenx_folder(folder: Path) -> Path:
    """The folder holding ``matrix.mtx``, or a 10x ``.h5`` file, found in or under ``folder``."""
    if _first(folder, ["matrix.mtx"]) is not None:
        return folder
    for name in TENX_MATRIX_DIRS:
        if (folder / name).is_dir():
            return folder / name
    for name in TENX_V2_DIRS:
        genomes = sorted(p for p in (folder / name).glob("*") if p.is_dir())
        if len(genomes) == 1:
            return genomes[0]
        if genomes:
            listed = ", ".join(p.name for p in genomes)
            raise ValueError(f"counts: {folder / name} holds {len(genomes)} genomes ({listed}); pass one of them")
    for name in TENX_H5:
        if (folder / name).is_file():
            return folder / name
    found = ", ".join(sorted(p.name for p in folder.iterdir())[:12]) or "nothing"
    raise ValueError(
        f"counts: {str(folder)!r} is not a 10x directory: no matrix.mtx[.gz], filtered_feature_bc_matrix/, "
        f"filtered_gene_bc_matrices/<genome>/ or filtered_feature_bc_matrix.h5 in it (it has {found})"
    )


def _names(path: Path | str | Sequence[str] | None, what: str) -> tuple[str, ...] | None:
    """Names from a one-per-line file (first tab-separated column) or a sequence."""
    if path is None:
        return None
    if isinstance(path, (str, Path)):
        table = _pandas().read_csv(path, sep="\t", header=None, dtype=str, usecols=[0])
        return tuple(table.iloc[:, 0])
    names = tuple(map(str, path))
    if not names:
        raise ValueError(f"{what}: empty")
    return names


def _unique(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` with repeats made unique as scanpy does: the second "X" becomes "X-1"."""
    pd = _pandas()
    series = pd.Series(names, dtype=object)
    repeat = series.groupby(series).cumcount()
    return tuple(np.where(repeat > 0, series + "-" + repeat.astype(str), series))


def _tenx_features(table: pd.DataFrame, feature_type: str | None, source: str) -> tuple[np.ndarray, pd.DataFrame]:
    """(mask of the features kept, their metadata: id, name, type) from a 10x features table
    whose columns are id, name[, type]."""
    pd = _pandas()
    ids = table.iloc[:, 0].astype(str).to_numpy()
    names = table.iloc[:, 1].astype(str).to_numpy() if table.shape[1] > 1 else ids
    types = table.iloc[:, 2].astype(str).to_numpy() if table.shape[1] > 2 else np.full(ids.shape, GENE_EXPRESSION)
    keep = np.ones(ids.shape, dtype=bool) if feature_type is None else types == feature_type
    if not keep.any():
        raise ValueError(f"feature_type: no {feature_type!r} features in {source}; it has {', '.join(sorted(set(types)))}")
    if not keep.all():
        dropped = pd.Series(types[~keep]).value_counts()
        logger.info("%s: kept %d %s features, dropped %s", source, int(keep.sum()), feature_type,
                    ", ".join(f"{n} {kind}" for kind, n in dropped.items()))
    meta = pd.DataFrame({"id": ids[keep], "name": names[keep], "type": types[keep]})
    meta.index = pd.Index(_unique(meta["name"]), name="feature")
    return keep, meta


def _tenx_record(
    matrix: Any, barcodes: Sequence[str], features: pd.DataFrame, feature_type: str | None, source: str, layout: str
) -> CountsFile:
    """A 10x features x cells matrix (any scipy.sparse) as a cells-first CountsFile."""
    sparse = scipy_sparse("counts")

    n_features, n_cells = matrix.shape
    if len(barcodes) != n_cells or len(features) != n_features:
        raise ValueError(
            f"counts: {source} is {n_features} features x {n_cells} cells but lists {len(features)} features "
            f"and {len(barcodes)} barcodes"
        )
    keep, feature_meta = _tenx_features(features, feature_type, source)
    counts = sparse.csr_matrix(matrix.T)
    if not keep.all():
        counts = counts[:, keep]
    cells = tuple(map(str, barcodes))
    return CountsFile(
        counts=counts, cell_names=cells, feature_names=tuple(feature_meta.index), cell_meta=_pandas().DataFrame(index=list(cells)),
        orientation=f"{layout}: features x cells by definition, transposed", cells_axis=1, source=source, feature_meta=feature_meta,
    )


def read_10x_mtx(folder: str | Path, *, feature_type: str | None = GENE_EXPRESSION) -> CountsFile:
    """A 10x matrix folder (v3 features.tsv[.gz] or v2 genes.tsv, barcodes.tsv[.gz],
    matrix.mtx[.gz]), or an outs/ folder holding one. ``feature_type``: which features to keep
    (10x's third column; "Gene Expression" by default, as scanpy does; None keeps all)."""
    mmread = _require("scipy.io", "10x folders").mmread
    found = _tenx_folder(Path(folder))
    if found.is_file():
        return read_10x_h5(found, feature_type=feature_type)
    features_path = _first(found, ["features.tsv", "genes.tsv"])
    barcodes_path = _first(found, ["barcodes.tsv"])
    needed = (("features.tsv[.gz] or genes.tsv", features_path), ("barcodes.tsv[.gz]", barcodes_path))
    missing = [name for name, path in needed if path is None]
    if missing:
        raise ValueError(f"counts: the 10x folder {str(found)!r} has no {' and no '.join(missing)}")
    features = _pandas().read_csv(features_path, sep="\t", header=None, dtype=str)
    layout = "10x v3 folder" if features_path.name.startswith("features") else "10x v2 folder"
    matrix = mmread(_first(found, ["matrix.mtx"]))
    return _tenx_record(matrix, _names(barcodes_path, "barcodes"), features, feature_type, str(found), layout)


def _decoded(values: Any) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values[:]]


def read_10x_h5(path: str | Path, *, feature_type: str | None = GENE_EXPRESSION) -> CountsFile:
    """A Cell Ranger HDF5 matrix: v3 (group ``matrix`` with ``features/``) or v2 (one group per
    genome with ``genes`` / ``gene_names``; exactly one genome)."""
    h5py = _require("h5py", "10x .h5 files")
    sparse = scipy_sparse("counts")

    pd = _pandas()
    with h5py.File(path, "r") as store:
        if "matrix" in store:
            group, layout = store["matrix"], "10x v3 .h5"
            f = group["features"]
            columns = [_decoded(f["id"]), _decoded(f["name"])] + ([_decoded(f["feature_type"])] if "feature_type" in f else [])
        else:
            genomes = [name for name in store if isinstance(store[name], h5py.Group)]
            if len(genomes) != 1:
                raise ValueError(f"counts: {path} is not a 10x .h5 with one matrix (groups: {', '.join(store) or 'none'})")
            group, layout = store[genomes[0]], f"10x v2 .h5 ({genomes[0]})"
            columns = [_decoded(group["genes"]), _decoded(group["gene_names"])]
        shape = tuple(int(n) for n in group["shape"][:])
        matrix = sparse.csc_matrix((group["data"][:], group["indices"][:], group["indptr"][:]), shape=shape)
        barcodes = _decoded(group["barcodes"])
    return _tenx_record(matrix, barcodes, pd.DataFrame(dict(enumerate(columns))), feature_type, str(path), layout)


def read_h5ad(path: str | Path, *, layer: str | None = None) -> CountsFile:
    """An AnnData file: ``X`` (default), ``layers[layer]`` or, with ``layer="raw"``,
    ``raw.X`` with raw's feature names; ``obs`` becomes the cell metadata."""
    anndata = _require("anndata", ".h5ad files")
    return from_anndata(anndata.read_h5ad(path), layer=layer, source=str(path))


def from_anndata(adata: Any, *, layer: str | None = None, source: str = "AnnData") -> CountsFile:
    """An AnnData object's ``X`` (default), ``layers[layer]`` or ``raw.X`` (``layer="raw"``,
    with raw's feature names), cells x features, with ``obs`` as the cell metadata."""
    if layer is None:
        values, features, what = adata.X, adata.var_names, "X"
    elif layer == "raw":
        if adata.raw is None:
            raise ValueError(f"layer: {source} has no raw; layers: {', '.join(adata.layers) or 'none'}")
        values, features, what = adata.raw.X, adata.raw.var_names, "raw.X"
    elif layer in adata.layers:
        values, features, what = adata.layers[layer], adata.var_names, f"layers[{layer!r}]"
    else:
        others = "X, raw" if adata.raw is not None else "X"
        raise ValueError(f"layer: no layer {layer!r} in {source}; it has {', '.join(adata.layers) or 'none'} (and {others})")
    if values is None:
        raise ValueError(f"counts: {source} has no X; pass layer= one of {', '.join(adata.layers) or 'none'}")
    cells = tuple(map(str, adata.obs_names))
    meta = adata.obs.copy()
    meta.index = list(cells)
    return CountsFile(
        counts=_matrix(values, "counts"), cell_names=cells, feature_names=tuple(map(str, features)), cell_meta=meta,
        orientation=f"AnnData {what}: cells x features (obs x var) by definition", cells_axis=0, source=source,
    )


def _is_anndata(values: Any) -> bool:
    return all(hasattr(values, name) for name in ("X", "obs_names", "var_names"))


def _matrix(values: Any, what: str) -> np.ndarray | csr_matrix:
    """A scipy.sparse matrix or array as a csr_matrix, a torch tensor or anything array-like as
    a numeric numpy array; ValueError naming ``what`` for anything else."""
    if issparse(values):
        return scipy_sparse(what).csr_matrix(values)
    if hasattr(values, "detach") and hasattr(values, "cpu"):  # a torch tensor
        values = values.detach().cpu().numpy()
    try:
        array = np.asarray(values)
    except Exception as exc:
        raise ValueError(f"{what}: expected a numpy array, scipy.sparse matrix, pandas DataFrame, AnnData, torch tensor "
                         f"or a counts file; got {type(values).__name__}") from exc
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise ValueError(f"{what}: expected numeric values; got dtype {array.dtype}")
    return array


Matrix = tuple[Any, "tuple[str, ...] | None", "tuple[str, ...] | None"]  # (values, row names, column names)


def _frame(frame: pd.DataFrame, what: str, source: str) -> Matrix:
    """(values, row names, column names) of a pandas table of numbers (a sparse one stays sparse)."""
    pd = _pandas()
    text = [str(column) for column, dtype in frame.dtypes.items()
            if not (pd.api.types.is_numeric_dtype(dtype) or isinstance(dtype, pd.SparseDtype))]
    if text:
        raise ValueError(
            f"{what}: {source} has non-numeric columns ({', '.join(text[:5])}); expected numbers with one column of row names first"
        )
    names = tuple(map(str, frame.index)), tuple(map(str, frame.columns))
    if any(isinstance(dtype, pd.SparseDtype) for dtype in frame.dtypes):
        return scipy_sparse(what).csr_matrix(frame.sparse.to_coo()), *names
    return _matrix(frame.to_numpy(), what), *names


def _read_plain(path: Path, kind: str) -> Matrix:
    """(matrix as stored, row names, column names) of a .mtx, .npz, .csv or .tsv file."""
    if kind == ".mtx":
        return _matrix(_require("scipy.io", "Matrix Market files").mmread(path), "counts"), None, None
    if kind == ".npz":
        with np.load(path) as stored:
            if {"format", "indptr", "indices", "data", "shape"} <= set(stored.files):  # scipy.sparse.save_npz's layout
                return _matrix(scipy_sparse("counts").load_npz(path), "counts"), None, None
            if len(stored.files) != 1:
                raise ValueError(f"counts: {path} holds {len(stored.files)} arrays ({', '.join(stored.files)}); expected one")
            return _matrix(stored[stored.files[0]], "counts"), None, None
    frame = _pandas().read_csv(path, sep="\t" if kind == ".tsv" else ",", index_col=0)
    return _frame(frame, "counts", str(path))


def _names_match(names: Sequence[str] | None, meta: pd.DataFrame | None) -> bool:
    return names is not None and meta is not None and len(meta) > 0 and set(names) <= set(meta.index)


def detect_cells_axis(
    shape: tuple[int, int],
    *,
    row_names: Sequence[str] | None = None,
    column_names: Sequence[str] | None = None,
    meta: pd.DataFrame | None = None,
    n_cells: int | None = None,
    n_features: int | None = None,
    source: str = "counts",
    cells_from: str = "cell names",
    default: int | None = None,
) -> tuple[int, str]:
    """(the axis of a matrix that holds the cells, why), from the metadata's cell names, the
    metadata's length, or a known number of cells (``n_cells``, counted from ``cells_from``)
    or features; when none of them tells, ``default`` (arrays in Python: 0), else ValueError
    with the ``--cells-axis`` hint."""
    rows, columns = shape[:2]
    clues = []
    if meta is not None:
        clues.append((_names_match(row_names, meta), _names_match(column_names, meta), "the metadata's cell names"))
        clues.append((len(meta) == rows, len(meta) == columns, f"the metadata's {len(meta)} rows"))
    if n_cells is not None:
        clues.append((n_cells == rows, n_cells == columns, f"the {n_cells} {cells_from}"))
    if n_features is not None:
        clues.append((n_features == columns, n_features == rows, f"the {n_features} feature names"))
    for on_rows, on_columns, what in clues:
        if on_rows != on_columns:
            axis = 0 if on_rows else 1
            layout = "rows match {}: cells x features" if axis == 0 else "columns match {}: features x cells, transposed"
            return axis, layout.format(what)
    if n_cells is not None and n_cells not in (rows, columns):
        raise ValueError(f"counts: neither axis of {source} ({rows} x {columns}) has the {n_cells} cells of the {cells_from}")
    told = "; ".join(what for _, _, what in clues) or "no metadata or names were given"
    if default is not None:
        layout = "cells x features" if default == 0 else "features x cells"
        return default, f"{layout}, the convention for arrays: nothing tells the axes apart ({told}); cells_axis= turns them"
    raise ValueError(f"counts: cannot tell which axis of {source} ({rows} x {columns}) holds the cells ({told}); {CELLS_AXIS_HINT}")


def read_meta(meta: str | Path | pd.DataFrame) -> pd.DataFrame:
    """A cell metadata table: a DataFrame as is, or a .csv / .tsv[.gz] file whose first column
    holds the cell names; the index becomes strings."""
    pd = _pandas()
    if isinstance(meta, pd.DataFrame):
        frame = meta.copy()
    else:
        path = Path(meta)
        if not path.is_file():
            raise ValueError(f"meta: no such file {str(path)!r}")
        frame = pd.read_csv(path, sep="\t" if ".tsv" in path.name.lower() else ",", index_col=0)
    frame.index = frame.index.map(str)
    return frame


def _with_meta(record: CountsFile, meta: pd.DataFrame) -> CountsFile:
    """``record`` with ``meta``'s columns added to its cell metadata: by cell name when the
    counts have names, else row by row (lengths must agree; the cells then take the
    metadata's names)."""
    n = record.shape[0]
    if record.cell_names is None:
        if len(meta) != n:
            raise ValueError(f"meta: has {len(meta)} rows but the counts have {n} cells and no cell names to match")
        return replace(record, cell_names=tuple(meta.index), cell_meta=meta.copy())
    missing = [name for name in record.cell_names if name not in meta.index]
    if missing:
        raise ValueError(f"meta: {len(missing)} of the {n} cells of the counts are not in it, e.g. {missing[0]!r}")
    if meta.index.has_duplicates:
        raise ValueError(f"meta: repeats cell names, e.g. {meta.index[meta.index.duplicated()][0]!r}")
    if len(meta) > n:
        logger.info("meta: %d of its %d rows are cells of the counts; the other %d are left out", n, len(meta), len(meta) - n)
    aligned = meta.loc[list(record.cell_names)]
    if record.cell_meta is None or not len(record.cell_meta.columns):
        return replace(record, cell_meta=aligned)
    kept = record.cell_meta.drop(columns=[c for c in meta.columns if c in record.cell_meta.columns])
    return replace(record, cell_meta=kept.join(aligned.set_axis(kept.index)))


def _check_axis(cells_axis: Any) -> None:
    if cells_axis is not None and (isinstance(cells_axis, bool) or cells_axis not in (0, 1)):
        raise ValueError(f"cells_axis: expected 0 (cells x features), 1 (features x cells) or None (detect); got {cells_axis!r}")


def read_counts(
    path: str | Path,
    *,
    meta: str | Path | pd.DataFrame | None = None,
    cells_axis: int | None = None,
    layer: str | None = None,
    feature_type: str | None = GENE_EXPRESSION,
    cell_names: str | Path | Sequence[str] | None = None,
    feature_names: str | Path | Sequence[str] | None = None,
    n_cells: int | None = None,
) -> CountsFile:
    """Read any supported counts file or 10x directory (module docstring) into a cells-first
    :class:`CountsFile`, with ``meta`` (a table or .csv / .tsv, one row per cell, first column
    the cell names) aligned to its cells. ``cells_axis`` (0 or 1) overrides the detection for
    .mtx, .npz, .csv and .tsv; ``cell_names`` / ``feature_names`` name the rows or columns of
    those (a file with one name per line, or a sequence), ``n_cells`` tells their number;
    ``layer`` picks an AnnData layer; ``feature_type`` the 10x feature type kept ("Gene
    Expression"; None keeps all)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"counts: no such file or directory {str(path)!r}")
    _check_axis(cells_axis)
    kind = _kind(path)
    if kind == ".mtx" and cell_names is None and _first(path.parent, ["barcodes.tsv"]) is not None:
        kind, path = "10x-dir", path.parent
    table = None if meta is None else read_meta(meta)
    if kind in ("10x-dir", ".h5", ".h5ad"):
        _fixed_axis(cells_axis, {".h5ad": 0}.get(kind, 1), path.name)
        record = {"10x-dir": lambda: read_10x_mtx(path, feature_type=feature_type),
                  ".h5": lambda: read_10x_h5(path, feature_type=feature_type),
                  ".h5ad": lambda: read_h5ad(path, layer=layer)}[kind]()
    else:
        cells, features = _names(cell_names, "cell_names"), _names(feature_names, "feature_names")
        record = _oriented(_read_plain(path, kind), table, cells_axis, cells, features, path.name, str(path),
                           n_cells=len(cells) if cells is not None else n_cells)
    return record if table is None else _with_meta(record, table)


def _fixed_axis(cells_axis: int | None, fixed: int, source: str) -> None:
    if cells_axis is not None and cells_axis != fixed:
        raise ValueError(f"cells_axis: {source} holds cells on axis {fixed} by its format; got cells_axis={cells_axis}")


def _oriented(
    read: Matrix, meta: pd.DataFrame | None, cells_axis: int | None, cells: tuple[str, ...] | None,
    features: tuple[str, ...] | None, name: str, source: str, n_cells: int | None = None, cells_from: str = "cell names",
    default: int | None = None,
) -> CountsFile:
    """A matrix with its row and column names (as read), turned cells first."""
    matrix, row_names, column_names = read
    if matrix.ndim < 2:
        raise ValueError(f"counts: {name} holds a {matrix.ndim}-D array; expected a matrix [cells, features]")
    if cells_axis is None:
        cells_axis, why = detect_cells_axis(
            matrix.shape, row_names=row_names, column_names=column_names, meta=meta, n_cells=n_cells,
            n_features=None if features is None else len(features), source=name, cells_from=cells_from, default=default,
        )
    else:
        why = f"given: cells_axis={cells_axis} ({'cells x features' if cells_axis == 0 else 'features x cells, transposed'})"
    if cells_axis == 1:
        matrix = matrix.T.tocsr() if issparse(matrix) else np.swapaxes(matrix, 0, 1)
        row_names, column_names = column_names, row_names
    for given, axis, what in ((cells, 0, "cell_names"), (features, 1, "feature_names")):
        if given is not None and len(given) != matrix.shape[axis]:
            raise ValueError(f"{what}: {len(given)} names, but the counts have {matrix.shape[axis]} {('cells', 'features')[axis]}")
    cell_names = cells or row_names
    return CountsFile(
        counts=matrix, cell_names=cell_names, feature_names=features or column_names,
        cell_meta=None if cell_names is None else _pandas().DataFrame(index=list(cell_names)),
        orientation=why, cells_axis=cells_axis, source=source,
    )


def load(
    values: Any,
    *,
    what: str = "counts",
    meta: str | Path | pd.DataFrame | None = None,
    cells_axis: int | None = None,
    n_cells: int | None = None,
    cells_from: str = "group labels",
    layer: str | None = None,
    feature_type: str | None = GENE_EXPRESSION,
) -> CountsFile:
    """Anything ``fit_technical`` accepts as counts, as a cells-first :class:`CountsFile`: a
    path (:func:`read_counts`), a CountsFile (as it is), an AnnData object (:func:`from_anndata`),
    a pandas DataFrame, a numpy array, a scipy.sparse matrix or a torch tensor. The orientation
    of a matrix is ``cells_axis`` when given, else detected from ``meta`` and ``n_cells`` (a
    number of cells known from elsewhere, e.g. the groups' length; ``cells_from`` says which),
    else cells x features, Python's convention for arrays (a file has none: its orientation
    must be told then); ``meta`` is aligned to the cells (:func:`read_counts`)."""
    _check_axis(cells_axis)
    if isinstance(values, (str, os.PathLike)):
        return read_counts(values, meta=meta, cells_axis=cells_axis, layer=layer, feature_type=feature_type, n_cells=n_cells)
    table = None if meta is None else read_meta(meta)
    if isinstance(values, CountsFile):
        _fixed_axis(cells_axis, 0, f"a CountsFile ({values.source})")
        record = values
    elif _is_anndata(values):
        _fixed_axis(cells_axis, 0, f"an AnnData {what}")
        record = from_anndata(values, layer=layer, source=f"AnnData {what}")
    else:
        kind = type(values).__name__
        frame = hasattr(values, "columns") and hasattr(values, "to_numpy")
        read = _frame(values, what, kind) if frame else (_matrix(values, what), None, None)
        record = _oriented(read, table, cells_axis, None, None, f"{what} ({kind})", f"{what} ({kind})",
                           n_cells=n_cells, cells_from=cells_from, default=0)
    return record if table is None else _with_meta(record, table)

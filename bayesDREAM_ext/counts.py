"""The counts, in one form from ``fit_technical``'s entry to the last chunk of training.

Input of any kind (a file or 10x folder, AnnData, pandas, numpy, scipy.sparse, torch) is read
once, cells first, by :func:`bayesDREAM_ext.readers.load`; here its values are checked
(:func:`check_values`) and it becomes :class:`Counts`: float32, dense (a tensor) or sparse (a
CSR matrix that is never densified whole), with its shape and the statistics the model and
training need (per-cell totals, per-feature extremes, blocks of features, rows of cells, the
smallest exact dtype). Everything after asks the Counts, never whether they are sparse.

scipy is not a core dependency: a matrix can only be a ``scipy.sparse`` one when the caller has
loaded scipy, so :func:`issparse` looks it up only when it is already imported, and reading
sparse input asks for it with an install hint (:func:`scipy_sparse`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import cached_property
from types import ModuleType
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
from torch import Tensor

from bayesDREAM_ext.extras import require

if TYPE_CHECKING:
    from scipy.sparse import spmatrix

FLOAT32_MAX = float(np.finfo(np.float32).max)
# Exact integer ranges of the dtypes counts may be stored in, smallest first.
COMPACT_DTYPES = ((torch.uint8, 255), (torch.int16, 32767), (torch.int32, 2**31 - 1))
RawMatrix = Union[np.ndarray, "spmatrix"]


def issparse(value: Any) -> bool:
    """``scipy.sparse.issparse(value)``, False without importing scipy when it is not loaded."""
    module = sys.modules.get("scipy.sparse")
    return module is not None and module.issparse(value)


def scipy_sparse(what: str) -> ModuleType:
    """``scipy.sparse``; MissingDependencyError naming ``what`` and the install command without scipy."""
    return require("scipy.sparse", f"{what}: sparse input")


def input_ndim(matrix: RawMatrix) -> int:
    """The dimensions of a dense array or a sparse matrix (which has two)."""
    return 2 if issparse(matrix) else matrix.ndim


def _stored_values(matrix: RawMatrix) -> np.ndarray:
    """The explicitly stored values (all of a dense array), for value checks without densifying."""
    return matrix.data if issparse(matrix) else np.asarray(matrix).ravel()


def all_zero(matrix: RawMatrix) -> bool:
    """Whether a dense array or sparse matrix stores no value but zero."""
    values = _stored_values(matrix)
    return values.size == 0 or not values.any()


def check_values(matrix: RawMatrix, what: str, integer: bool, non_negative: bool) -> None:
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


def _compact_dtype(values: Tensor) -> torch.dtype:
    """The smallest dtype that holds ``values`` exactly: uint8, int16 or int32 for non-negative
    integers (checked in blocks, without a full-size temporary), else its own."""
    if values.is_floating_point():
        flat = values.reshape(-1)
        block = 1 << 22
        top = 0.0
        for start in range(0, flat.numel(), block):
            part = flat[start : start + block]
            if bool((part < 0).any()) or not bool((part == part.round()).all()):
                return values.dtype
            top = max(top, float(part.max()) if part.numel() else 0.0)
        for dtype, limit in COMPACT_DTYPES:
            if top <= limit:
                return dtype
    return values.dtype


@dataclass(frozen=True)
class Counts:
    """Cell-wise values, cells first ([N, T], [N, T, K], or [N] for a per-cell vector), made
    once: dense (``values`` a tensor) or ``sparse`` (a CSR matrix on the host, densified a block
    or a chunk at a time)."""

    values: Any
    sparse: bool = False

    @classmethod
    def from_input(cls, matrix: RawMatrix, keep_sparse: bool) -> Counts:
        """A checked input matrix, cells first (:func:`bayesDREAM_ext.readers.load`,
        :func:`check_values`), as float32: sparse when it is and ``keep_sparse``, else dense."""
        sparse = issparse(matrix)
        if sparse and keep_sparse:
            return cls(matrix.astype(np.float32), sparse=True)
        dense = matrix.toarray() if sparse else np.asarray(matrix)
        return cls(torch.from_numpy(dense.astype(np.float32, copy=False)))

    @classmethod
    def wrap(cls, values: Counts | Tensor) -> Counts:
        """``values`` as Counts: as they are, or a dense tensor (a per-cell vector, say) wrapped."""
        return values if isinstance(values, Counts) else cls(values)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(size) for size in self.values.shape)

    @property
    def n_cells(self) -> int:
        return self.shape[0]

    @property
    def n_features(self) -> int:
        return self.shape[1]

    @property
    def n_categories(self) -> int:
        return self.shape[2] if len(self.shape) == 3 else 1

    @property
    def nbytes(self) -> int:
        """Bytes of the stored values (a sparse matrix's data and index arrays)."""
        if self.sparse:
            return self.values.data.nbytes + self.values.indices.nbytes + self.values.indptr.nbytes
        return self.values.numel() * self.values.element_size()

    @property
    def dtype_name(self) -> str:
        """The stored dtype, e.g. "uint8" or "float32 sparse"."""
        return f"{self.values.dtype} sparse" if self.sparse else str(self.values.dtype).removeprefix("torch.")

    @cached_property
    def compact_dtype(self) -> torch.dtype:
        """The smallest dtype that holds every value exactly (worked out once, when asked)."""
        return _compact_dtype(torch.from_numpy(self.values.data) if self.sparse else self.values)

    def dense(self) -> Tensor:
        """All values as a dense tensor (itself when dense)."""
        return torch.from_numpy(self.values.toarray()) if self.sparse else self.values

    def array(self) -> np.ndarray:
        """All values as a dense numpy array (sharing memory when dense on the host)."""
        return self.values.toarray() if self.sparse else self.values.numpy()

    def rows(self, cells: slice | Tensor) -> Tensor:
        """Rows ``cells`` (a slice or an index tensor) as a dense tensor where the values are."""
        if self.sparse:
            return torch.from_numpy(self.values[cells if isinstance(cells, slice) else cells.cpu().numpy()].toarray())
        return self.values[cells]

    def columns(self, block: slice) -> Tensor:
        """Features ``block`` of every cell as a dense tensor."""
        return torch.from_numpy(self.values[:, block].toarray()) if self.sparse else self.values[:, block]

    def cell_totals(self) -> np.ndarray:
        """Each cell's total over features (and categories): its library size."""
        if self.sparse:
            return np.asarray(self.values.sum(axis=1)).ravel()
        return self.array().reshape(self.n_cells, -1).sum(axis=1)

    def feature_extremes(self) -> tuple[np.ndarray, np.ndarray]:
        """(maximum, minimum) of each feature over cells (a sparse matrix's implicit zeros count)."""
        if self.sparse:
            top, bottom = self.values.max(axis=0), self.values.min(axis=0)
            return np.asarray(top.toarray()).ravel(), np.asarray(bottom.toarray()).ravel()
        values = self.array()
        return values.max(axis=0), values.min(axis=0)

    def kept(self, keep: np.ndarray) -> Counts:
        """The features ``keep`` marks, contiguous (no copy when all are kept and the values
        already are); a sparse matrix stays one."""
        if self.sparse:
            return self if keep.all() else Counts(self.values[:, keep].tocsr(), sparse=True)
        values = self.array()
        return Counts(torch.from_numpy(np.ascontiguousarray(values if keep.all() else values[:, keep])))

    def astype(self, dtype: torch.dtype) -> Counts:
        """These values as ``dtype`` (a sparse matrix's stored values converted)."""
        if self.sparse:
            return Counts(self.values.astype(torch.empty((), dtype=dtype).numpy().dtype), sparse=True)
        return Counts(self.values.to(dtype))

    def stored(self, storage: torch.device, compact: bool) -> Counts:
        """The values as training keeps them: on ``storage`` (a sparse matrix stays on the host),
        in :attr:`compact_dtype` when ``compact`` (a copy), else as they are."""
        if compact:
            return self.astype(self.compact_dtype) if self.sparse else Counts(self.values.to(storage, self.compact_dtype))
        return self if self.sparse else Counts(self.values.to(storage))

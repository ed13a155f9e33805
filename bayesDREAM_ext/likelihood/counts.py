"""Read an observation matrix once into what the exact likelihoods need, never densifying it.

Cells are put in group order (:class:`CellGroups`: a stable sort of the group index, so each
group's cells are one contiguous range), and the matrix's non-zero entries are listed feature
by feature, each feature's entries in that cell order (:class:`Nonzeros`, compressed-column
like). Dense input (a torch tensor or numpy array) is read a block of features at a time;
scipy.sparse input (CSR, CSC, COO, or the sparse arrays) through scipy's own CSR row indexing
and CSR -> CSC conversion, both O(nnz). Memory is O(nnz + N + T).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from bayesDREAM_ext.counts import issparse

# Dense input is read in blocks of features of about this many bytes (float64).
READ_BLOCK_BYTES = 32 * 2**20
INT32_MAX = 2**31 - 1


def _as_tensor(values: Any) -> Tensor:
    """A CPU tensor view of array-like ``values``."""
    tensor = values if isinstance(values, Tensor) else torch.as_tensor(np.asarray(values))
    return tensor.detach().cpu()


@dataclass(frozen=True)
class CellGroups:
    """Cells in group order: ``order[i]`` is the cell at sorted position i, group g owns
    positions ``offsets[g]:offsets[g + 1]``, ``group_of[i]`` is the group at position i."""

    order: Tensor
    offsets: Tensor
    group_of: Tensor
    n_groups: int

    @classmethod
    def from_groups(cls, groups: Any, n_groups: int | None = None) -> CellGroups:
        """From a [N] integer group index in 0..C-1 (C = ``n_groups``, default max + 1)."""
        index = _as_tensor(groups)
        if index.dim() != 1 or index.numel() == 0:
            raise ValueError(f"groups must be a non-empty 1-D index of cells, got shape {list(index.shape)}")
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise ValueError(f"groups must be integers, got {index.dtype}")
        index = index.to(torch.int64)
        low, high = int(index.min()), int(index.max())
        count = high + 1 if n_groups is None else int(n_groups)
        if low < 0 or high >= count:
            raise ValueError(f"groups must lie in 0..{count - 1}, got {low}..{high}")
        order = torch.sort(index, stable=True).indices
        sizes = torch.bincount(index, minlength=count)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
        return cls(order, offsets, index[order], count)

    @property
    def n_cells(self) -> int:
        return int(self.order.numel())

    @property
    def sizes(self) -> Tensor:
        """[C] cells per group."""
        return self.offsets[1:] - self.offsets[:-1]

    def sorted_values(self, values: Any, what: str, positive: bool = False) -> Tensor:
        """Per-cell ``values`` [N] in sorted order, as float64 (checked finite, and > 0 if ``positive``)."""
        tensor = _as_tensor(values)
        if tensor.shape != (self.n_cells,):
            raise ValueError(f"{what} must have shape [{self.n_cells}], got {list(tensor.shape)}")
        tensor = tensor.to(torch.float64)
        if not bool(torch.isfinite(tensor).all()) or (positive and not bool((tensor > 0).all())):
            raise ValueError(f"{what} must be finite{' and > 0' if positive else ''}")
        return tensor[self.order]


@dataclass(frozen=True)
class Nonzeros:
    """A matrix's non-zero entries, feature-major: feature t's entries are
    ``indptr[t]:indptr[t + 1]``, at sorted cell positions ``cell`` (increasing within a
    feature) with values ``value`` (int32 for integers up to 2**31 - 1, else float64)."""

    indptr: Tensor
    cell: Tensor
    value: Tensor
    n_cells: int

    @property
    def n_features(self) -> int:
        return int(self.indptr.numel()) - 1

    @property
    def nnz(self) -> int:
        return int(self.cell.numel())

    def feature(self) -> Tensor:
        """[nnz] int32: the feature of each entry."""
        counts = self.indptr[1:] - self.indptr[:-1]
        return torch.repeat_interleave(torch.arange(self.n_features, dtype=torch.int32), counts)


def _check_values(values: Tensor, what: str, integer: bool, non_negative: bool) -> None:
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{what} must be finite")
    if non_negative and bool((values < 0).any()):
        raise ValueError(f"{what} must be non-negative")
    if integer and values.is_floating_point() and not bool((values == values.round()).all()):
        raise ValueError(f"{what} must be whole numbers")


def _compact(values: Tensor, integer: bool) -> Tensor:
    """int32 where ``integer`` values fit, else float64."""
    if integer and (values.numel() == 0 or float(values.abs().max()) <= INT32_MAX):
        return values.to(torch.int32)
    return values.to(torch.float64)


def _dense_nonzeros(matrix: Tensor, cells: CellGroups, what: str, integer: bool, non_negative: bool) -> Nonzeros:
    n_cells, n_features = matrix.shape
    width = max(1, READ_BLOCK_BYTES // (8 * max(n_cells, 1)))
    counts, rows, values = [], [], []
    for t0 in range(0, n_features, width):
        block = matrix[:, t0 : t0 + width][cells.order].T  # [features, sorted cells]
        _check_values(block, what, integer, non_negative)
        feature, row = block.nonzero(as_tuple=True)
        counts.append(torch.bincount(feature, minlength=block.shape[0]))
        rows.append(row.to(torch.int32))
        values.append(block[feature, row].to(torch.float64))
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cat(counts).cumsum(0)])
    return Nonzeros(indptr, torch.cat(rows), _compact(torch.cat(values), integer), n_cells)


def _sparse_nonzeros(matrix: Any, cells: CellGroups, what: str, integer: bool, non_negative: bool) -> Nonzeros:
    import scipy.sparse as sp

    csr = sp.csr_matrix(matrix)
    _check_values(torch.from_numpy(np.asarray(csr.data)), what, integer, non_negative)
    csr = csr[cells.order.numpy()]  # a copy, rows in sorted order
    csr.sum_duplicates()
    csr.eliminate_zeros()
    csc = csr.tocsc()
    csc.sort_indices()
    indptr = torch.from_numpy(csc.indptr.astype(np.int64))
    value = torch.from_numpy(np.asarray(csc.data, dtype=np.float64))
    return Nonzeros(indptr, torch.from_numpy(csc.indices.astype(np.int32)), _compact(value, integer), csc.shape[0])


def read_nonzeros(matrix: Any, cells: CellGroups, what: str = "counts", *, integer: bool = True, non_negative: bool = True) -> Nonzeros:
    """The non-zero entries of [N, T] ``matrix`` (dense or scipy.sparse), cells in ``cells``'
    order, values checked finite (and whole / non-negative as asked)."""
    shape = tuple(matrix.shape)
    if len(shape) != 2 or shape[0] != cells.n_cells:
        raise ValueError(f"{what} must be [cells={cells.n_cells}, features], got shape {list(shape)}")
    if issparse(matrix):
        return _sparse_nonzeros(matrix, cells, what, integer, non_negative)
    return _dense_nonzeros(_as_tensor(matrix), cells, what, integer, non_negative)


def column_blocks(matrix: Any, n_cells: int, what: str, width: int | None = None) -> Iterator[tuple[int, Tensor]]:
    """(t0, [N, w] float64 block) over the columns of [N, F] ``matrix`` (dense, or
    scipy.sparse densified one block at a time), rows in the matrix's own order."""
    shape = tuple(matrix.shape)
    if len(shape) != 2 or shape[0] != n_cells:
        raise ValueError(f"{what} must be [cells={n_cells}, features], got shape {list(shape)}")
    width = width or max(1, READ_BLOCK_BYTES // (8 * max(n_cells, 1)))
    if issparse(matrix):
        import scipy.sparse as sp

        columns = sp.csc_matrix(matrix)
        for t0 in range(0, shape[1], width):
            block = torch.from_numpy(columns[:, t0 : t0 + width].toarray()).to(torch.float64)
            _check_values(block, what, integer=False, non_negative=False)
            yield t0, block
        return
    dense = _as_tensor(matrix)
    for t0 in range(0, shape[1], width):
        block = dense[:, t0 : t0 + width].to(torch.float64)
        _check_values(block, what, integer=False, non_negative=False)
        yield t0, block


def held_bytes(record: Any) -> int:
    """Bytes of the tensors a (possibly nested) statistics dataclass holds."""
    total = 0
    for item in (getattr(record, f.name) for f in fields(record)):
        if isinstance(item, Tensor):
            total += item.numel() * item.element_size()
        elif is_dataclass(item):
            total += held_bytes(item)
    return total

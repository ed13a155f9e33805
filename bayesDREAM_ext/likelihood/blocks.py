"""Fixed-order blocked evaluation: the same floating-point result on 1, 2 or 4 threads.

The fused likelihoods cut their work into *units* (ranges of features) and each unit into
cache-sized *blocks* (``CPU_BLOCK_BYTES`` per buffer). Blocks are folded into a unit's
accumulators in a fixed order, units write disjoint slices of the outputs, and per-unit
scalars are summed in unit order at the end (:func:`ordered_sum`): which thread runs a unit
does not matter, only the layout does, and that depends on the problem's shape, the dtype
and the device type alone.

Units run on a pool of ``threads`` Python threads (torch releases the GIL inside each kernel),
never on the caller's thread. Each pool thread first makes its own torch ops serial
(:func:`serial_thread`: its OpenMP team is one thread), so every op on a block runs the same
serial loop whatever torch's intra-op thread count: the sums inside a block never change
order, and ``threads`` is the only parallelism, meaning what it says. (torch would otherwise
run its VML ops -- log, lgamma, exp -- on its OpenMP team from 2048 elements on; measured
here, a team per cache-sized block cost more than the block on a busy machine: 5.9 ms for a
4096-element ``log`` on the main thread at load 7, against 0.2 ns per element serially.)
Where no OpenMP runtime can be found, a block's ops split as torch's thread count says, the
same in every pool thread: the result is still the same for any ``threads`` but may change
with torch's own thread count. On CUDA the blocks are large and run on the caller's thread.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import torch

# Bytes per block buffer on the CPU: the few buffers of a block stay in a core's L2 cache
# (measured at 3000 x 2000: 2.2 ns per count float32 with 256 KiB, 2.7 with 128 KiB, 4.0 with 64 KiB).
CPU_BLOCK_BYTES = 256 * 2**10
CUDA_BLOCK_ELEMENTS = 1 << 24
# Features per unit on the CPU: a block is up to this wide and as many cells tall as fit.
CPU_UNIT_FEATURES = 256
# ATen reduces fewer elements than this serially whatever its thread count (fixed_sum's pieces).
SERIAL_ELEMENTS = 32767

R = TypeVar("R")
logger = logging.getLogger("devicemem.bayesdream")


@dataclass(frozen=True)
class Layout:
    """How a [cells x features] pass is cut: ``unit_features`` features per unit, blocks of at
    most ``block_elements`` elements."""

    unit_features: int
    block_elements: int

    @classmethod
    def for_device(cls, device: torch.device, n_features: int, n_groups: int = 1, itemsize: int = 4) -> Layout:
        """The layout for ``device`` and the compute dtype's ``itemsize``: cache-sized blocks on
        the CPU, large ones on CUDA. A unit's per-group accumulators ([groups, unit_features])
        fit one CPU block too."""
        if device.type == "cpu":
            elements = CPU_BLOCK_BYTES // itemsize
            return cls(max(1, min(CPU_UNIT_FEATURES, elements // max(n_groups, 1), n_features)), elements)
        return cls(max(1, n_features), CUDA_BLOCK_ELEMENTS)

    def units(self, n_features: int) -> list[tuple[int, int]]:
        """The feature ranges [t0, t1), in order."""
        return [(t0, min(t0 + self.unit_features, n_features)) for t0 in range(0, n_features, self.unit_features)]

    def rows(self, width: int) -> int:
        """Rows (cells or entries) per block of ``width`` columns."""
        return max(1, self.block_elements // max(width, 1))


@functools.lru_cache(maxsize=1)
def _openmp() -> Any:
    """The OpenMP runtime torch's CPU kernels use (its bundled libgomp, else whichever the
    process has loaded), or None where there is none to find (torch's native thread pool)."""
    folder = os.path.join(os.path.dirname(torch.__file__), "lib")
    bundled = sorted(path for name in ("libgomp*", "libiomp*", "libomp*") for path in glob.glob(os.path.join(folder, name)))
    for path in bundled + [None]:
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        if hasattr(library, "omp_set_num_threads"):
            return library
    return None


def serial_thread() -> None:
    """Make torch's CPU ops serial on the calling thread only: its OpenMP team is one thread.

    torch reads the team size per thread (``at::get_num_threads`` is ``omp_get_max_threads``
    after a once-per-thread initialisation, forced here first), so other threads keep theirs.
    ``torch.set_num_threads`` is not used: it also resizes process-wide pools.
    """
    torch.get_num_threads()
    library = _openmp()
    if library is not None:
        library.omp_set_num_threads(1)
    if torch.get_num_threads() != 1:
        logger.debug("likelihood threads: torch's ops may still run on its intra-op pool (no OpenMP runtime found)")


def run_units(work: Callable[[int, int], R], units: Sequence[tuple[int, int]], threads: int, device: torch.device) -> list[R]:
    """``work(t0, t1)`` for every unit, results in unit order: on the CPU on ``threads`` pool
    threads whose torch ops are serial, on another device on the calling thread."""
    if device.type != "cpu":
        return [work(t0, t1) for t0, t1 in units]
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(units))), initializer=serial_thread) as pool:
        return list(pool.map(lambda unit: work(*unit), units))


def ordered_sum(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sum of 0-dim tensors in a fixed pairwise tree (independent of who computed them)."""
    items = list(values)
    while len(items) > 1:
        items = [items[i] + items[i + 1] if i + 1 < len(items) else items[i] for i in range(0, len(items), 2)]
    return items[0]


def log1p(x: torch.Tensor) -> torch.Tensor:
    """log(1 + x) to a few ulps for x >= 0, fast on the CPU, differentiable (see :func:`log1p_into`)."""
    if x.dtype != torch.float64:
        return torch.log1p(x)
    u = x + 1.0
    return torch.log(u) - (u - 1.0 - x) / u


def log1p_into(x: torch.Tensor, u: torch.Tensor, q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """log(1 + x) into ``out``, given u = 1 + x and q = 1 / u (``u`` is overwritten; no autograd).

    torch's float64 ``log1p`` on the CPU is scalar code (measured ~20-35 ns per element,
    against ~0.5 ns for ``log``), so float64 takes log(u) - ((u - 1) - x) / u, which corrects
    the rounding of 1 + x to a few ulps. float32 ``log1p`` is vectorised (~0.4 ns) except below
    1e-20, which needs a dispersion over 1e12 here.
    """
    if x.dtype != torch.float64:
        return torch.log1p(x, out=out)
    return torch.log(u, out=out).sub_(u.sub_(1.0).sub_(x).mul_(q))


def fixed_sum(x: torch.Tensor, dims: int) -> torch.Tensor:
    """Sum over the last ``dims`` dims of ``x`` in pieces of ``SERIAL_ELEMENTS`` (each reduced
    serially by ATen) folded in a fixed tree: the same bits for any torch thread count.
    Differentiable."""
    flat = x.flatten(-dims) if dims > 1 else x
    return ordered_sum([piece.sum(-1) for piece in flat.split(SERIAL_ELEMENTS, dim=-1)])

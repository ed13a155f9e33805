"""Fixed-order blocked evaluation: the same floating-point result on 1, 2 or 4 threads.

The fused likelihoods cut their work into *units* (ranges of features) and each unit into
*blocks*. Every sum inside a block is one torch reduction over a block of fewer than
``CPU_BLOCK_ELEMENTS`` elements, which torch runs serially (ATen parallelises an elementwise
op or a reduction only from ``at::internal::GRAIN_SIZE`` = 32768 elements on), so neither the
summation order nor the SIMD/scalar split of a transcendental depends on how many threads
torch has. Blocks are folded into a unit's accumulators in a fixed order, units write disjoint
slices of the outputs, and per-unit scalars are summed in unit order at the end: the thread
that runs a unit does not matter, only the block layout does, and that depends on the
problem's shape and the device type alone.

Units run on a pool of ``threads`` Python threads (torch releases the GIL inside each kernel),
never on the caller's thread. Each pool thread first sets its own OpenMP team to one thread
(:func:`serial_thread`): torch parallelises its VML ops (log, lgamma, exp, ...) from 2048
elements on, and an OpenMP team per cache-sized block costs more than the block on a busy
machine (measured here: 5.9 ms for a 4096-element ``log`` on the main thread at load 7, 0.2
ns per element serially), so the pool's threads are the only parallelism and ``threads``
means what it says. On CUDA the blocks are large and run on the caller's thread (the GPU is
the parallel part).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import torch

# One under ATen's GRAIN_SIZE (32768): an op on fewer elements never uses the intra-op pool.
CPU_BLOCK_ELEMENTS = 32767
CUDA_BLOCK_ELEMENTS = 1 << 24
# Features per unit on the CPU: a block is up to this wide and CPU_BLOCK_ELEMENTS // width cells tall.
CPU_UNIT_FEATURES = 256

R = TypeVar("R")
logger = logging.getLogger("devicemem.bayesdream")


@dataclass(frozen=True)
class Layout:
    """How a [cells x features] pass is cut: ``unit_features`` features per unit, blocks of at
    most ``block_elements`` elements."""

    unit_features: int
    block_elements: int

    @classmethod
    def for_device(cls, device: torch.device, n_features: int, n_groups: int = 1) -> Layout:
        """The layout for ``device``: cache-sized serial blocks on the CPU, large ones on CUDA.
        A unit's per-group accumulators ([groups, unit_features]) stay a CPU block too."""
        if device.type == "cpu":
            width = max(1, min(CPU_UNIT_FEATURES, CPU_BLOCK_ELEMENTS // max(n_groups, 1), n_features))
            return cls(width, CPU_BLOCK_ELEMENTS)
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
    bundled = [os.path.join(os.path.dirname(torch.__file__), "lib", name) for name in ("libgomp.so.1", "libomp.dylib")]
    for path in [p for p in bundled if os.path.exists(p)] + [None]:
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
    """log(1 + x) to a few ulps for x >= 0, fast on every device.

    torch's CPU ``log1p`` is slow where ``log`` is not: measured ~20-35 ns per element in
    float64 and ~50 ns in float32 for x < 1e-20, against ~0.5 ns for ``log``. log(u) -
    ((u - 1) - x) / u with u = 1 + x corrects the rounding of 1 + x with three cheap ops.
    """
    u = x + 1.0
    return torch.log(u) - (u - 1.0 - x) / u


def fixed_sum(x: torch.Tensor, dims: int) -> torch.Tensor:
    """Sum over the last ``dims`` dims of ``x`` in pieces of fewer than ``CPU_BLOCK_ELEMENTS``
    (each reduced serially) folded in a fixed tree: the same bits for any torch thread count.
    Differentiable."""
    flat = x.flatten(-dims) if dims > 1 else x
    return ordered_sum([piece.sum(-1) for piece in flat.split(CPU_BLOCK_ELEMENTS, dim=-1)])

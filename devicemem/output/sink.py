"""The sink: the preallocated host tensors a run fills, batch by batch (local executor) or shard
by shard (Ray driver).

Results are pageable host tensors, or numpy memmaps under ``out=``; batches from a GPU pass
through one small reusable pinned :class:`Staging` buffer, since torch's pinned allocator
rounds every block up to a power of two and keeps it for the process's life. Reduced sites go
to streaming :class:`~devicemem.output.moments.Moments` instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence
from urllib.parse import quote

import numpy as np
import torch
from torch import Tensor

from devicemem.output.moments import Moments, statistic_of
from devicemem.sampling import Site

# The pinned buffer GPU batches pass through on their way into host results (a power of two, so
# torch's pinned allocator rounds nothing up); copies larger than this go in pieces.
STAGING_BYTES = 64 << 20


class Staging:
    """One reusable pinned buffer of :data:`STAGING_BYTES` that device-to-host copies pass
    through: the device writes it at full speed (DMA), the host copies it on into pageable
    memory, piece by piece. Allocated on first use."""

    def __init__(self) -> None:
        self.buffer: Tensor | None = None

    def copy(self, rows: Tensor, value: Tensor) -> None:
        """``rows.copy_(value)`` for host ``rows`` and a device ``value`` of the same shape and
        dtype; returns once the host holds the data. Non-contiguous values are copied directly."""
        if not (rows.is_contiguous() and value.is_contiguous()):
            rows.copy_(value)
            return
        if self.buffer is None:
            self.buffer = torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True)
        source, target = value.reshape(-1).view(torch.uint8), rows.reshape(-1).view(torch.uint8)
        for first in range(0, source.numel(), STAGING_BYTES):
            piece = source[first : first + STAGING_BYTES]
            staged = self.buffer[: piece.numel()]
            staged.copy_(piece, non_blocking=True)
            torch.cuda.current_stream(value.device).synchronize()
            target[first : first + piece.numel()].copy_(staged)


class Sink:
    """Where batches go: preallocated pageable host tensors (or numpy memmaps) and reducers.
    With ``stage``, batches from a CUDA device are copied through a pinned :class:`Staging`
    buffer.

    ``constants`` are sites with the same value in every sample (observed data): they take no
    rows; the result holds each as a stride-0 view of its one copy expanded to
    ``[num_samples, ...]`` (or, reduced, its mean and a zero variance)."""

    def __init__(
        self,
        sites: dict[str, Site],
        reduce: Mapping[str, tuple[str, ...]],
        num_samples: int,
        out: Path | None,
        stage: bool,
        constants: Mapping[str, Tensor] | None = None,
        resume: bool = False,
    ) -> None:
        self.sites = sites
        self.resume = resume
        self.reduce = reduce
        self.num_samples = num_samples
        self.constants = dict(constants or {})
        self.memmaps: list[np.memmap] = []
        self.tensors: dict[str, Tensor] = {}
        for name, site in sites.items():
            if name in reduce:
                continue
            shape = (num_samples,) + site.shape
            if out is None:  # zeroed: the pages are the run's from the start, not a batch's working memory
                self.tensors[name] = torch.zeros(shape, dtype=site.dtype)
            else:
                self.tensors[name] = self._memmap(out, name, shape, site.dtype)
        self.reducers = {name: Moments() for name in reduce if name in sites}
        self.staging = Staging() if stage else None

    def _memmap(self, out: Path, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        try:
            np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        except TypeError as exc:
            raise ValueError(f"out: site {name!r} has dtype {dtype}, which numpy memmaps cannot hold") from exc
        path = out / f"{quote(name, safe='')}.npy"
        if self.resume:
            array = np.lib.format.open_memmap(path, mode="r+")
            if array.shape != shape or array.dtype != np_dtype:
                raise ValueError(f"resume: {path} holds {array.shape} {array.dtype}; this run writes {shape} {np_dtype}")
        else:
            array = np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype, shape=shape)
        self.memmaps.append(array)
        return torch.from_numpy(array)

    def slices(self, start: int, count: int) -> dict[str, Tensor]:
        """The stored sites' rows ``start:start + count``, to be drawn into directly."""
        return {name: tensor[start : start + count] for name, tensor in self.tensors.items()}

    def write(self, start: int, samples: Mapping[str, Tensor]) -> None:
        """Store (or reduce) one batch of samples starting at sample ``start``."""
        missing = set(self.sites) - set(samples)
        if missing:
            raise RuntimeError(f"the model did not produce sites {sorted(missing)}")
        for name, site in self.sites.items():
            value = samples[name]
            if tuple(value.shape[1:]) != site.shape or value.dtype != site.dtype:
                raise RuntimeError(
                    f"site {name!r}: a batch gave {tuple(value.shape)} {value.dtype}, expected "
                    f"[batch, {', '.join(map(str, site.shape))}] {site.dtype}"
                )
            if name in self.reducers:
                self.reducers[name].update(value)
            else:
                rows = self.tensors[name][start : start + value.shape[0]]
                if self.staging is not None and value.device.type == "cuda":
                    self.staging.copy(rows, value)
                elif not _same_memory(rows, value):  # else drawn straight into the rows
                    rows.copy_(value)
        for array in self.memmaps:
            array.flush()

    def result(self, order: Sequence[str] = ()) -> dict[str, Tensor]:
        """The results by name, in ``order`` (site names) where given; a reduced site ``s``
        gives ``s:mean`` / ``s:var``."""
        result: dict[str, Tensor] = {}
        for name in list(order) + [n for n in (*self.sites, *self.constants) if n not in order]:
            if name in self.reduce:
                for statistic in self.reduce[name]:
                    result[f"{name}:{statistic}"] = self._statistic(name, statistic)
            elif name in self.tensors:
                result[name] = self.tensors[name]
            elif name in self.constants:
                value = self.constants[name]
                result[name] = value.expand((self.num_samples,) + tuple(value.shape))
        return result

    def _statistic(self, name: str, statistic: str) -> Tensor:
        if name in self.reducers:
            return self.reducers[name].result(statistic)
        value = self.constants[name].to(torch.float64)
        return statistic_of(statistic, self.num_samples, value, torch.zeros_like(value))


def _same_memory(a: Tensor, b: Tensor) -> bool:
    return a.device == b.device and a.data_ptr() == b.data_ptr() and a.stride() == b.stride()

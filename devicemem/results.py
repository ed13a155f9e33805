"""Where drawn samples go, shared by the local and the Ray executors.

A :class:`Sink` holds the preallocated host tensors a run fills (pageable, or numpy memmaps
under ``out=``; batches from a GPU pass through one small reusable pinned :class:`Staging`
buffer, since torch's pinned allocator rounds every block up to a power of two and keeps it for
the process's life) and the streaming reducers: :class:`Moments` reduces each batch where it
was drawn (:func:`batch_moments`) and merges batches, and shards, with Chan et al.'s formula.
:class:`BatchRecord` describes a finished batch and :func:`batch_seed` seeds it, so every
executor draws the same samples for the same (seed, first sample). Under ``out=`` a :class:`Manifest` says how far the run got.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import quote

import numpy as np
import torch
from torch import Tensor

from devicemem.backends import DeviceMemory
from devicemem.backends.names import HOST
from devicemem.sampling import Site
from devicemem.units import format_bytes

STATISTICS = ("mean", "var")
# Host bytes per reduced element: float64 mean and sum of squares, a batch's float64 mean and sum
# of squares while it is merged, and its float32 copy on the way.
REDUCER_BYTES = 5 * 8
# The pinned buffer GPU batches pass through on their way into host results (a power of two, so
# torch's pinned allocator rounds nothing up); copies larger than this go in pieces.
STAGING_BYTES = 64 << 20


@dataclass(frozen=True)
class BatchRecord:
    """One finished batch: samples ``start:start + size`` on ``device``.

    ``peak_bytes`` is the device's high-water mark during the batch as its backend measures it
    (host: the process's peak RSS; CUDA: peak reserved) and ``base_bytes`` what the process
    held there when the batch started, so ``working_bytes`` is what the batch itself needed,
    the figure the plan's predicted peak and budget speak of. ``retries`` counts the
    out-of-memory attempts at this start before the one that worked.
    """

    start: int
    size: int
    device: str
    wall_s: float
    peak_bytes: int | None
    retries: int
    base_bytes: int | None = None

    @property
    def working_bytes(self) -> int | None:
        """Peak above what was held when the batch started (None when either is unknown)."""
        if self.peak_bytes is None or self.base_bytes is None:
            return None
        return max(self.peak_bytes - self.base_bytes, 0)


def batch_seed(seed: int, start: int) -> int:
    """The torch seed of the batch whose first sample has index ``start``."""
    return int(np.random.SeedSequence([seed, start]).generate_state(1, np.uint64)[0])


def batch_moments(batch: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, sum of squared deviations) along the batch's first dim, computed where the batch is,
    in two passes (the mean, then each sample's squared deviation added in) with sample-sized
    temporaries only. ``torch.var_mean`` over the leading dim takes ~0.9 s per 4M elements on
    the CPU whatever the batch size, 10-30x this."""
    values = batch if batch.is_floating_point() else batch.double()
    mean = values.mean(dim=0)
    m2 = torch.zeros_like(mean)
    for sample in values:
        deviation = sample - mean
        m2.addcmul_(deviation, deviation)
    return mean, m2


LATENT_STREAM = 1  # tells sample_seeds' entropy from batch_seed's, so the two streams differ


def sample_seeds(seed: int, first: int, count: int) -> list[int]:
    """The seeds of samples ``first .. first + count - 1``'s latent draws: each depends on
    (seed, sample index) only, never on the batch the sample is drawn in."""
    return [
        int(np.random.SeedSequence([seed, index, LATENT_STREAM]).generate_state(1, np.uint64)[0])
        for index in range(first, first + count)
    ]



class Moments:
    """Mean and variance of one reduced site in float64 on the host, merged batch by batch (or
    shard by shard) with Chan et al.'s parallel formula."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def update(self, batch: Tensor) -> None:
        """Reduce a batch of samples on its device, then merge it."""
        mean, m2 = batch_moments(batch)
        self.merge(batch.shape[0], mean.to(HOST).double(), m2.to(HOST).double())

    def merge_shard(self, count: int, mean: np.ndarray, var: np.ndarray) -> None:
        """Merge a shard's mean and unbiased variance."""
        m2 = torch.from_numpy(np.array(var, dtype=np.float64)) * (count - 1) if count > 1 else None
        mean_b = torch.from_numpy(np.array(mean, dtype=np.float64))
        self.merge(count, mean_b, m2 if m2 is not None else torch.zeros_like(mean_b))

    def merge(self, count: int, mean: Tensor, m2: Tensor) -> None:
        """Merge ``count`` samples' float64 mean and sum of squared deviations (both consumed)."""
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean.sub_(self.mean)
        self.mean.add_(delta, alpha=count / total)
        self.m2.add_(m2).addcmul_(delta, delta, value=self.count * count / total)
        self.count = total

    def result(self, statistic: str) -> Tensor:
        if self.mean is None or self.m2 is None:
            raise RuntimeError("nothing was merged")
        return _statistic(statistic, self.count, self.mean, self.m2)


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


def _statistic(statistic: str, count: int, mean: Tensor, m2: Tensor) -> Tensor:
    if statistic == "mean":
        return mean
    return m2 / (count - 1) if count > 1 else torch.full_like(m2, float("nan"))


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
        return _statistic(statistic, self.num_samples, value, torch.zeros_like(value))


MANIFEST = "manifest.json"
MANIFEST_FORMAT = "devicemem.out/1"


def describe_sites(sites: Mapping[str, Site], reduce: Mapping[str, tuple[str, ...]]) -> dict[str, Any]:
    """The stored sites as a manifest lists them: name -> shape per sample and dtype."""
    return {name: {"shape": list(site.shape), "dtype": str(site.dtype)} for name, site in sites.items() if name not in reduce}


class Manifest:
    """``out=DIR/manifest.json``: what a run draws (samples, seed, plan, sites) and how far it
    got (``complete_samples``, the batch that comes next), rewritten atomically after every
    batch; ``complete`` turns true only when the last batch is on disk. An interrupted run
    therefore says it is incomplete, and ``Predictive(..., out=DIR, resume=True)`` continues it.
    """

    def __init__(self, out: Path, fields: dict[str, Any]) -> None:
        self.path = out / MANIFEST
        self.fields = fields

    @classmethod
    def begin(cls, out: Path, num_samples: int, seed: int | None, plan: dict[str, Any], sites: dict[str, Any]) -> Manifest:
        fields = {
            "format": MANIFEST_FORMAT, "num_samples": num_samples, "seed": seed, "plan": plan, "sites": sites,
            "complete_samples": 0, "complete": False,
            "next_batch": {"device": plan["device"], "batch_size": plan["batch_size"], "vectorized": plan["vectorized"]},
        }
        manifest = cls(out, fields)
        manifest._write()
        return manifest

    @classmethod
    def load(cls, out: Path) -> Manifest:
        """The manifest in ``out``; ValueError naming the file when it is missing or not one."""
        path = out / MANIFEST
        try:
            fields = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"resume: cannot read {path} ({type(exc).__name__}: {exc}); nothing to resume") from exc
        if not isinstance(fields, dict) or fields.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"resume: {path} is not a devicemem manifest")
        return cls(out, fields)

    def record(self, complete_samples: int, device: str, batch_size: int, vectorized: bool) -> None:
        """After a batch: samples ``0 .. complete_samples - 1`` are on disk; the next batch."""
        self.fields["complete_samples"] = complete_samples
        self.fields["next_batch"] = {"device": device, "batch_size": batch_size, "vectorized": vectorized}
        self.fields["complete"] = complete_samples == self.fields["num_samples"]
        self._write()

    def _write(self) -> None:
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.fields, indent=1))
        os.replace(partial, self.path)


def _same_memory(a: Tensor, b: Tensor) -> bool:
    return a.device == b.device and a.data_ptr() == b.data_ptr() and a.stride() == b.stride()


def host_result_bytes(
    sites: Mapping[str, Site], reduce: Mapping[str, tuple[str, ...]], num_samples: int, out: Path | None
) -> int:
    """Host RAM the results take: reducers, plus the stored sites unless they go to ``out``."""
    need = sum(s.numel * REDUCER_BYTES for n, s in sites.items() if n in reduce)
    if out is None:
        need += sum(s.nbytes * num_samples for n, s in sites.items() if n not in reduce)
    return need


def remedies(out: Path | None, reduce: Mapping[str, tuple[str, ...]], more: tuple[str, ...] = ()) -> str:
    """What a user can do about results that do not fit, leaving out what is already in use:
    ``out=DIR`` unless given, ``reduce=`` unless some site is reduced already, then ``more``."""
    options = [] if out is not None else ["pass out=DIR to write the results to numpy memmaps"]
    options += [] if reduce else ["reduce={site: ('mean', 'var')}"]
    return ", ".join(options + ["fewer return_sites or fewer samples", *more])


def check_host(
    sites: Mapping[str, Site], reduce: Mapping[str, tuple[str, ...]], num_samples: int, out: Path | None,
    host: DeviceMemory, working: int = 0,
) -> None:
    """Fail before sampling when the results (and ``working`` bytes of batches on the host)
    cannot fit in the ``host``'s usable memory (the call's reading)."""
    stored = {n: s.nbytes * num_samples for n, s in sites.items() if n not in reduce}
    need = host_result_bytes(sites, reduce, num_samples, out)
    usable = host.usable_bytes
    if usable is None or need + working <= usable:
        return
    parts = [f"{n} {format_bytes(b)}" for n, b in stored.items()] if out is None else []
    parts += [f"{n} reducer {format_bytes(sites[n].numel * REDUCER_BYTES)}" for n in reduce]
    batches = f" plus {format_bytes(working)} for the batches" if working else ""
    raise ValueError(
        f"[MEMORY] the results need {format_bytes(need)} of host memory ({', '.join(parts)}){batches}, "
        f"but only {format_bytes(usable)} is usable; {remedies(out, reduce, ('fewer reduced sites',) if reduce else ())}"
    )

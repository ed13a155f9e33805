"""Where drawn samples go, shared by the local and the Ray executors.

A :class:`Sink` holds the preallocated host tensors a run fills (pinned when batches come from
a GPU, or numpy memmaps under ``out=``) and the streaming reducers; :class:`Welford` reduces
samples one by one, :class:`Moments` merges reduced shards. :class:`BatchRecord` describes a
finished batch and :func:`batch_seed` seeds it, so every executor draws the same samples for
the same (seed, first sample). Under ``out=`` a :class:`Manifest` says how far the run got.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import quote

import numpy as np
import torch
from torch import Tensor

from devicemem.backends import device_memory
from devicemem.sampling import Site
from devicemem.units import format_bytes

HOST = "cpu"
STATISTICS = ("mean", "var")
WELFORD_BYTES = 3 * 8  # float64 mean, sum of squares and one temporary per element


@dataclass(frozen=True)
class BatchRecord:
    """One finished batch: samples ``start:start + size`` on ``device``.

    ``peak_bytes`` is the device's high-water mark during the batch as its backend measures it
    (host: the process's peak RSS; CUDA: peak allocated) and ``base_bytes`` what the process
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


LATENT_STREAM = 1  # tells sample_seeds' entropy from batch_seed's, so the two streams differ


def sample_seeds(seed: int, first: int, count: int) -> list[int]:
    """The seeds of samples ``first .. first + count - 1``'s latent draws: each depends on
    (seed, sample index) only, never on the batch the sample is drawn in."""
    return [
        int(np.random.SeedSequence([seed, index, LATENT_STREAM]).generate_state(1, np.uint64)[0])
        for index in range(first, first + count)
    ]


class Welford:
    """Streaming mean and unbiased variance over samples, float64 accumulators on the host."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.count = 0
        self.mean = torch.zeros(shape, dtype=torch.float64)
        self.m2 = torch.zeros(shape, dtype=torch.float64)

    def update(self, batch: Tensor) -> None:
        for sample in batch:
            self.count += 1
            delta = sample.to(device=HOST, dtype=torch.float64, copy=True)
            delta -= self.mean
            self.mean.add_(delta, alpha=1.0 / self.count)
            self.m2.addcmul_(delta, delta, value=(self.count - 1) / self.count)

    def result(self, statistic: str) -> Tensor:
        return _statistic(statistic, self.count, self.mean, self.m2)


class Moments:
    """Mean and variance of one reduced site, merged shard by shard (Chan et al.)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def merge(self, count: int, mean: np.ndarray, var: np.ndarray) -> None:
        mean_b = torch.from_numpy(np.array(mean, dtype=np.float64))
        m2_b = torch.from_numpy(np.array(var, dtype=np.float64)) * (count - 1) if count > 1 else torch.zeros_like(mean_b)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = count, mean_b, m2_b
            return
        total = self.count + count
        delta = mean_b - self.mean
        self.mean += delta * (count / total)
        self.m2 += m2_b + delta.square() * (self.count * count / total)
        self.count = total

    def result(self, statistic: str) -> Tensor:
        if self.mean is None or self.m2 is None:
            raise RuntimeError("no shard was merged")
        return _statistic(statistic, self.count, self.mean, self.m2)


def _statistic(statistic: str, count: int, mean: Tensor, m2: Tensor) -> Tensor:
    if statistic == "mean":
        return mean
    return m2 / (count - 1) if count > 1 else torch.full_like(m2, float("nan"))


class Sink:
    """Where batches go: preallocated host tensors (pinned, or numpy memmaps) and reducers."""

    def __init__(
        self,
        sites: dict[str, Site],
        reduce: Mapping[str, tuple[str, ...]],
        num_samples: int,
        out: Path | None,
        pin: bool,
        resume: bool = False,
    ) -> None:
        self.sites = sites
        self.resume = resume
        self.reduce = reduce
        self.memmaps: list[np.memmap] = []
        self.tensors: dict[str, Tensor] = {}
        for name, site in sites.items():
            if name in reduce:
                continue
            shape = (num_samples,) + site.shape
            if out is None:  # zeroed: the pages are the run's from the start, not a batch's working memory
                self.tensors[name] = torch.zeros(shape, dtype=site.dtype, pin_memory=pin)
            else:
                self.tensors[name] = self._memmap(out, name, shape, site.dtype)
        self.reducers = {name: Welford(sites[name].shape) for name in reduce}

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

    def write(self, start: int, samples: Mapping[str, Tensor], non_blocking: bool) -> None:
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
                if not _same_memory(rows, value):  # drawn straight into the rows
                    rows.copy_(value, non_blocking=non_blocking)
        for array in self.memmaps:
            array.flush()

    def result(self) -> dict[str, Tensor]:
        result = dict(self.tensors)
        for name, statistics in self.reduce.items():
            for statistic in statistics:
                result[f"{name}:{statistic}"] = self.reducers[name].result(statistic)
        return result


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
    need = sum(s.numel * WELFORD_BYTES for n, s in sites.items() if n in reduce)
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
    max_memory: object, working: int = 0,
) -> None:
    """Fail before sampling when the results (and ``working`` bytes of batches on the host)
    cannot fit in host memory."""
    stored = {n: s.nbytes * num_samples for n, s in sites.items() if n not in reduce}
    need = host_result_bytes(sites, reduce, num_samples, out)
    usable = device_memory(HOST, max_memory=max_memory).usable_bytes
    if usable is None or need + working <= usable:
        return
    parts = [f"{n} {format_bytes(b)}" for n, b in stored.items()] if out is None else []
    parts += [f"{n} reducer {format_bytes(sites[n].numel * WELFORD_BYTES)}" for n in reduce]
    batches = f" plus {format_bytes(working)} for the batches" if working else ""
    raise ValueError(
        f"[MEMORY] the results need {format_bytes(need)} of host memory ({', '.join(parts)}){batches}, "
        f"but only {format_bytes(usable)} is usable; {remedies(out, reduce, ('fewer reduced sites',) if reduce else ())}"
    )

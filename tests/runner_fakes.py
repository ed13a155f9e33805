"""Models, plans, fault injection and a fake GPU for the runner tests."""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoNormal
from pyro.poutine.runtime import _PYRO_STACK

from bayesDREAM_ext.model import mu_ntc_prior, technical_model
from bayesDREAM_ext.synthetic import synthetic_technical
from devicemem.backends import DeviceMemory, get_backend, register_backend
from devicemem.backends.base import Backend
from devicemem.backends.host import CpuBackend
from devicemem.planner import Plan
from devicemem.seeds import batch_seed, sample_seeds
from devicemem.sampling import PLATE_NAME, Sampler, select_sites

CPU_OOM = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 4000000000 bytes."


def make_plan(num_samples: int, batch_size: int, device: str = "cpu", vectorized: bool = True) -> Plan:
    n_batches = -(-num_samples // batch_size)
    return Plan(
        device=device, num_samples=num_samples, batch_size=batch_size, n_batches=n_batches,
        vectorized=vectorized, predicted_peak_bytes=None, budget_bytes=None, safety_factor=1.0,
        output_bytes=None, reasons=(f"test plan: {n_batches} batches of {batch_size} on {device}",),
    )


def technical_problem(n_cells: int = 40, n_features: int = 12, n_groups: int = 3, seed: int = 0):
    """(args for posterior predictive with counts=None, fitted-at-init AutoNormal guide)."""
    data = synthetic_technical(n_cells, n_features, n_groups, seed)
    counts = torch.tensor(data.counts)
    groups = torch.tensor(data.groups)
    sum_factors = torch.tensor(data.sum_factors)
    mean, sd = mu_ntc_prior(counts, groups, sum_factors)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoNormal(technical_model)
    guide(counts, groups, sum_factors, mean, sd, n_groups)
    return (None, groups, sum_factors, mean, sd, n_groups), guide


def cell_model(x: torch.Tensor | None, n_cells: int, n_features: int) -> torch.Tensor:
    """Local latents in a cell plate: z [cells, 1] per cell, w [features] global."""
    scale = pyro.sample("scale", dist.LogNormal(0.0, 0.3))
    with pyro.plate("features", n_features, dim=-1):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
    with pyro.plate("cells", n_cells, dim=-2):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("features_x", n_features, dim=-1):
            pyro.sample("x", dist.Normal(z * w, scale), obs=x)
    return z.sum(-2)


def cell_problem(n_cells: int = 30, n_features: int = 8, steps: int = 30, seed: int = 0):
    """(args for posterior predictive of cell_model, an AutoNormal briefly fitted to data)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    x = torch.randn(n_cells, 1) * torch.linspace(-1, 1, n_features) + 0.3 * torch.randn(n_cells, n_features)
    guide = AutoNormal(cell_model)
    svi = pyro.infer.SVI(cell_model, guide, pyro.optim.Adam({"lr": 0.05}), pyro.infer.Trace_ELBO())
    for _ in range(steps):
        svi.step(x, n_cells, n_features)
    return (None, n_cells, n_features), guide


def vectorized_size() -> int | None:
    """Size of the sample plate a vectorised draw wraps the model in."""
    for frame in _PYRO_STACK:
        if getattr(frame, "name", None) == PLATE_NAME:
            return frame.size
    return None


class Faulty:
    """A model whose vectorised runs raise ``error()`` on chosen call numbers (1-based) or when
    ``too_big(batch size)``; each raise leaves a tensor in the frame, watched by weakref."""

    def __init__(
        self,
        model: Callable[..., Any],
        error: Callable[[], BaseException],
        fail_calls: tuple[int, ...] = (),
        too_big: Callable[[int], bool] | None = None,
    ) -> None:
        self.model = model
        self.error = error
        self.fail_calls = fail_calls
        self.too_big = too_big
        self.sizes: list[int] = []
        self.failed: list[int] = []
        self.ballast: list[weakref.ref] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        size = vectorized_size()
        if size is not None:
            self.sizes.append(size)
            if len(self.sizes) in self.fail_calls or (self.too_big is not None and self.too_big(size)):
                ballast = torch.ones(1000)
                self.ballast.append(weakref.ref(ballast))
                self.failed.append(size)
                raise self.error()
        return self.model(*args, **kwargs)


class FakeGpu(Backend):
    """A "cuda" backend whose device is the CPU. ``active`` is True from the start of a batch
    on it until a batch starts on the host (see :class:`MarkingHost`), so a :class:`Faulty`
    model can fail only "on the GPU". ``empty_cache`` records whether every ballast tensor of
    ``watch`` was already freed when it was called."""

    kind = "cuda"

    def __init__(self, watch: Faulty | None = None) -> None:
        self.active = False
        self.watch = watch
        self.emptied_after_release: list[bool] = []

    def discover(self, probe: Any) -> list[DeviceMemory]:
        return [DeviceMemory("cuda:0", "fake GPU", 1 << 34, 1 << 34, None, 1 << 34, ("fake",))]

    def torch_device(self, device: str) -> torch.device:
        return torch.device("cpu")

    def reset_peak(self, device: str) -> None:
        self.active = True

    def current_bytes(self, device: str) -> int | None:
        return 0

    def peak_bytes(self, device: str) -> int | None:
        return 0

    def empty_cache(self, device: str) -> None:
        ballast = self.watch.ballast if self.watch is not None else []
        self.emptied_after_release.append(all(ref() is None for ref in ballast))

    def is_oom(self, exc: BaseException) -> bool:
        return isinstance(exc, torch.OutOfMemoryError)


class MarkingHost(CpuBackend):
    """The real host backend that also tells the fake GPU a batch now runs on the host."""

    def __init__(self, gpu: FakeGpu) -> None:
        super().__init__()
        self.gpu = gpu

    def reset_peak(self, device: str) -> None:
        self.gpu.active = False
        super().reset_peak(device)


@contextmanager
def fake_gpu(watch: Faulty | None = None) -> Iterator[FakeGpu]:
    """Register a FakeGpu as "cuda" and a MarkingHost as "cpu"; put the real ones back."""
    real = {kind: get_backend(kind) for kind in ("cuda", "cpu")}
    gpu = FakeGpu(watch)
    register_backend("cuda", gpu)
    register_backend("cpu", MarkingHost(gpu))
    try:
        yield gpu
    finally:
        for kind, backend in real.items():
            register_backend(kind, backend)


def expected_from_report(model, guide, report, seed, args, return_sites=()) -> dict[str, torch.Tensor]:
    """What a correct run must return for the batches in ``report``: one Sampler draw per batch
    (the runner's unit of work) seeded from (seed, its first sample), its latents from each
    sample's own seed, concatenated in order."""
    sampler = Sampler(model, guide, args, {})
    returned = select_sites(sampler.sites, return_sites, True, None)
    parts: list[dict[str, torch.Tensor]] = []
    for row in report:
        torch.manual_seed(batch_seed(seed, row.start))
        parts.append(sampler.draw(row.size, args, {}, returned, sample_seeds=sample_seeds(seed, row.start, row.size)))
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}

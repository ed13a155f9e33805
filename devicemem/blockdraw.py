"""Block-parallel draws of a distribution's sample on the host, identical for any number of threads.

torch's Gamma, Poisson, Binomial and Dirichlet kernels are single-threaded whatever
``torch.set_num_threads`` says (they hold the generator's lock for the whole tensor), so on the
host a likelihood draw uses one core. :func:`block_sample` splits a sample into fixed blocks of
about :data:`BLOCK_ELEMENTS` elements, draws each with its own ``torch.Generator`` seeded from
(a seed, the site's name, the block's index), and runs the blocks on a thread pool (torch
releases the GIL inside its kernels). Blocks depend on the value's shape only, so the draws are
the same for any number of threads; each element is drawn from its own parameters with the
distribution's own algorithm, so the value follows exactly the site's distribution. A block's
parameters are views into the distribution's broadcast parameters: beyond the result, only
block-sized temporaries exist (the distribution's own ``sample`` makes full-size ones).

:class:`BlockDraws` is the Pyro side: a messenger that, for each sample site that is drawn
(no value, not observed) from a covered distribution, fills in the value block-parallel;
other sites, small ones (under :data:`MIN_ELEMENTS`) and unknown distributions keep their own
``sample`` on the calling thread.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.poutine.messenger import Messenger
from torch import Tensor
from torch.distributions import Distribution, Independent
from torch.distributions.utils import logits_to_probs, probs_to_logits

# Elements per block. Part of the draws' definition: changing it changes the values drawn for a
# seed (never their distribution). Kept under ATen's parallel grain (32768 elements), so every
# operation on a block runs serially in its worker: a block op above it would open an OpenMP
# region from each worker thread (measured under load: a 128K-element exp took 12-21 ms with 2
# intra-op threads against 0.1 ms with one). A negative-binomial block takes ~1.2 ms on one
# core, against ~40 us of per-block Python (generator, views, dispatch) that holds the GIL.
BLOCK_ELEMENTS = 1 << 14
# Sites with fewer elements keep the distribution's own sample: one block has nothing to run in
# parallel with (see bench/README.md, W11).
MIN_ELEMENTS = 2 * BLOCK_ELEMENTS

Params = dict[str, Tensor]


@dataclass(frozen=True)
class _Kernel:
    """How to draw one covered distribution: ``reference`` is the class whose ``sample`` and
    ``rsample`` the site's distribution must use unchanged; ``params`` its broadcastable
    parameters; ``draw`` a block from block-shaped parameter views and a generator;
    ``applies`` whether an instance draws as ``draw`` does (settings that change its sampler)."""

    reference: type[Distribution]
    event_dim: int
    params: Callable[[Any], Params]
    draw: Callable[[Params, torch.Generator], Tensor]
    applies: Callable[[Any], bool] = lambda d: True


def _binary(d: Any, name: str) -> Params:
    """The parameter the distribution was built with (logits, else probs) under ``name``, so
    the other is computed per block rather than over the whole broadcast shape."""
    given = vars(d)
    return {name: given["logits"]} if "logits" in given else {f"{name}_probs": given["probs"]}


def _logits(p: Params, name: str) -> Tensor:
    return p[name] if name in p else probs_to_logits(p[f"{name}_probs"], is_binary=True)


def _probs(p: Params, name: str) -> Tensor:
    return logits_to_probs(p[name], is_binary=True) if name in p else p[f"{name}_probs"]


def _gamma(concentration: Tensor, rate: Tensor | float, g: torch.Generator) -> Tensor:
    """``Gamma(concentration, rate).rsample()`` as torch draws it, from generator ``g``."""
    value = torch._standard_gamma(concentration, generator=g).div_(rate)
    return value.clamp_(min=torch.finfo(value.dtype).tiny)


def _negative_binomial(p: Params, g: torch.Generator) -> Tensor:
    rate = _gamma(p["total_count"], _logits(p, "logits").neg().exp_(), g)
    return torch.poisson(rate, generator=g)


def _student_t(p: Params, g: torch.Generator) -> Tensor:
    x = torch.empty(p["df"].shape, dtype=p["df"].dtype).normal_(generator=g)
    chi2 = _gamma(0.5 * p["df"], 0.5, g)
    return x.mul_(chi2.div_(p["df"]).rsqrt_()).mul_(p["scale"]).add_(p["loc"])


def _binomial_params(d: Any) -> Params:
    return {"total_count": d.total_count, **_binary(d, "logits")}


def _binomial(p: Params, g: torch.Generator) -> Tensor:
    return torch.binomial(p["total_count"], _probs(p, "logits"), generator=g)


def _beta(p: Params, g: torch.Generator) -> Tensor:
    pair = torch.stack([p["concentration1"], p["concentration0"]], -1)
    return torch._sample_dirichlet(pair, generator=g).select(-1, 0)


KERNELS: tuple[_Kernel, ...] = (
    _Kernel(
        torch.distributions.NegativeBinomial, 0,
        lambda d: {"total_count": d.total_count, **_binary(d, "logits")}, _negative_binomial,
    ),
    _Kernel(
        dist.GammaPoisson, 0, lambda d: {"concentration": d.concentration, "rate": d.rate},
        lambda p, g: torch.poisson(_gamma(p["concentration"], p["rate"], g), generator=g),
    ),
    _Kernel(torch.distributions.Poisson, 0, lambda d: {"rate": d.rate},
            lambda p, g: torch.poisson(p["rate"], generator=g)),
    _Kernel(torch.distributions.Gamma, 0, lambda d: {"concentration": d.concentration, "rate": d.rate},
            lambda p, g: _gamma(p["concentration"], p["rate"], g)),
    _Kernel(torch.distributions.Normal, 0, lambda d: {"loc": d.loc, "scale": d.scale},
            lambda p, g: torch.normal(p["loc"], p["scale"], generator=g)),
    _Kernel(torch.distributions.LogNormal, 0, lambda d: {"loc": d.loc, "scale": d.scale},
            lambda p, g: torch.normal(p["loc"], p["scale"], generator=g).exp_()),
    _Kernel(torch.distributions.StudentT, 0, lambda d: {"df": d.df, "loc": d.loc, "scale": d.scale}, _student_t),
    _Kernel(torch.distributions.Binomial, 0, _binomial_params, _binomial),
    # Pyro's Binomial is torch's unless its clamped-Poisson approximation is switched on
    _Kernel(dist.Binomial, 0, _binomial_params, _binomial, lambda d: d.approx_sample_thresh == math.inf),
    _Kernel(torch.distributions.Beta, 0,
            lambda d: {"concentration1": d.concentration1, "concentration0": d.concentration0}, _beta),
    _Kernel(torch.distributions.Dirichlet, 1, lambda d: {"concentration": d.concentration},
            lambda p, g: torch._sample_dirichlet(p["concentration"], generator=g)),
)
_WRAPPERS = (Independent, MaskedDistribution, ExpandedDistribution)


def _samples_as(d: Any, reference: type) -> bool:
    """Whether ``d`` is a ``reference`` that draws with ``reference``'s own methods."""
    kind = type(d)
    return isinstance(d, reference) and kind.sample is reference.sample and kind.rsample is reference.rsample


def covered(fn: Any) -> tuple[_Kernel, Any] | None:
    """(kernel, innermost distribution) when ``fn`` is a covered distribution, possibly inside
    Independent / masked / expanded wrappers (which draw their base's sample, reshaped or
    repeated independently: the same as drawing the base over the wrapper's shape)."""
    while any(_samples_as(fn, wrapper) for wrapper in _WRAPPERS):
        fn = fn.base_dist
    for kernel in KERNELS:
        if _samples_as(fn, kernel.reference) and kernel.applies(fn):
            return kernel, fn
    return None


def blocks(shape: tuple[int, ...], event_dim: int) -> list[tuple[Any, ...]]:
    """Index tuples splitting ``shape`` into blocks of at most :data:`BLOCK_ELEMENTS` elements
    (more only when one event is larger), each a range along one batch dim at fixed indices of
    the dims before it; events are never split. Depends on the shape alone."""
    batch = shape[: len(shape) - event_dim]
    event = math.prod(shape[len(batch):])
    if not batch:
        return [()]
    split = next((d for d in range(len(batch)) if math.prod(batch[d + 1:]) * event <= BLOCK_ELEMENTS), len(batch) - 1)
    rows = max(1, BLOCK_ELEMENTS // (math.prod(batch[split + 1:]) * event))
    leading = itertools.product(*(range(n) for n in batch[:split]))
    return [
        (*lead, slice(start, min(start + rows, batch[split])))
        for lead in leading
        for start in range(0, batch[split], rows)
    ]


def block_seeds(seed: int, site: str, count: int) -> list[int]:
    """The generator seeds of a site's ``count`` blocks: words of a numpy ``SeedSequence`` of
    (seed, a stable 64-bit hash of the site's name), one per block index."""
    name = int.from_bytes(hashlib.blake2b(site.encode(), digest_size=8).digest(), "little")
    return [int(word) for word in np.random.SeedSequence([seed, name]).generate_state(count, np.uint64)]


def _plan(fn: Any, min_elements: int) -> tuple[_Kernel, tuple[int, ...], Params] | None:
    """(kernel, value shape, parameters) when ``fn`` is drawn block by block, else None."""
    found = covered(fn)
    if found is None:
        return None
    kernel, leaf = found
    shape = tuple(fn.batch_shape + fn.event_shape)
    params = kernel.params(leaf)
    if math.prod(shape) < min_elements or any(p.device.type != "cpu" for p in params.values()):
        return None
    return kernel, shape, params


def eligible(fn: Any, min_elements: int = MIN_ELEMENTS) -> bool:
    """Whether :func:`block_sample` draws ``fn``: covered, on the host, at least
    ``min_elements`` elements."""
    return _plan(fn, min_elements) is not None


def block_sample(fn: Any, site: str, seed: int, pool: ThreadPoolExecutor | None = None) -> Tensor:
    """One draw of ``fn`` (``fn.sample()``'s shape and dtype), made block by block, the blocks
    on ``pool`` (None: on this thread). ValueError when ``fn`` is not covered or off the host."""
    plan = _plan(fn, 0)
    if plan is None:
        raise ValueError(f"block_sample: site {site!r}: {type(fn).__name__} on this device is not covered")
    kernel, shape, params = plan
    full = {name: value.expand(shape) for name, value in params.items()}
    out = torch.empty(shape, dtype=next(iter(params.values())).dtype)
    indices = blocks(shape, kernel.event_dim)
    seeds = block_seeds(seed, site, len(indices))

    def draw(index: tuple[Any, ...], block_seed: int) -> None:
        generator = torch.Generator().manual_seed(block_seed)
        out[index] = kernel.draw({name: value[index] for name, value in full.items()}, generator)

    jobs: Iterator[None] = map(draw, indices, seeds) if pool is None else pool.map(draw, indices, seeds)
    for _ in jobs:  # re-raises a block's exception
        pass
    return out


class BlockDraws(Messenger):
    """Within this context, each sample site with no value that is not observed, whose
    distribution is covered (:func:`covered`), has its value drawn by :func:`block_sample` on
    a pool of ``threads`` worker threads (also for one: the blocks' serial kernels then run
    beside, not inside, the calling thread's intra-op pool). Each site's seed is one 64-bit draw from torch's global generator, so
    the draws follow ``torch.manual_seed`` (the runner's per-batch seeding) and do not depend
    on ``threads``. Active only with gradients off (the draws are not differentiable)."""

    def __init__(self, threads: int, min_elements: int = MIN_ELEMENTS) -> None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads: expected an integer >= 1; got {threads!r}")
        super().__init__()
        self.threads = threads
        self.min_elements = min_elements
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> BlockDraws:
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="devicemem-draw")
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None

    def _process_message(self, msg: dict[str, Any]) -> None:
        if (
            msg["type"] != "sample" or msg["value"] is not None or msg["is_observed"] or msg["args"]
            or msg["kwargs"] or msg["infer"].get("enumerate") or torch.is_grad_enabled()
        ):
            return
        if eligible(msg["fn"], self.min_elements):
            seed = int(torch.randint(0, 1 << 62, ()).item())
            msg["value"] = block_sample(msg["fn"], msg["name"], seed, self._pool)

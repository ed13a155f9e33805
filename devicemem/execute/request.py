"""A Predictive call as the executors receive it, and the sites it returns.

A :class:`Request` is the model, its guide or posterior samples, Pyro's arguments and the
three checked option records (:mod:`devicemem.options`); :func:`choose_sites` runs the model
once, unbatched, and picks what the call returns by Pyro's rules. Both executors (local and
Ray) start here.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Mapping

from torch import Tensor

from devicemem.backends import MemoryView
from devicemem.backends.names import HOST
from devicemem.options import DrawOptions, MemoryOptions, OutputOptions
from devicemem.planner import resolve_threads
from devicemem.sampling import Sampler, Site, select_sites

logger = logging.getLogger("devicemem.execute")


@dataclass(frozen=True)
class Request:
    """One checked Predictive call (see :class:`devicemem.Predictive`).

    ``posterior_samples`` is empty for a guide or the prior; ``return_sites`` follows Pyro
    (None, empty or names); ``with_observed=False`` leaves unreduced observed sites out of the
    result (the Ray driver adds them itself); ``first_sample`` is the index of this request's
    first sample in the whole run (a Ray shard's start)."""

    model: Callable[..., Any]
    guide: Callable[..., Any] | None
    posterior_samples: Mapping[str, Tensor]
    num_samples: int
    return_sites: Collection[str] | None = ()
    memory: MemoryOptions = field(default_factory=MemoryOptions)
    draw: DrawOptions = field(default_factory=DrawOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    with_observed: bool = True
    first_sample: int = 0


@dataclass(frozen=True)
class Selection:
    """What a call returns: ``drawn`` sites (rows per sample) and ``constants`` (observed
    sites: their data, one host copy each), in Pyro's order (``order``)."""

    sampler: Sampler
    drawn: dict[str, Site]
    constants: dict[str, Tensor]
    order: tuple[str, ...]


def _warn_unknown(request: Request, sampler: Sampler) -> None:
    """Pyro leaves out ``return_sites`` the model lacks, and a ``_RETURN`` that is not a tensor;
    devicemem says so."""
    if not request.return_sites:
        return
    if "_RETURN" in request.return_sites and not sampler.returns_tensor:
        warnings.warn("return_sites: the model's return value is not a tensor; '_RETURN' is left out", UserWarning)
    unknown = [s for s in request.return_sites if s not in sampler.sites and s != "_RETURN"]
    if unknown:
        warnings.warn(
            f"return_sites: the model has no site(s) {unknown}; they are left out (it has "
            f"{[name for name in sampler.sites if name != '_RETURN']})", UserWarning,
        )


def choose_sites(request: Request, args: tuple, kwargs: dict, view: MemoryView) -> Selection:
    """The sites the call returns, by Pyro's rules (:func:`~devicemem.sampling.select_sites`).
    Names in ``return_sites`` the model lacks, and a ``_RETURN`` that is not a tensor, are left
    out with a warning; ValueError for ``reduce`` sites that are not returned. Runs the model
    once, unbatched, drawing large host sites on as many threads as ``view``'s host has cores."""
    threads, origin = resolve_threads(request.draw.threads, lambda: view.host.cores, view.environ)
    logger.debug("[MEMORY] drawing large host sites on %d thread(s) (%s)", threads, origin)
    sampler = Sampler(request.model, request.guide, args, kwargs, validate=request.draw.validate, threads=threads)
    _warn_unknown(request, sampler)
    reduce = request.output.reduce
    chosen = select_sites(sampler.sites, request.return_sites, request.guide is not None, request.posterior_samples)
    unknown = [s for s in reduce if s not in chosen]
    if unknown:
        raise ValueError(f"reduce: site(s) {unknown} are not among the returned sites {list(chosen)}")
    clashes = [f"{s}:{stat}" for s, stats in reduce.items() for stat in stats if f"{s}:{stat}" in sampler.sites]
    if clashes:
        raise ValueError(f"reduce: result name(s) {clashes} clash with model sites of the same name")
    constants = {
        name: sampler.observed[name].to(HOST) for name, site in chosen.items()
        if site.observed and (request.with_observed or name in reduce)
    }
    drawn = {name: site for name, site in chosen.items() if not site.observed}
    return Selection(sampler, drawn, constants, tuple(chosen))

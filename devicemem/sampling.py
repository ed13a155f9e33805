"""Posterior draws with ``pyro.infer.Predictive``'s semantics, the model traced once.

Every call of ``pyro.infer.Predictive`` first runs the guide and the model unvectorised, twice
each, to guess the plate nesting and the sites' shapes (``pyro.infer.predictive._predictive``).
With an observation site each of those runs costs a whole sample, and a batched run pays them
once per batch. A :class:`Sampler` learns the shapes once (:func:`model_sites`) and then each
:meth:`Sampler.draw` is what Pyro's vectorised part does: the guide under an outer plate of
``num`` samples, then the model conditioned on the guide's draws under the same plate, both
with ``torch.no_grad`` and log-densities masked off. :meth:`Sampler.draw_one` is Pyro's
sequential mode (``parallel=False``) for one sample: the model without a sample plate.

For :class:`~pyro.infer.autoguide.AutoNormal` and :class:`~pyro.infer.autoguide.AutoDelta` the
posterior is known in closed form (one Normal per site in unconstrained space; a point), so the
guide's run is replaced by drawing ``loc + scale * eps`` in place, which skips the
distributions' broadcasting temporaries and argument checks. The draws follow the same
distribution as Pyro's, but consume the random stream in a different order than Pyro. Given
one seed per sample, each sample's ``eps`` comes from its own generator, so its latents do not
depend on the batch it is drawn in; the model's own draws (the likelihood) and other guides'
draws come from the batch's stream, so they do.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Callable, Collection, Iterable, Mapping, Sequence

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from torch.distributions.transforms import (
    AffineTransform,
    ComposeTransform,
    ExpTransform,
    IndependentTransform,
    Transform,
    identity_transform,
)
from pyro.infer.autoguide import AutoDelta, AutoNormal
from pyro.infer.autoguide.initialization import InitMessenger, init_to_sample
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor
from torch.distributions import biject_to

from devicemem.blockdraw import BlockDraws
from devicemem.seeds import rng_restored

PLATE_NAME = "_num_predictive_samples"  # Pyro's name, so models can recognise a vectorised run
# Held around each Predictive call and each planner probe: Pyro's handler stack (and the RNG a
# seeded batch forks) are global to the process, so two threads tracing at once corrupt each
# other's draws. Re-entrant, as a call's planner probes inside it.
PYRO_LOCK = threading.RLock()


class NotVectorised(RuntimeError):
    """A vectorised draw gave a site a value that is not one per sample (the model does not
    vectorise under Pyro's sample plate: ``.item()``, a fixed ``expand``, ...)."""

    def __init__(self, site: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
        super().__init__(
            f"site {site!r}: a vectorised draw of {expected[0]} samples gave shape {list(shape)}, not one value per "
            f"sample of the unvectorised trace's shape {list(expected[1:])}; the model does not vectorise under "
            f"Pyro's sample plate (use parallel=False, or parallel=None to fall back automatically)"
        )
        self.site = site


@dataclass(frozen=True)
class Site:
    """One returnable site: its per-sample shape as Pyro returns it, its dtype, and whether
    it is observed (``obs=`` given, not a ``pyro.deterministic``: the same data for every
    sample)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    observed: bool = False

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def _unvectorised_trace(fn: Callable[..., Any], args: tuple, kwargs: dict, seed: int | None = None) -> poutine.Trace:
    """One run of ``fn`` as Pyro traces it to learn shapes (under ``init_to_sample``, so that
    sites without ``.sample()``, such as ``ImproperUniform``, get values as in Pyro), drawing
    from ``seed`` when given; the global RNG is left as it was."""
    with rng_restored(), torch.no_grad(), poutine.block():
        if seed is not None:
            torch.manual_seed(seed)
        initialised = InitMessenger(init_to_sample)(poutine.mask(fn, mask=False))
        return prune_subsample_sites(poutine.trace(initialised).get_trace(*args, **kwargs))


def _nesting(trace: poutine.Trace) -> int:
    return _nesting_of(node for node in trace.nodes.values() if node["type"] == "sample")


def _nesting_of(nodes: Iterable[dict]) -> int:
    """Max plate nesting of the sample sites ``nodes``, as Pyro guesses it."""
    dims = [frame.dim for node in nodes for frame in node["cond_indep_stack"] if frame.vectorized]
    return -min(dims) if dims else 0


def _site_shape(node: dict, nesting: int) -> tuple[int, ...]:
    """A sample site's per-sample shape as Pyro returns it: plate dims padded to ``nesting``."""
    return (1,) * (nesting - len(node["fn"].batch_shape)) + tuple(node["value"].shape)


def model_sites(model: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[int, dict[str, Site], poutine.Trace]:
    """(max plate nesting, every site ``pyro.infer.Predictive`` can return for ``model``, each
    shaped as Pyro returns it per sample: plate dims padded to the nesting, one unvectorised
    trace). A site counts as observed data when it is
    observed, not a ``pyro.deterministic``, and has the same value in a second run that draws
    other latents (a reparameterised site, observed but computed from latents, does not)."""
    trace = _unvectorised_trace(model, args, kwargs)
    nesting = _nesting(trace)
    observed = [
        name for name in trace.observation_nodes if not trace.nodes[name]["infer"].get("_deterministic", False)
    ]
    if observed:
        other = _unvectorised_trace(model, args, kwargs, seed=(torch.initial_seed() + 1) % (1 << 63))
        observed = [name for name in observed if torch.equal(trace.nodes[name]["value"], other.nodes[name]["value"])]
    sites = {}
    for name in trace.stochastic_nodes + trace.observation_nodes:
        node = trace.nodes[name]
        sites[name] = Site(_site_shape(node, nesting), node["value"].dtype, observed=name in observed)
    value = trace.nodes["_RETURN"]["value"]
    if torch.is_tensor(value):
        sites["_RETURN"] = Site(tuple(value.shape), value.dtype)
    return nesting, sites, trace


def select_sites(
    sites: Mapping[str, Site],
    return_sites: Collection[str] | None,
    has_guide: bool,
    posterior_samples: Mapping[str, Tensor] | None,
) -> dict[str, Site]:
    """The sites ``pyro.infer.Predictive`` returns, by its rules: with a guide an empty
    ``return_sites`` means None; a non-empty one selects those names (unknown ones are left
    out; ``_RETURN`` only when it is a tensor); None means every sample site; empty means the
    sample sites not in ``posterior_samples``."""
    if has_guide and not return_sites:
        return_sites = None
    if return_sites:
        return {name: site for name, site in sites.items() if name in return_sites}
    latent = {name: site for name, site in sites.items() if name != "_RETURN"}
    if return_sites is None:
        return latent
    return {name: site for name, site in latent.items() if name not in (posterior_samples or {})}


def closed_form(guide: Any) -> bool:
    """Whether :class:`Sampler` draws ``guide``'s posterior directly: an AutoNormal or
    AutoDelta (exactly those classes) that has seen the model and has no subsampled plate."""
    if type(guide) not in (AutoNormal, AutoDelta) or guide.prototype_trace is None:
        return False
    return all(
        frame.full_size in (None, frame.size)
        for _, site in guide.prototype_trace.iter_stochastic_nodes()
        for frame in site["cond_indep_stack"]
    )


def _in_place(transform: Transform, value: Tensor) -> Tensor:
    """``transform(value)``, overwriting ``value`` for the parts that allow it (exp and an
    elementwise affine map, what ``biject_to`` gives positive and bounded-below supports); the
    same float operations in the same order as the transform's own ``_call``."""
    parts = transform.parts if isinstance(transform, ComposeTransform) else [transform]
    for part in parts:
        if isinstance(part, ExpTransform):
            value = value.exp_()
        elif isinstance(part, AffineTransform) and _same_shape(value, part.loc, part.scale):
            value = value.mul_(part.scale).add_(part.loc)
        elif not isinstance(part, IndependentTransform) or part.base_transform is not identity_transform:
            value = part(value)
    return value


def _same_shape(value: Tensor, *operands: Any) -> bool:
    """Whether the operands broadcast to ``value``'s shape without growing it (numbers do).
    (``torch.broadcast_shapes`` would import sympy: a second in a fresh process.)"""
    for x in operands:
        if torch.is_tensor(x):
            if x.dim() > value.dim():
                return False
            if any(n not in (1, m) for n, m in zip(reversed(x.shape), reversed(value.shape))):
                return False
    return True


def _standard_normals(values: Sequence[Tensor], sample_seeds: Sequence[int] | None) -> None:
    """Fill ``values`` (each [num, ...]) with standard normals: from the global RNG, or, given
    one seed per sample, row by row from a generator seeded with that sample's seed (a sample's
    rows of every site in turn), so that they do not depend on the batch."""
    if sample_seeds is None or not values:
        for value in values:
            value.normal_()
        return
    generator = torch.Generator(device=values[0].device)
    for row, seed in enumerate(sample_seeds):
        generator.manual_seed(seed)
        for value in values:
            value[row].normal_(generator=generator)


def _from_normal(value: Tensor, loc: Tensor, scale: Tensor, support: constraints.Constraint, in_place: bool) -> Tensor:
    """``biject_to(support)(loc + scale * value)`` for standard normal ``value``, computed in
    ``value`` where possible (and always, when ``in_place``: it is the caller's buffer)."""
    value.mul_(scale).add_(loc)
    result = _in_place(biject_to(support), value)
    return value.copy_(result) if in_place and result is not value else result


def _fits(buffer: Tensor, loc: Tensor, value_shape: torch.Size, num: int) -> bool:
    """Whether ``num`` draws around ``loc`` can be made in ``buffer``: same dtype, device and
    element count, contiguous, and a site whose value has the unconstrained shape (a simplex's
    has one more element per row than its unconstrained space)."""
    return (
        buffer.is_contiguous() and buffer.dtype == loc.dtype and buffer.device == loc.device
        and buffer.numel() == num * loc.numel() and tuple(value_shape) == tuple(loc.shape)
    )


class Sampler:
    """Draws of a Predictive, vectorised (:meth:`draw`) or one at a time (:meth:`draw_one`).
    Construction runs the model once unvectorised to learn ``nesting``, ``sites`` and the
    observed sites' data (``observed``), and a guide outside :func:`closed_form` once to learn
    its sites' shapes; ``draw`` then returns ``{site: [num, *shape]}`` for the requested sites,
    on the device of the arguments it is given.

    Latent values come from ``posterior`` (a batch of posterior samples given to ``draw``), else
    from the guide: drawn in closed form or by tracing the guide under the sample plate. Each
    latent is fed to the model as ``pyro.infer.Predictive`` feeds it: a guide's draws shaped as
    its sites, padded to the guide's plate nesting, then every latent's per-sample shape padded
    with ones to the model's nesting.

    The unvectorised run checks the distributions' arguments as Pyro is set to; draws run with
    Pyro's validation off unless ``validate`` (the checks cost ~20% of a likelihood draw and
    would only repeat, per sample, what the first run checked), as an SVI loop may turn them
    off after its first step.

    ``threads``: draw the host's large sample sites block-parallel on that many threads
    (:class:`devicemem.blockdraw.BlockDraws`: the same values for any number of threads);
    None keeps each distribution's own single-threaded sample.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        guide: Callable[..., Any] | None,
        args: tuple,
        kwargs: Mapping[str, Any],
        validate: bool = False,
        threads: int | None = None,
    ) -> None:
        self.model = model
        self.guide = guide
        self.validate = validate
        self.threads = threads
        self.nesting, self.sites, trace = model_sites(model, args, dict(kwargs))
        self.observed = {
            name: trace.nodes[name]["value"].detach().reshape(site.shape)
            for name, site in self.sites.items() if site.observed
        }
        self.returns_tensor = "_RETURN" in self.sites
        self.closed_form = guide is not None and closed_form(guide)
        self.guide_shapes: dict[str, tuple[int, ...]] = {}
        if guide is None:
            return
        if self.closed_form:
            nodes = dict(guide.prototype_trace.iter_stochastic_nodes())
            nesting = _nesting_of(nodes.values())
            self.guide_shapes = {
                name: (1,) * (nesting - (node["value"].dim() - node["fn"].event_dim)) + tuple(node["value"].shape)
                for name, node in nodes.items()
            }
            self.guide_nesting = nesting
        else:
            guide_trace = _unvectorised_trace(guide, args, dict(kwargs))
            self.guide_nesting = _nesting(guide_trace)
            self.guide_shapes = {
                name: _site_shape(guide_trace.nodes[name], self.guide_nesting) for name in guide_trace.stochastic_nodes
            }

    def _guide_draws(
        self, num: int, args: tuple, kwargs: dict, out: Mapping[str, Tensor], sample_seeds: Sequence[int] | None
    ) -> dict[str, Tensor]:
        """``num`` vectorised draws of each guide site, shaped ``[num, *guide shape]``; closed-form
        draws sample by sample from ``sample_seeds`` when given."""
        guide = self.guide
        if self.closed_form:
            draws, normals = {}, []
            for name, site in guide.prototype_trace.iter_stochastic_nodes():
                if isinstance(guide, AutoDelta):
                    point = attrgetter(name)(guide)  # how AutoDelta itself reads its point
                    draws[name] = point.expand((num,) + tuple(point.shape)).reshape((num,) + self.guide_shapes[name])
                    continue
                loc, scale = guide._get_loc_and_scale(name)
                buffer = out.get(name)
                if buffer is not None and not _fits(buffer, loc, site["value"].shape, num):
                    buffer = None
                shape = (num,) + tuple(loc.shape)
                value = torch.empty(shape, dtype=loc.dtype, device=loc.device) if buffer is None else buffer.view(shape)
                normals.append((name, value, loc, scale, site["fn"].support, buffer is not None))
            _standard_normals([entry[1] for entry in normals], sample_seeds)
            for name, value, loc, scale, support, in_place in normals:
                draws[name] = _from_normal(value, loc, scale, support, in_place).reshape((num,) + self.guide_shapes[name])
            return draws
        plate = pyro.plate(PLATE_NAME, num, dim=-self.guide_nesting - 1)
        trace = poutine.trace(plate(poutine.mask(guide, mask=False))).get_trace(*args, **kwargs)
        return {name: _reshape(trace.nodes[name]["value"], (num,) + shape) for name, shape in self.guide_shapes.items()}

    def _condition(self, value: Tensor, num: int) -> Tensor:
        """``num`` values of a latent, ``[num, *shape]``, as Pyro conditions the vectorised model
        on them: ``shape`` padded on the left with ones to the model's plate nesting."""
        shape = tuple(value.shape[1:])
        return value.reshape((num,) + (1,) * (self.nesting - len(shape)) + shape)

    def trace(
        self,
        num: int,
        args: tuple,
        kwargs: dict,
        posterior: Mapping[str, Tensor] | None = None,
        out: Mapping[str, Tensor] | None = None,
        sample_seeds: Sequence[int] | None = None,
    ) -> poutine.Trace:
        """The model's trace under a sample plate of ``num``, conditioned on ``posterior`` (else
        on the guide's draws), with log-densities masked off, as Pyro's vectorised Predictive."""
        with torch.no_grad(), pyro.validation_enabled(self.validate), self._block_draws():
            latent = dict(posterior) if posterior is not None else {}
            if self.guide is not None:
                latent.update(self._guide_draws(num, args, kwargs, out or {}, sample_seeds))
            condition = {name: self._condition(value, num) for name, value in latent.items()}
            plate = pyro.plate(PLATE_NAME, num, dim=-self.nesting - 1)
            masked = poutine.mask(self.model, mask=False)
            return poutine.trace(poutine.condition(plate(masked), condition)).get_trace(*args, **kwargs)

    def draw(
        self,
        num: int,
        args: tuple,
        kwargs: dict,
        returned: Collection[str],
        posterior: Mapping[str, Tensor] | None = None,
        out: Mapping[str, Tensor] | None = None,
        sample_seeds: Sequence[int] | None = None,
    ) -> dict[str, Tensor]:
        """``num`` vectorised samples of each site in ``returned``; ``posterior`` holds ``num``
        posterior samples per latent site (instead of drawing them from the guide). ``out``
        offers buffers [num, *shape] that closed-form draws are written into directly (the
        returned values then share their memory); the others are left alone.
        ``sample_seeds`` (one per sample) seed the closed-form latent draws sample by sample.
        Raises :class:`NotVectorised` when a sampled site's value is not one per sample."""
        trace = self.trace(num, args, kwargs, posterior, out, sample_seeds)
        for name, site in self.sites.items():
            if name != "_RETURN" and not site.observed and name in trace.nodes:
                _check_vectorised(name, trace.nodes[name]["value"], (num,) + site.shape)
        return {name: _reshape(trace.nodes[name]["value"], (num,) + self.sites[name].shape) for name in returned}

    def draw_one(
        self, args: tuple, kwargs: dict, returned: Collection[str], posterior: Mapping[str, Tensor] | None = None,
        sample_seed: int | None = None,
    ) -> dict[str, Tensor]:
        """One sample of each site in ``returned``, ``[1, *shape]``, as Pyro's sequential mode
        draws it: the model unvectorised (no sample plate), conditioned on ``posterior`` (one
        posterior sample per latent, without the sample dim) or on one draw of the guide."""
        with torch.no_grad(), pyro.validation_enabled(self.validate), self._block_draws():
            latent = dict(posterior) if posterior is not None else {}
            if self.guide is not None:
                latent.update(self._guide_one(args, kwargs, sample_seed))
            masked = poutine.mask(self.model, mask=False)
            trace = poutine.trace(poutine.condition(masked, latent)).get_trace(*args, **kwargs)
        drawn = {}
        for name in returned:
            value, shape = trace.nodes[name]["value"], self.sites[name].shape
            if value.numel() != self.sites[name].numel:
                raise RuntimeError(
                    f"site {name!r}: a sequential draw gave shape {list(value.shape)}; the model's first run gave "
                    f"{list(shape)} (a model whose shapes change from run to run cannot be stacked)"
                )
            drawn[name] = value.reshape((1,) + shape)
        return drawn

    def _block_draws(self) -> BlockDraws | nullcontext:
        """Large host sites drawn block-parallel on ``threads`` threads (none given: their own
        sampler)."""
        return BlockDraws(self.threads) if self.threads is not None else nullcontext()

    def _guide_one(self, args: tuple, kwargs: dict, sample_seed: int | None) -> dict[str, Tensor]:
        if self.closed_form:
            seeds = None if sample_seed is None else [sample_seed]
            return {name: value[0] for name, value in self._guide_draws(1, args, kwargs, {}, seeds).items()}
        trace = poutine.trace(poutine.mask(self.guide, mask=False)).get_trace(*args, **kwargs)
        return {name: trace.nodes[name]["value"].reshape(shape) for name, shape in self.guide_shapes.items()}


def _check_vectorised(name: str, value: Tensor, expected: tuple[int, ...]) -> None:
    """:class:`NotVectorised` unless ``value`` holds one value of the site per sample: as many
    elements as ``expected`` and, past leading ones, the sample dim first."""
    num = expected[0]
    leading = next((size for size in value.shape if size != 1), 1)
    if value.numel() != int(np.prod(expected, dtype=np.int64)) or (num > 1 and leading != num):
        raise NotVectorised(name, tuple(value.shape), expected)


def _reshape(value: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``value`` as ``shape``, broadcast when it has fewer elements (a site that does not vary
    with the sample plate), as ``pyro.infer.Predictive`` returns it."""
    if value.numel() < int(np.prod(shape, dtype=np.int64)):
        return value.expand(shape)
    return value.reshape(shape)

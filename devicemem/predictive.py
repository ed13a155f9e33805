"""The public ``Predictive``: Pyro's class, device-aware and memory-safe. A facade only.

``Predictive`` is a drop-in for ``pyro.infer.Predictive``: same signature, keys, shapes and
dtypes, on the CPU. It applies Pyro's argument rules, reads devicemem's options once into
typed records (:mod:`devicemem.options`), and hands each call, as one
:class:`~devicemem.execute.request.Request`, to :mod:`devicemem.execute.local` (batches on this
process's devices) or :mod:`devicemem.execute.ray` (shards on Ray).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Collection, Mapping, Sequence

import torch
from torch import Tensor

from devicemem import logs
from devicemem.backends import MemoryView, SystemProbe
from devicemem.checks import check_int, check_site_names
from devicemem.execute import local
from devicemem.execute import ray as sharded
from devicemem.execute import transformed
from devicemem.execute.local import BatchRecord
from devicemem.execute.request import Request
from devicemem.options import DrawOptions, MemoryOptions, OutputOptions
from devicemem.planner import Plan
from devicemem.sampling import PYRO_LOCK


def _check_posterior(posterior_samples: Mapping[str, Tensor], num_samples: int | None) -> int | None:
    """The run's number of samples as Pyro decides it: the posterior's leading size (with
    Pyro's warning when ``num_samples`` differs), else ``num_samples``."""
    if not isinstance(posterior_samples, Mapping):
        raise ValueError(
            f"posterior_samples: expected a dict of tensors [num_samples, ...]; got {type(posterior_samples).__name__}"
        )
    leading = {}
    for name, value in posterior_samples.items():
        if not torch.is_tensor(value) or value.dim() == 0:
            raise ValueError(f"posterior_samples[{name!r}]: expected a tensor [num_samples, ...]; got {value!r:.60}")
        leading[name] = value.shape[0]
    sizes = set(leading.values())
    if len(sizes) > 1:
        raise ValueError(f"posterior_samples: leading dims differ: {leading}; every site needs the same num_samples")
    if not sizes:
        return num_samples
    (size,) = sizes
    if num_samples is not None and num_samples != size:
        warnings.warn(
            f"Sample's leading dimension size {size} is different from the provided {num_samples} num_samples "
            f"argument. Defaulting to {size}.", UserWarning,
        )
    return size


class Predictive(torch.nn.Module):
    """Device-aware, batched, OOM-proof ``pyro.infer.Predictive``, with Pyro's signature.

    ``Predictive(model, posterior_samples=None, guide=None, num_samples=None, return_sites=(),
    parallel=None)`` takes Pyro's arguments in Pyro's order with Pyro's rules: the posterior's
    leading size wins over ``num_samples`` (with Pyro's warning); neither a guide nor posterior
    samples draws from the prior; ``return_sites`` empty means the sample sites not in
    ``posterior_samples`` (with a guide: every sample site, as None does), names select sites
    (``"_RETURN"`` the model's return value; names the model lacks are left out with a
    warning). Calling it (or :meth:`forward`) with the model's ``*args, **kwargs`` returns
    ``dict[str, Tensor]`` on the CPU with the keys, shapes and dtypes Pyro returns.

    - ``parallel``: True draws vectorised batches under Pyro's sample plate (a model that does
      not vectorise raises, naming the site); False runs the model one sample at a time with no
      sample plate, as Pyro's default does, each sample written straight into the result; None
      (default) vectorises when a vectorised draw of two samples gives every site one value per
      sample of the unvectorised trace's shape, else runs sequentially and logs why.
    - Observed sites (``obs=`` data, the same in every sample) are returned with Pyro's values,
      shape and dtype, as a stride-0 ``expand`` of one copy of the data, as Pyro's
      ``parallel=True`` does: no ``num_samples`` copies in memory (in-place writes refuse such
      a view; ``.clone()`` makes an own copy).

    devicemem's options, keyword-only:

    - ``device``, ``minibatch_size``, ``safety_factor``, ``max_memory`` go to
      :func:`devicemem.plan_predictive`; ``plan`` replaces that call (the same seed with the
      same plan gives the same draws).
    - ``seed``: each batch is seeded from (seed, index of its first sample) and the global RNG
      is left as it was; None draws from the global RNG like Pyro.
    - ``out``: a directory; results become numpy memmaps ``<site>.npy`` there (needed when
      they exceed host memory; without ``out`` that case fails before sampling), with a
      ``manifest.json`` rewritten after each batch (samples complete, seed, plan, sites;
      ``"complete": false`` until the last batch is on disk).
    - ``resume``: continue the interrupted run in ``out`` from its last complete batch, with its
      plan and the batch size it had reached: with the same seed, the result equals an
      uninterrupted run's. Single-device runs without ``reduce`` only.
    - ``reduce``: ``{"site": ("mean", "var")}`` returns ``"site:mean"`` and ``"site:var"``
      instead of ``site`` (float64, unbiased variance; each batch is reduced on its device,
      which the plan counts, and batches are merged on the host).
    - ``progress``: a tqdm bar over samples with device memory in use and peak vs budget.
    - ``validate``: keep Pyro's argument checks inside the draws. By default only the first,
      unbatched run of the model checks them (they cost ~20% of a likelihood draw).
    - ``allow_nonfinite``: return NaN or infinite draws. By default each batch's returned sites
      are checked (one float64 sum per site) and a NaN or infinity is a ValueError naming the
      site and the first bad sample, where Pyro, validating, would raise too.
    - ``threads``: on the host, large sites drawn from common distributions (negative
      binomial, Poisson, Gamma, Normal...) are drawn block-parallel on this many threads
      (:mod:`devicemem.blockdraw`), with the same values for any number; default
      ``DEVICEMEM_THREADS``, else the cores this process may use (``devicemem info``).
    - ``on_device``: called with the ``torch.device`` before batches run on it, and again
      when the run moves to the host (sharded runs call it in each shard's worker: it must
      pickle).
    - ``verbose``: show each call's log lines on stderr (the ``[MEMORY]`` plan: memory read,
      budget, footprint, batches chosen and why); ``devicemem.log_to_stderr()`` shows them for
      every call from then on.
    - ``probe``: where this call reads device memory, once per call: a
      :class:`devicemem.backends.SystemProbe` (default: this process's; tests inject fakes), or
      a :class:`devicemem.backends.MemoryView` already read, used as it is (a caller that planned
      against it passes it on, so that one call is judged against one reading).
    - ``device``: a name ("auto", "cpu", "cuda:1"...) or a ``torch.device``. ``"all"``, a list of
      several devices (``["cuda:0", "cuda:1"]``) or ``backend="ray"`` (or a
      :class:`devicemem.RayOptions`) split the samples into shards run on Ray, one
      device each (see :mod:`devicemem.execute.ray`); needs ``pip install 'devicemem[ray]'``.
      A list of one device runs here, as that device would.

    Under ``torch.jit.trace`` and the ``torch.func`` transforms (functionalize, grad, vjp, jvp,
    vmap) a call runs ``pyro.infer.Predictive``'s own code on the same model, guide, samples,
    ``return_sites`` and ``parallel`` (None as Pyro's default, False), so it traces and
    transforms as Pyro's does (:mod:`devicemem.execute.transformed`); ``out``, ``reduce``,
    ``resume``, ``seed`` and sharding cannot be honoured there and raise ValueError naming the
    transform.

    Threads: Pyro's handler stack and the RNG are global to the process, so calls from several
    threads are serialised by one process-wide lock (``devicemem.sampling.PYRO_LOCK``, also
    held by the planner's probe): each returns what it would alone, one after the other.

    After a call, ``.plan`` is the plan used and ``.report`` one :class:`BatchRecord` per batch
    (sharded: ``.plan`` is None and ``.report`` one ``ShardRecord`` per shard, with its plan).
    """

    def __init__(
        self,
        model: Callable[..., Any],
        posterior_samples: Mapping[str, Tensor] | None = None,
        guide: Callable[..., Any] | None = None,
        num_samples: int | None = None,
        return_sites: Collection[str] | None = (),
        parallel: bool | None = None,
        *,
        device: str | Sequence[str] = "auto",
        minibatch_size: int | None = None,
        safety_factor: float | None = None,
        max_memory: Any = None,
        seed: int | None = None,
        progress: bool = True,
        out: str | Path | None = None,
        reduce: Mapping[str, Sequence[str] | str] | None = None,
        plan: Plan | None = None,
        backend: Any = None,
        validate: bool = False,
        allow_nonfinite: bool = False,
        threads: int | None = None,
        on_device: Callable[[torch.device], None] | None = None,
        resume: bool = False,
        probe: SystemProbe | MemoryView | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__()
        if posterior_samples is None and num_samples is None:
            raise ValueError("Either posterior_samples or num_samples must be specified.")
        posterior_samples = {} if posterior_samples is None else posterior_samples
        num_samples = _check_posterior(posterior_samples, num_samples)
        if num_samples is None:
            raise ValueError("No sample sites in posterior samples to infer `num_samples`.")
        if guide is not None and posterior_samples:
            raise ValueError("`posterior_samples` cannot be provided with the `guide` argument.")
        num_samples = check_int(num_samples, "num_samples")
        if return_sites is not None:
            return_sites = check_site_names(return_sites)
        self.draw_options = DrawOptions.parse(
            parallel=parallel, seed=seed, validate=validate, allow_nonfinite=allow_nonfinite, threads=threads,
            on_device=on_device, progress=progress,
        )
        self.memory_options = MemoryOptions.parse(
            num_samples, device=device, backend=backend, minibatch_size=minibatch_size, safety_factor=safety_factor,
            max_memory=max_memory, plan=plan, probe=probe,
        )
        self.output_options = OutputOptions.parse(self.memory_options, out=out, reduce=reduce, resume=resume)
        self.model = model
        self.posterior_samples = dict(posterior_samples)
        self.num_samples = num_samples
        self.guide = guide
        self.return_sites = return_sites
        self.parallel = parallel
        self.plan = plan
        self.verbose = bool(verbose)
        self.report: list[BatchRecord | sharded.ShardRecord] = []

    def _request(self) -> Request:
        return Request(
            self.model, self.guide, self.posterior_samples, self.num_samples, self.return_sites,
            self.memory_options, self.draw_options, self.output_options,
        )

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Samples of the predictive distribution for the model's ``*args, **kwargs``: by
        default the sample sites not in ``posterior_samples`` (every one with a guide)."""
        transform = transformed.active_transform()
        with PYRO_LOCK, logs.shown(logging.INFO if self.verbose else None):
            self.report = []
            if transform is not None:
                self.plan = None
                return transformed.run(self._request(), transform, args, kwargs)
            if self.memory_options.sharding is not None:
                self.plan = None
                return sharded.run(self._request(), args, kwargs, self.report)
            samples, self.plan = local.run(self._request(), args, kwargs, self.report)
            return samples

    def call(self, *args: Any, **kwargs: Any) -> tuple[Tensor, ...]:
        """:meth:`forward`'s values as a tuple sorted by name, as Pyro's ``call``."""
        return tuple(value for _, value in sorted(self.forward(*args, **kwargs).items()))

    def get_samples(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Pyro's deprecated alias of :meth:`forward`."""
        warnings.warn("The method `.get_samples` has been deprecated in favor of `.forward`.", DeprecationWarning)
        return self.forward(*args, **kwargs)

    def get_vectorized_trace(self, *args: Any, **kwargs: Any) -> Any:
        """Pyro's ``get_vectorized_trace``: one ``pyro.poutine.Trace`` of the model under a
        sample plate of all ``num_samples`` samples, on the arguments' device. It is one
        vectorised run of the whole posterior, outside devicemem's batching and memory plan."""
        return local.vectorized_trace(self._request(), args, kwargs)

"""SVI over chunks of cells: the exact full-data gradient in a fraction of the memory.

:class:`CellData` holds the cell-wise model arguments (counts, groups, sum factors,
denominator) where the training plan puts them (on the training device, or on the host and
copied one chunk at a time through pinned staging buffers) in the smallest exact dtype, and
hands out chunks as the model's dtype on the training device. :class:`ChunkedELBO` plugs into
``pyro.infer.SVI`` as its loss: each step draws the guide's latents once and computes the
prior and guide terms once (the wrapped ELBO on the parameters-only model), then replays the
model on one chunk of cells at a time with the draws held as detached leaves, calling backward
per chunk so their gradients accumulate, and finally backpropagates the accumulated gradients
into the guide in one pass. The result equals the full-data step's gradient up to the order of
summation, so clipping, the optimiser and its schedule see what full-data SVI gives them.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterator

import pyro.poutine as poutine
import torch
from pyro.infer import ELBO
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

from bayesDREAM_ext.counts import Counts
from devicemem.recovery import retries

logger = logging.getLogger("devicemem.bayesdream")

class CellData:
    """Cell-wise values (:class:`~bayesDREAM_ext.counts.Counts`, or [N, ...] tensors such as the
    groups and sum factors) kept on ``storage`` ("cpu" or the training device), handed out per
    chunk on ``device`` as ``dtype``.

    ``compact=True`` stores floating values in their smallest exact dtype (a copy);
    ``compact=False`` keeps them as given (the CPU path uses the prepared counts in place). A
    sparse matrix stays sparse on the host and only each chunk is densified. When values are
    on the host and the device is CUDA, chunks go through two pinned staging buffers and a
    copy stream: chunk k + 1 is transferred while chunk k is computed on.
    """

    def __init__(
        self, tensors: dict[str, Counts | Tensor], *, device: torch.device, storage: torch.device, compact: bool,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.device, self.storage, self.dtype = device, storage, dtype
        self.cells = {
            name: Counts.wrap(value).stored(storage, compact=compact and name != "groups") for name, value in tensors.items()
        }
        self.n_cells = next(iter(self.cells.values())).n_cells
        self._streamed = device.type == "cuda" and storage.type == "cpu"
        self._staging: list[dict[str, Tensor]] = []
        self._events: list[Any] = []
        self._copy_stream: Any = None

    @property
    def nbytes(self) -> int:
        """Bytes of the stored values."""
        return sum(value.nbytes for value in self.cells.values())

    @property
    def dtypes(self) -> dict[str, str]:
        return {name: value.dtype_name for name, value in self.cells.items()}

    def _cast(self, name: str, value: Tensor) -> Tensor:
        return value if name == "groups" else value.to(self.dtype)

    def chunk(self, cells: slice | Tensor) -> dict[str, Tensor]:
        """The values of ``cells`` (a slice or an index tensor) on the device, dense and cast."""
        return {name: self._cast(name, value.rows(cells).to(self.device)) for name, value in self.cells.items()}

    def _staged(self, cells: slice | Tensor, slot: int, size: int) -> tuple[int, dict[str, Tensor]]:
        """Copy ``cells`` into pinned buffer ``slot`` and start its transfer on the copy stream."""
        if not self._staging:
            self._staging = [
                {name: torch.empty((size,) + value.shape[1:], dtype=value.rows(slice(0, 1)).dtype).pin_memory() for name, value in self.cells.items()}
                for _ in range(2)
            ]
            self._events = [torch.cuda.Event(), torch.cuda.Event()]
            self._copy_stream = torch.cuda.Stream(self.device)
        self._events[slot].synchronize()  # the buffer's previous transfer has finished
        raw = {}
        for name, value in self.cells.items():
            part = value.rows(cells)
            buffer = self._staging[slot][name][: part.shape[0]]
            buffer.copy_(part)
            with torch.cuda.stream(self._copy_stream):
                raw[name] = buffer.to(self.device, non_blocking=True)
        self._events[slot].record(self._copy_stream)
        return slot, raw

    def _ready(self, slot: int, raw: dict[str, Tensor]) -> dict[str, Tensor]:
        """A staged chunk for the compute stream: wait for its transfer, then cast."""
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(self._events[slot])
        for value in raw.values():
            value.record_stream(stream)
        return {name: self._cast(name, value) for name, value in raw.items()}

    def chunks(self, index: Tensor | None, size: int) -> Iterator[dict[str, Tensor]]:
        """Successive chunks of at most ``size`` cells: of all cells in order, or of ``index``.
        When streaming to CUDA, chunk k + 1's copy runs on its own stream while chunk k is used."""
        total = self.n_cells if index is None else int(index.numel())
        parts = [
            slice(start, min(start + size, total)) if index is None else index[start : start + size]
            for start in range(0, total, size)
        ]
        if not self._streamed:
            for cells in parts:
                yield self.chunk(cells)
            return
        if self._staging and self._staging[0][next(iter(self.cells))].shape[0] < size:
            self._staging = []
        ahead = self._staged(parts[0], 0, size)
        for k in range(len(parts)):
            current = ahead
            if k + 1 < len(parts):
                ahead = self._staged(parts[k + 1], (k + 1) % 2, size)
            yield self._ready(*current)


class ChunkedELBO:
    """The loss of ``elbo`` (TraceMeanField_ELBO or Trace_ELBO, one particle) with the
    likelihood summed over chunks of ``chunk_cells`` cells of ``cells``.

    Pass ``loss=chunked.loss, loss_and_grads=chunked.loss_and_grads`` to ``SVI`` and call
    ``svi.step`` with the model's keyword arguments, the cell-wise ones None: the
    chunks supply the cell-wise arguments. ``minibatch``: each step uses that many cells drawn
    at random without replacement (torch's generator), the likelihood scaled by N / B. On an
    out-of-memory error inside a chunk (``is_oom``), ``release`` is called, the chunk halved
    and the step's likelihood redone with the same draws (no progress lost); ``chunk_cells``
    then holds the new size and ``shrinks`` the reasons.
    """

    def __init__(
        self, elbo: ELBO, cells: CellData, chunk_cells: int, *, minibatch: int | None = None,
        is_oom: Callable[[BaseException], bool] = lambda exc: False, release: Callable[[], None] = lambda: None,
    ) -> None:
        self.elbo, self.cells, self.chunk_cells, self.minibatch = elbo, cells, chunk_cells, minibatch
        self.is_oom, self.release = is_oom, release
        self.shrinks: list[str] = []

    def _cells_of_step(self) -> tuple[Tensor | None, float]:
        if self.minibatch is None or self.minibatch >= self.cells.n_cells:
            return None, 1.0
        index = torch.randperm(self.cells.n_cells)[: self.minibatch].sort().values
        return index, self.cells.n_cells / self.minibatch

    def _likelihood(self, model: Callable, leaves: dict[str, Tensor], kwargs: dict[str, Any], index: Tensor | None, scale: float, backward: bool) -> float:
        """-log p(data | draws) summed over the chunks; with ``backward`` its gradient is
        accumulated into the leaves' ``.grad``."""
        conditioned = poutine.scale(poutine.condition(model, data=leaves), scale=scale)

        def is_likelihood(name: str, site: dict) -> bool:
            return site["is_observed"] and name not in leaves and not site["infer"].get("_deterministic")

        total = 0.0
        for chunk in self.cells.chunks(index, self.chunk_cells):
            trace = poutine.trace(conditioned).get_trace(**{**kwargs, **chunk, "observe": True})
            trace.compute_log_prob(site_filter=is_likelihood)
            loss = -sum(site["log_prob_sum"] for name, site in trace.nodes.items() if site["type"] == "sample" and is_likelihood(name, site))
            if backward:
                loss.backward()
            total += float(loss.detach())
            del trace, loss, chunk
        return total

    def _step(self, model: Callable, guide: Callable, kwargs: dict[str, Any], backward: bool) -> float:
        recorder = poutine.trace(guide)
        params_only = {**kwargs, "observe": False}
        global_loss = self.elbo.differentiable_loss(model, recorder, **params_only)
        draws = {
            name: site["value"]
            for name, site in prune_subsample_sites(recorder.trace).nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and not site["infer"].get("is_auxiliary")
        }
        leaves = {name: value.detach().requires_grad_(backward) for name, value in draws.items()}
        index, scale = self._cells_of_step()

        def release() -> None:  # the failed chunks' gradients go too: the step is redone from its draws
            for leaf in leaves.values():
                leaf.grad = None
            self.release()

        for attempt in retries(self.chunk_cells, self._halve, is_oom=self.is_oom, release=release):
            with attempt:
                likelihood = self._likelihood(model, leaves, kwargs, index, scale, backward)
        if backward:
            surrogate = global_loss + sum((draws[name] * leaf.grad).sum() for name, leaf in leaves.items() if leaf.grad is not None)
            if surrogate.requires_grad:
                surrogate.backward()
        return float(global_loss.detach()) + likelihood

    def _halve(self, chunk: int, exc: BaseException) -> int | None:
        """After a chunk ran out of memory: chunks of half as many cells (none below one)."""
        if chunk == 1:
            return None
        smaller = max(1, chunk // 2)
        reason = f"a chunk of {chunk} cells ran out of memory ({type(exc).__name__}); redoing the step in chunks of {smaller}"
        logger.warning("[MEMORY] %s", reason)
        self.shrinks.append(reason)
        self.chunk_cells = smaller
        return smaller

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The loss of one step (no gradients)."""
        with torch.no_grad():
            return self._step(model, guide, kwargs, backward=False)

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The loss of one step; the parameters' ``.grad`` hold its full gradient."""
        return self._step(model, guide, kwargs, backward=True)

    def chunks_per_step(self) -> int:
        """Chunks one step runs now."""
        cells = self.cells.n_cells if self.minibatch is None else min(self.minibatch, self.cells.n_cells)
        return math.ceil(cells / self.chunk_cells)


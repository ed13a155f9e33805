"""What to do when memory runs out: the one loop every out-of-memory recovery goes through.

An out-of-memory error is recognised by the failing device's backend (``Backend.is_oom``, one
predicate per kind; ``devicemem.backends.registry.is_oom_anywhere`` asks them all). Recovering from one is always the same
steps, written once in :func:`retries`: leave the ``except`` block first (the failed
attempt's frames, and the tensors they hold, die with it), release memory (garbage
collection, the device's cache), then try again with a smaller or different attempt (half the
batch or chunk, the next device, the next way of laying out the work), or give up with the
original error when there is none. Every user of it says only what the next attempt is:

- the runner (:mod:`devicemem.execute.local`): a batch halves; a device that cannot hold one sample
  hands the rest of the run to the host;
- the footprint probe (:mod:`devicemem.footprint`): a probe batch that runs out ends the climb
  with the batches measured so far (none: the error stands);
- the planner (:meth:`devicemem.backends.MemoryView.pick`): a device that runs out while
  probed gives way to the next candidate;
- bayesDREAM_ext's training stages and its chunked ELBO's step (a chunk halves, the step is
  redone with the same draws).
"""

from __future__ import annotations

import gc
import logging
from typing import Any, Callable, Generic, Iterator, TypeVar

logger = logging.getLogger("devicemem.recovery")

T = TypeVar("T")


def freeing(backend: Any, device: str) -> Callable[[], None]:
    """What to release after an out-of-memory error on ``device``: garbage (tensors in
    reference cycles hold memory until collected), then the backend's cached blocks."""

    def release() -> None:
        gc.collect()
        backend.empty_cache(device)

    return release


class Attempt(Generic[T]):
    """One try at ``state`` (a batch size, a device, a plan...): run it in ``with attempt:``.

    Leaving the block with an out-of-memory error (``is_oom``) asks ``smaller(state, exc)`` for
    the next state, inside the handler (it must decide cheaply and keep no reference to
    ``exc``; it may raise an error of its own instead, chained to ``exc``): None lets the
    original error through, anything else swallows it so that :func:`retries` goes on.
    """

    def __init__(self, state: T, smaller: Callable[[T, BaseException], T | None],
                 is_oom: Callable[[BaseException], bool]) -> None:
        self.state = state
        self.next: T | None = None
        self._smaller = smaller
        self._is_oom = is_oom

    def __enter__(self) -> Attempt[T]:
        return self

    def __exit__(self, kind: type | None, exc: BaseException | None, traceback: object) -> bool:
        if exc is None or not isinstance(exc, Exception) or not self._is_oom(exc):
            return False
        self.next = self._smaller(self.state, exc)
        return self.next is not None


def retries(
    first: T,
    smaller: Callable[[T, BaseException], T | None],
    *,
    is_oom: Callable[[BaseException], bool],
    release: Callable[[], None] = gc.collect,
) -> Iterator[Attempt[T]]:
    """Attempts at ``first``, then at each state ``smaller`` gives after an out-of-memory
    error, until one finishes without one::

        for attempt in retries(batch_size, halve, is_oom=backend.is_oom, release=free):
            with attempt:
                draw(attempt.state)

    Between attempts, outside the failed one's ``except`` block, ``release()`` frees what it
    held. An error that is not an out-of-memory one, or one ``smaller`` has no answer to,
    propagates from the ``with`` block as raised.
    """
    state = first
    while True:
        attempt = Attempt(state, smaller, is_oom)
        yield attempt
        if attempt.next is None:
            return
        state = attempt.next
        del attempt
        release()

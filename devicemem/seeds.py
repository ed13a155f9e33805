"""Seeds: every executor draws the same samples for the same (seed, sample index).

A batch's own stream (the model's draws, and guides drawn by tracing) is seeded from (seed,
the batch's first sample) by :func:`batch_seed` (:func:`seeded` forks the host's and the
device's generators for it); closed-form latents draw each sample from its own seed,
:func:`sample_seeds`, so they do not depend on the batch. :func:`rng_restored` leaves the
global generators as they were around work that must not disturb them (a probe, shape
learning).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

LATENT_STREAM = 1  # tells sample_seeds' entropy from batch_seed's, so the two streams differ


def batch_seed(seed: int, start: int) -> int:
    """The torch seed of the batch whose first sample has index ``start``."""
    return int(np.random.SeedSequence([seed, start]).generate_state(1, np.uint64)[0])


def sample_seeds(seed: int, first: int, count: int) -> list[int]:
    """The seeds of samples ``first .. first + count - 1``'s latent draws: each depends on
    (seed, sample index) only, never on the batch the sample is drawn in."""
    return [
        int(np.random.SeedSequence([seed, index, LATENT_STREAM]).generate_state(1, np.uint64)[0])
        for index in range(first, first + count)
    ]


@contextmanager
def seeded(seed: int | None, start: int, device: torch.device) -> Iterator[None]:
    """Seed the host RNG and ``device``'s RNG for the batch whose first sample is ``start``;
    restore both afterwards. ``seed=None`` leaves the global RNG to the batch, as Pyro does."""
    if seed is None:
        yield
        return
    value = batch_seed(seed, start)
    accelerator = [device.index or 0] if device.type != "cpu" else []
    with torch.random.fork_rng(devices=accelerator, device_type=device.type if accelerator else "cuda"):
        torch.default_generator.manual_seed(value)
        if device.type == "cuda":
            with torch.cuda.device(accelerator[0]):
                torch.cuda.manual_seed(value)
        elif accelerator:
            getattr(torch, device.type).manual_seed(value)
        yield


@contextmanager
def rng_restored(device: torch.device | None = None) -> Iterator[None]:
    """Run with the global RNGs put back as they were on exit: the host's, each CUDA device's
    already initialised, and ``device``'s when it is a CUDA device."""
    cuda = set(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else set()
    if device is not None and device.type == "cuda":
        cuda.add(device.index or 0)
    with torch.random.fork_rng(devices=sorted(cuda)):
        yield

"""Worker-side helpers for the Ray tests: they run inside Ray workers, so they live in a module
the workers can import (``tests.distributed_fakes``) and pickle by reference."""

from __future__ import annotations

import os
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

from devicemem.backends import DeviceMemory, register_backend
from devicemem.backends.host import CpuBackend


def indexed_model(n_values: int) -> None:
    """``index`` echoes the posterior sample's ``i``: the result shows which sample went where."""
    i = pyro.sample("i", dist.Normal(0.0, 1.0))
    pyro.deterministic("index", i)
    with pyro.plate("values", n_values):
        pyro.sample("noise", dist.Normal(i, 1.0))


class KillOnce:
    """``worker_setup`` that kills the worker process running shard ``index`` on its first
    attempt (a marker file in ``directory`` remembers the attempt), like an OOM kill would."""

    def __init__(self, directory: Path, index: int, every_attempt: bool = False) -> None:
        self.directory = Path(directory)
        self.index = index
        self.every_attempt = every_attempt

    def attempts(self) -> int:
        return len(list(self.directory.glob(f"shard{self.index}-*")))

    def __call__(self, shard) -> None:
        if shard.index != self.index or (self.attempts() and not self.every_attempt):
            return
        (self.directory / f"shard{self.index}-{os.getpid()}").touch()
        os._exit(1)


class FakeGpus(CpuBackend):
    """Devices ``fake:<i>`` that are the host underneath (RSS-measured like the host) but
    report the memory given for each, so each shard must plan against its own device."""

    kind = "fake"

    def __init__(self, sizes: dict[str, int]) -> None:
        super().__init__()
        self.sizes = sizes

    def discover(self, probe) -> list[DeviceMemory]:
        return [DeviceMemory(name, "fake GPU", size, size, None, size, ("fake",)) for name, size in self.sizes.items()]

    def torch_device(self, device: str) -> torch.device:
        return torch.device("cpu")


class RegisterFakeGpus:
    """``worker_setup`` registering :class:`FakeGpus` in the worker (never in the test process)."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.sizes = sizes

    def __call__(self, shard) -> None:
        register_backend("fake", FakeGpus(self.sizes))

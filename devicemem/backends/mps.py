"""Apple-silicon GPUs through torch's MPS backend: one device, ``"mps"``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from devicemem.backends.base import Backend, DeviceMemory
from devicemem.backends.host import PeakSampler
from devicemem.backends.probe import SystemProbe

if TYPE_CHECKING:
    import torch


class MpsBackend(Backend):
    """usable = ``torch.mps.recommended_max_memory() - current_allocated_memory()``; free
    subtracts the driver's whole allocation (cached blocks included) instead. torch keeps no
    MPS peak, so ``reset_peak`` starts a 2 ms sampler of the allocated bytes."""

    kind = "mps"

    def __init__(self, probe: SystemProbe | None = None) -> None:
        super().__init__(probe)
        self._sampler: PeakSampler | None = None

    def discover(self, probe: SystemProbe) -> list[DeviceMemory]:
        torch_module = probe.torch
        mps_backend = getattr(getattr(torch_module, "backends", None), "mps", None)
        if mps_backend is None or not mps_backend.is_available():
            return []
        mps = torch_module.mps
        total = int(mps.recommended_max_memory())
        return [
            DeviceMemory(
                device="mps",
                name="Apple MPS",
                total_bytes=total,
                free_bytes=max(total - int(mps.driver_allocated_memory()), 0),
                limit_bytes=None,
                usable_bytes=max(total - int(mps.current_allocated_memory()), 0),
                sources=("torch.mps.recommended_max_memory",),
            )
        ]

    def torch_device(self, device: str) -> torch.device:
        import torch

        return torch.device("mps")

    def reset_peak(self, device: str) -> None:
        if self._sampler is not None:
            self._sampler.stop()
        self._sampler = PeakSampler(self.probe.torch.mps.current_allocated_memory)

    def current_bytes(self, device: str) -> int | None:
        return int(self.probe.torch.mps.current_allocated_memory())

    def peak_bytes(self, device: str) -> int | None:
        return self._sampler.stop() if self._sampler is not None else None

    def empty_cache(self, device: str) -> None:
        self.probe.torch.mps.empty_cache()

    def is_oom(self, exc: BaseException) -> bool:
        return isinstance(exc, RuntimeError) and "MPS backend out of memory" in str(exc)

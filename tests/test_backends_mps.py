"""MPS discovery and peak sampling with a fake torch.mps."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

from devicemem.backends.mps import MpsBackend
from backend_fakes import GiB, fake_torch, probe


def fake_mps(allocated: int) -> SimpleNamespace:
    return SimpleNamespace(
        recommended_max_memory=lambda: 20 * GiB,
        driver_allocated_memory=lambda: 8 * GiB,
        current_allocated_memory=lambda: allocated,
    )


def test_usable_is_recommended_max_minus_allocated(tmp_path: Path) -> None:
    (memory,) = MpsBackend().discover(probe(tmp_path, torch=fake_torch(mps=fake_mps(5 * GiB))))
    assert (memory.device, memory.total_bytes, memory.free_bytes, memory.usable_bytes) == (
        "mps", 20 * GiB, 12 * GiB, 15 * GiB,
    )
    assert memory.sources == ("torch.mps.recommended_max_memory",)


def test_unavailable_mps_lists_nothing(tmp_path: Path) -> None:
    assert MpsBackend().discover(probe(tmp_path, torch=fake_torch())) == []
    assert MpsBackend().discover(probe(tmp_path, torch=None)) == []


def test_peak_is_the_largest_allocation_sampled_since_reset(tmp_path: Path) -> None:
    readings = iter([GiB, 2 * GiB, 7 * GiB, 3 * GiB])
    sampled = threading.Event()

    def current_allocated_memory() -> int:
        value = next(readings, None)
        if value is None:
            sampled.set()
            return 3 * GiB
        return value

    mps = SimpleNamespace(current_allocated_memory=current_allocated_memory)
    backend = MpsBackend(probe(tmp_path, torch=fake_torch(mps=mps)))
    assert backend.peak_bytes("mps") is None
    backend.reset_peak("mps")
    assert sampled.wait(timeout=30)
    assert backend.peak_bytes("mps") == 7 * GiB


def test_is_oom_knows_the_mps_message() -> None:
    assert MpsBackend().is_oom(RuntimeError("MPS backend out of memory (MPS allocated: 18 GB)"))
    assert not MpsBackend().is_oom(RuntimeError("CUDA out of memory"))

"""CUDA discovery with fake NVML and torch.cuda: index mapping, UUIDs, MIG, degradation."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from devicemem.backends.cuda import CudaBackend
from backend_fakes import (
    FakeCuda, FakeGpu, FakeNvml, FakeOutOfMemoryError, GiB, NVMLError_LibraryNotFound, fake_torch, probe,
)

A100 = FakeGpu("GPU-aaaaaaaa-1111-2222-3333-444444444444", "NVIDIA A100", 80 * GiB, 70 * GiB)
H100 = FakeGpu("GPU-bbbbbbbb-1111-2222-3333-444444444444", "NVIDIA H100", 96 * GiB, 90 * GiB)
MIG = FakeGpu("MIG-cccccccc-1111-2222-3333-444444444444", "NVIDIA H100 MIG 1g.12gb", 12 * GiB, 11 * GiB)
H100_MIG = FakeGpu("GPU-dddddddd-1111-2222-3333-444444444444", "NVIDIA H100", 96 * GiB, 0, migs=[MIG])
# What torch.cuda.mem_get_info would say: deliberately different numbers, to tell the sources apart.
TORCH_VIEW = [("torch gpu 0", 40 * GiB, 30 * GiB), ("torch gpu 1", 40 * GiB, 20 * GiB)]


def discover(tmp_path: Path, nvml, cuda: FakeCuda, environ=None):
    return CudaBackend().discover(probe(tmp_path, environ=environ, nvml=nvml, torch=fake_torch(cuda)))


def test_visible_devices_1_0_maps_torch_indices_to_nvml_indices(tmp_path: Path) -> None:
    nvml, cuda = FakeNvml([A100, H100]), FakeCuda(TORCH_VIEW)
    found = discover(tmp_path, nvml, cuda, {"CUDA_VISIBLE_DEVICES": "1,0"})
    assert [(m.device, m.name, m.total_bytes, m.free_bytes) for m in found] == [
        ("cuda:0", "NVIDIA H100", 96 * GiB, 90 * GiB),
        ("cuda:1", "NVIDIA A100", 80 * GiB, 70 * GiB),
    ]
    assert all(m.sources == ("nvml",) and m.usable_bytes == m.free_bytes for m in found)
    assert cuda.calls == []  # no CUDA context: neither mem_get_info nor allocator stats
    assert nvml.initialized == 0  # every nvmlInit was matched by nvmlShutdown


def test_without_cuda_visible_devices_torch_and_nvml_indices_agree(tmp_path: Path) -> None:
    found = discover(tmp_path, FakeNvml([A100, H100]), FakeCuda(TORCH_VIEW))
    assert [m.name for m in found] == ["NVIDIA A100", "NVIDIA H100"]


@pytest.mark.parametrize("entry", [H100.uuid, H100.uuid[:12]])
def test_gpu_uuid_entries_full_or_unique_prefix(tmp_path: Path, entry: str) -> None:
    (memory,) = discover(tmp_path, FakeNvml([A100, H100]), FakeCuda(TORCH_VIEW[:1]), {"CUDA_VISIBLE_DEVICES": entry})
    assert (memory.device, memory.name, memory.free_bytes) == ("cuda:0", "NVIDIA H100", 90 * GiB)


@pytest.mark.parametrize("lookup_finds_mig", [True, False])
def test_mig_uuid_entry_reads_the_mig_instance(tmp_path: Path, lookup_finds_mig: bool) -> None:
    nvml = FakeNvml([A100, H100_MIG], uuid_lookup_finds_mig=lookup_finds_mig)
    (memory,) = discover(tmp_path, nvml, FakeCuda(TORCH_VIEW[:1]), {"CUDA_VISIBLE_DEVICES": MIG.uuid})
    assert (memory.name, memory.total_bytes, memory.free_bytes) == (MIG.name, 12 * GiB, 11 * GiB)
    assert memory.sources == ("nvml",)


def test_nvml_missing_degrades_to_torch_with_a_log_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cuda = FakeCuda(TORCH_VIEW)
    with caplog.at_level(logging.INFO, logger="devicemem"):
        found = discover(tmp_path, None, cuda)
    assert [(m.name, m.free_bytes, m.sources) for m in found] == [
        ("torch gpu 0", 30 * GiB, ("torch.cuda.mem_get_info",)),
        ("torch gpu 1", 20 * GiB, ("torch.cuda.mem_get_info",)),
    ]
    assert "[MEMORY] nvidia-ml-py is not installed" in caplog.text


def test_nvml_library_not_found_degrades_to_torch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    nvml = FakeNvml([A100], init_error=NVMLError_LibraryNotFound("NVML Shared Library Not Found"))
    with caplog.at_level(logging.INFO, logger="devicemem"):
        (memory,) = discover(tmp_path, nvml, FakeCuda(TORCH_VIEW[:1]))
    assert (memory.free_bytes, memory.sources) == (30 * GiB, ("torch.cuda.mem_get_info",))
    assert "NVML unavailable (NVML Shared Library Not Found)" in caplog.text


def test_a_lost_gpu_degrades_only_that_device(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lost = FakeGpu(H100.uuid, H100.name, H100.total, H100.free, lost=True)
    cuda = FakeCuda(TORCH_VIEW)
    with caplog.at_level(logging.WARNING, logger="devicemem"):
        found = discover(tmp_path, FakeNvml([A100, lost]), cuda)
    assert [m.sources for m in found] == [("nvml",), ("torch.cuda.mem_get_info",)]
    assert cuda.calls[0] == ("mem_get_info", 1)
    assert "NVML cannot read cuda:1 (GPU is lost)" in caplog.text


@pytest.mark.parametrize("visible", ["foo", "GPU-ffffffff", "7"])
def test_unmatched_visible_entries_degrade_to_torch(tmp_path: Path, visible: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="devicemem"):
        (memory,) = discover(tmp_path, FakeNvml([A100]), FakeCuda(TORCH_VIEW[:1]), {"CUDA_VISIBLE_DEVICES": visible})
    assert memory.sources == ("torch.cuda.mem_get_info",)
    assert "NVML cannot read cuda:0" in caplog.text


def test_own_reusable_cache_counts_once_cuda_is_initialised(tmp_path: Path) -> None:
    cuda = FakeCuda(TORCH_VIEW[:1], initialized=True, reserved=6 * GiB, allocated=2 * GiB)
    (memory,) = discover(tmp_path, FakeNvml([A100]), cuda)
    assert (memory.free_bytes, memory.usable_bytes) == (70 * GiB, 74 * GiB)
    assert memory.sources == ("nvml+torch.cuda cache",)


def test_torch_without_cuda_lists_nothing_and_skips_nvml(tmp_path: Path) -> None:
    nvml = FakeNvml([A100], init_error=AssertionError("NVML must not be asked"))
    assert discover(tmp_path, nvml, FakeCuda([])) == []
    assert CudaBackend().discover(probe(tmp_path, nvml=nvml, torch=None)) == []


def test_plain_cuda_is_the_current_device_only_once_initialised(tmp_path: Path) -> None:
    backend = CudaBackend()
    assert backend.current_device(probe(tmp_path, torch=fake_torch(FakeCuda(TORCH_VIEW, current=1)))) == "cuda:0"
    initialised = FakeCuda(TORCH_VIEW, current=1, initialized=True)
    assert backend.current_device(probe(tmp_path, torch=fake_torch(initialised))) == "cuda:1"


def test_execution_calls_go_to_the_named_device(tmp_path: Path) -> None:
    cuda = FakeCuda(TORCH_VIEW, allocated=3 * GiB)
    backend = CudaBackend(probe(tmp_path, torch=fake_torch(cuda)))
    backend.reset_peak("cuda:1")
    assert (backend.current_bytes("cuda:1"), backend.peak_bytes("cuda:1")) == (3 * GiB, 6 * GiB)
    backend.empty_cache("cuda:1")
    assert cuda.calls == [
        ("reset_peak_memory_stats", 1), ("memory_allocated", 1), ("max_memory_allocated", 1),
        ("device", 1), ("empty_cache", None), ("device-exit", 1),
    ]


def test_is_oom_knows_torch_out_of_memory_and_the_cuda_message(tmp_path: Path) -> None:
    backend = CudaBackend(probe(tmp_path, torch=fake_torch()))
    assert backend.is_oom(FakeOutOfMemoryError("anything"))
    assert backend.is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not backend.is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory"))
    assert not backend.is_oom(MemoryError())


def test_is_oom_with_real_torch() -> None:
    import torch

    assert CudaBackend().is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert not CudaBackend().is_oom(RuntimeError("size mismatch"))

"""CUDA discovery with fake NVML and torch.cuda: UUID matching, MIG, contexts, fractions,
degradation, allocator stats and the OOM predicate."""

from __future__ import annotations

import gc
import logging
import weakref
from pathlib import Path

import pytest
import torch

from devicemem.backends import DeviceMemory, MemoryView, SystemProbe
from devicemem.backends.cuda import CUDA_CONTEXT_BYTES, CudaBackend, bare_uuid
from devicemem.footprint import Footprint
from devicemem.planner import plan_predictive
from backend_fakes import (
    FakeCuda, FakeGpu, FakeNvml, FakeOutOfMemoryError, GiB, NVMLError_LibraryNotFound, fake_torch, probe,
)

A100 = FakeGpu("GPU-aaaaaaaa-1111-2222-3333-444444444444", "NVIDIA A100", 80 * GiB, 70 * GiB)
H100 = FakeGpu("GPU-bbbbbbbb-1111-2222-3333-444444444444", "NVIDIA H100", 96 * GiB, 90 * GiB)
L4 = FakeGpu("GPU-eeeeeeee-1111-2222-3333-444444444444", "NVIDIA L4", 24 * GiB, 20 * GiB)
MIG = FakeGpu("MIG-cccccccc-1111-2222-3333-444444444444", "NVIDIA H100 MIG 1g.12gb", 12 * GiB, 11 * GiB)
H100_MIG = FakeGpu("GPU-dddddddd-1111-2222-3333-444444444444", "NVIDIA H100", 96 * GiB, 0, migs=[MIG])
# What torch.cuda.mem_get_info would say: deliberately different numbers, to tell the sources apart.
TORCH_VIEW = [("torch gpu 0", 40 * GiB, 30 * GiB), ("torch gpu 1", 40 * GiB, 20 * GiB)]


def torch_sees(*gpus: FakeGpu, **kwargs) -> FakeCuda:
    """torch.cuda numbering ``gpus`` in this order, each with its UUID as torch prints it."""
    return FakeCuda(TORCH_VIEW[: len(gpus)], uuids=[bare_uuid(gpu.uuid) for gpu in gpus], **kwargs)


def discover(tmp_path: Path, nvml, cuda: FakeCuda, environ=None):
    return CudaBackend().discover(probe(tmp_path, environ=environ, nvml=nvml, torch=fake_torch(cuda)))


def readings(found) -> list[tuple]:
    return [(m.device, m.name, m.total_bytes, m.free_bytes) for m in found]


@pytest.mark.parametrize("environ", [{}, {"CUDA_VISIBLE_DEVICES": "1,0"}, {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}])
def test_each_torch_device_reads_the_nvml_device_with_its_uuid(tmp_path: Path, environ) -> None:
    # CUDA numbers the H100 first (fastest-first, or CUDA_VISIBLE_DEVICES=1,0); NVML lists the A100 first.
    nvml, cuda = FakeNvml([A100, H100]), torch_sees(H100, A100)
    found = discover(tmp_path, nvml, cuda, environ)
    assert readings(found) == [
        ("cuda:0", "NVIDIA H100", 96 * GiB, 90 * GiB),
        ("cuda:1", "NVIDIA A100", 80 * GiB, 70 * GiB),
    ]
    assert cuda.calls == []  # no CUDA context: neither mem_get_info nor allocator stats
    assert nvml.initialized == 0  # every nvmlInit was matched by nvmlShutdown


def test_a_gpu_nvml_lists_but_cuda_skips_shifts_nothing(tmp_path: Path) -> None:
    found = discover(tmp_path, FakeNvml([A100, L4, H100]), torch_sees(A100, H100))
    assert [m.name for m in found] == ["NVIDIA A100", "NVIDIA H100"]


@pytest.mark.parametrize("lookup_finds_mig", [True, False])
def test_a_mig_instance_is_read_not_its_parent_gpu(tmp_path: Path, lookup_finds_mig: bool) -> None:
    # No CUDA_VISIBLE_DEVICES: CUDA shows the MIG instance as device 0, NVML's device 0 is A100.
    nvml = FakeNvml([A100, H100_MIG], uuid_lookup_finds_mig=lookup_finds_mig)
    (memory,) = discover(tmp_path, nvml, torch_sees(MIG))
    assert (memory.name, memory.total_bytes, memory.free_bytes) == (MIG.name, 12 * GiB, 11 * GiB)
    assert memory.sources == ("nvml-cuda context",)


def test_the_context_this_process_has_yet_to_create_is_counted(tmp_path: Path) -> None:
    (fresh,) = discover(tmp_path, FakeNvml([A100]), torch_sees(A100))
    assert fresh.usable_bytes == 70 * GiB - CUDA_CONTEXT_BYTES and fresh.sources == ("nvml-cuda context",)
    running = torch_sees(A100, initialized=True, reserved=6 * GiB, allocated=2 * GiB)
    (memory,) = discover(tmp_path, FakeNvml([A100]), running)
    assert (memory.free_bytes, memory.usable_bytes) == (70 * GiB, 74 * GiB)  # context in NVML's figure; cache reusable
    assert memory.sources == ("nvml+torch.cuda cache",)


def test_without_nvml_only_the_current_device_is_read_creating_no_other_context(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cuda = torch_sees(A100, H100)
    with caplog.at_level(logging.INFO, logger="devicemem"):
        first, second = discover(tmp_path, None, cuda)
    assert cuda.calls == [("mem_get_info", 0)] and cuda.contexts == {0}
    assert (first.free_bytes, first.usable_bytes, first.sources) == (30 * GiB, 30 * GiB, ("torch.cuda.mem_get_info",))
    assert (second.total_bytes, second.free_bytes, second.usable_bytes, second.sources) == (40 * GiB, None, None, ())
    assert "[MEMORY] nvidia-ml-py is not installed" in caplog.text
    assert "cuda:1's free memory is unknown" in caplog.text
    # where this process already has a context, reading it costs nothing more
    with_context = torch_sees(A100, H100, initialized=True, contexts={1})
    assert [m.free_bytes for m in discover(tmp_path, None, with_context)] == [30 * GiB, 20 * GiB]


def test_nvml_library_not_found_degrades_to_torch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    nvml = FakeNvml([A100], init_error=NVMLError_LibraryNotFound("NVML Shared Library Not Found"))
    with caplog.at_level(logging.INFO, logger="devicemem"):
        (memory,) = discover(tmp_path, nvml, torch_sees(A100))
    assert (memory.free_bytes, memory.sources) == (30 * GiB, ("torch.cuda.mem_get_info",))
    assert "NVML unavailable (NVML Shared Library Not Found)" in caplog.text


def test_a_lost_gpu_degrades_only_that_device(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lost = FakeGpu(H100.uuid, H100.name, H100.total, H100.free, lost=True)
    cuda = torch_sees(A100, H100, initialized=True, contexts={0, 1})
    with caplog.at_level(logging.WARNING, logger="devicemem"):
        found = discover(tmp_path, FakeNvml([A100, lost]), cuda)
    assert [m.sources[0] for m in found] == ["nvml", "torch.cuda.mem_get_info"]
    assert ("mem_get_info", 1) in cuda.calls and ("mem_get_info", 0) not in cuda.calls
    assert "NVML cannot read cuda:1 (GPU is lost)" in caplog.text


def test_a_uuid_nvml_does_not_know_degrades_to_torch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="devicemem"):
        (memory,) = discover(tmp_path, FakeNvml([A100]), torch_sees(H100))
    assert memory.sources == ("torch.cuda.mem_get_info",)
    assert "NVML cannot read cuda:0 (UUID" in caplog.text


def test_alloc_conf_fraction_limits_a_fresh_process(tmp_path: Path) -> None:
    environ = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True,per_process_memory_fraction:0.25"}
    (memory,) = discover(tmp_path, FakeNvml([A100]), torch_sees(A100), environ)
    assert (memory.limit_bytes, memory.usable_bytes) == (20 * GiB, 20 * GiB)
    assert memory.sources == ("nvml-cuda context", "PYTORCH_CUDA_ALLOC_CONF per_process_memory_fraction 0.25")


def test_set_per_process_memory_fraction_limits_what_is_left_of_it(tmp_path: Path) -> None:
    cuda = torch_sees(A100, initialized=True, reserved=6 * GiB, allocated=2 * GiB, fraction=0.5)
    (memory,) = discover(tmp_path, FakeNvml([A100]), cuda)
    # 40 GiB allowed, 6 GiB of it reserved already, 4 GiB of that reusable: 34 + 4
    assert (memory.limit_bytes, memory.usable_bytes) == (40 * GiB, 38 * GiB)
    assert memory.sources[1] == "torch.cuda per-process memory fraction 0.5"


def test_torch_without_cuda_lists_nothing_and_skips_nvml(tmp_path: Path) -> None:
    nvml = FakeNvml([A100], init_error=AssertionError("NVML must not be asked"))
    assert discover(tmp_path, nvml, FakeCuda([])) == []
    assert CudaBackend().discover(probe(tmp_path, nvml=nvml, torch=None)) == []


def test_plain_cuda_is_the_current_device_only_once_initialised(tmp_path: Path) -> None:
    backend = CudaBackend()
    assert backend.current_device(probe(tmp_path, torch=fake_torch(FakeCuda(TORCH_VIEW, current=1)))) == "cuda:0"
    initialised = FakeCuda(TORCH_VIEW, current=1, initialized=True)
    assert backend.current_device(probe(tmp_path, torch=fake_torch(initialised))) == "cuda:1"


def test_reset_peak_before_cuda_is_initialised_does_nothing(tmp_path: Path) -> None:
    cuda = FakeCuda(TORCH_VIEW)
    CudaBackend(probe(tmp_path, torch=fake_torch(cuda))).reset_peak("cuda:1")
    assert cuda.calls == [] and not cuda.initialized


def test_execution_calls_go_to_the_named_device_and_read_reserved_bytes(tmp_path: Path) -> None:
    cuda = FakeCuda(TORCH_VIEW, initialized=True, reserved=3 * GiB, allocated=1 * GiB)
    backend = CudaBackend(probe(tmp_path, torch=fake_torch(cuda)))
    backend.reset_peak("cuda:1")
    assert (backend.current_bytes("cuda:1"), backend.peak_bytes("cuda:1")) == (3 * GiB, 6 * GiB)
    backend.empty_cache("cuda:1")
    assert cuda.calls == [
        ("reset_peak_memory_stats", 1), ("memory_reserved", 1), ("max_memory_reserved", 1),
        ("device", 1), ("synchronize", 1), ("empty_cache", None), ("device-exit", 1),
    ]


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_empty_cache_collects_garbage_first_and_skips_devices_without_a_context(tmp_path: Path) -> None:
    cuda = FakeCuda(TORCH_VIEW, initialized=True, contexts={0})
    backend = CudaBackend(probe(tmp_path, torch=fake_torch(cuda)))
    garbage = _Cycle()
    watch = weakref.ref(garbage)
    del garbage
    freed_first = []
    cuda.empty_cache = lambda: freed_first.append(watch() is None)
    gc.disable()
    try:
        backend.empty_cache("cuda:1")
        assert cuda.calls == [] and freed_first == []  # no context on cuda:1: entering it would create one
        backend.empty_cache("cuda:0")
    finally:
        gc.enable()
    assert freed_first == [True]


@pytest.mark.parametrize(
    "error",
    [
        FakeOutOfMemoryError("anything"),
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"),
        RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
        RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
        RuntimeError("cuFFT error: CUFFT_ALLOC_FAILED"),
    ],
)
def test_is_oom_knows_every_cuda_out_of_memory_error(tmp_path: Path, error: BaseException) -> None:
    assert CudaBackend(probe(tmp_path, torch=fake_torch())).is_oom(error)


@pytest.mark.parametrize(
    "error",
    [RuntimeError("DefaultCPUAllocator: can't allocate memory"), MemoryError(),
     RuntimeError("CUDA error: device-side assert triggered"), RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED")],
)
def test_is_oom_leaves_other_errors_alone(tmp_path: Path, error: BaseException) -> None:
    assert not CudaBackend(probe(tmp_path, torch=fake_torch())).is_oom(error)


def test_is_oom_with_real_torch() -> None:
    assert CudaBackend().is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert not CudaBackend().is_oom(RuntimeError("size mismatch"))


def test_auto_falls_back_to_the_host_when_a_probe_fails_in_cublas(tmp_path: Path) -> None:
    listing = [DeviceMemory("cpu", "host", 64 * GiB, 60 * GiB, None, 60 * GiB, ("fake",)),
               DeviceMemory("cuda:0", "gpu", 80 * GiB, 70 * GiB, None, 70 * GiB, ("fake",))]

    def probe_footprint(model, guide, *args, device, **kwargs):
        if device == "cuda:0":
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
        return Footprint(0, 1 << 20, "fake")

    view = MemoryView.read(probe=SystemProbe(listing=tuple(listing)))
    plan = plan_predictive(lambda: None, lambda: None, 100, view=view, measure=probe_footprint)
    assert plan.device == "cpu"
    assert any("cuda:0 ran out of memory while probing" in reason for reason in plan.reasons)

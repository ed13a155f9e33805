"""Issue 7, points 1-2: the registry's CUDA readings against CUDA's own, on a real device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from devicemem.backends import SystemProbe, device_memory
from devicemem.backends.cuda import CudaBackend, bare_uuid
from devicemem.units import format_bytes
from gpu_tests.support import GIB, MIB, release_cuda

REPO = Path(__file__).resolve().parents[1]


def agreement_tolerance(total_bytes: int) -> int:
    """How far NVML and CUDA may differ: 1% of the device or 256 MiB, whichever is larger
    (NVML's total includes memory the driver reserves, CUDA's does not)."""
    return max(total_bytes // 100, 256 * MIB)


def test_nvml_and_torch_agree_on_every_visible_device(figures):
    probe = SystemProbe.default()
    assert probe.nvml is not None, "nvidia-ml-py (import pynvml) is missing on this GPU machine"
    count = torch.cuda.device_count()
    for index in range(count):
        torch.cuda.mem_get_info(index)  # create each context first: it takes memory NVML sees
    records = {memory.device: memory for memory in CudaBackend().discover(probe)}
    assert set(records) == {f"cuda:{index}" for index in range(count)}
    for index in range(count):
        free, total = torch.cuda.mem_get_info(index)
        memory = records[f"cuda:{index}"]
        tolerance = agreement_tolerance(total)
        figures.record(
            f"1 nvml vs torch cuda:{index}", name=memory.name, sources=list(memory.sources),
            nvml_total_bytes=memory.total_bytes, torch_total_bytes=total,
            nvml_free_bytes=memory.free_bytes, torch_free_bytes=free, tolerance_bytes=tolerance,
        )
        assert memory.sources[0].startswith("nvml"), f"NVML did not answer for cuda:{index}: {memory.sources}"
        assert abs(memory.total_bytes - total) <= tolerance, (
            f"cuda:{index} total: NVML {format_bytes(memory.total_bytes)} vs torch {format_bytes(total)}"
        )
        assert abs(memory.free_bytes - free) <= tolerance, (
            f"cuda:{index} free: NVML {format_bytes(memory.free_bytes)} vs torch {format_bytes(free)}"
        )


# Runs in a child with CUDA_VISIBLE_DEVICES (and CUDA_DEVICE_ORDER) set: for each torch index,
# the UUID CUDA gives it, the UUID of the NVML handle devicemem reads for it, and its record.
CHILD = r"""
import dataclasses, json
import pynvml, torch
from devicemem.backends import device_memory
from devicemem.backends.cuda import nvml_handle

rows = []
for index in range(torch.cuda.device_count()):
    torch_uuid = str(torch.cuda.get_device_properties(index).uuid)
    memory = device_memory(f"cuda:{index}")  # before any context: NVML only
    free, total = torch.cuda.mem_get_info(index)
    pynvml.nvmlInit()
    mapped = pynvml.nvmlDeviceGetUUID(nvml_handle(pynvml, torch_uuid))
    pynvml.nvmlShutdown()
    rows.append({
        "torch_uuid": torch_uuid, "mapped_uuid": mapped.decode() if isinstance(mapped, bytes) else mapped,
        "torch_free": free, "torch_total": total, "record": dataclasses.asdict(memory),
    })
print("ROWS " + json.dumps(rows))
"""


def _visible_gpus() -> list[tuple[int, str]]:
    """(NVML index, NVML UUID) of each of this process's CUDA devices, in torch's order, asked
    of NVML directly (NVML numbers GPUs in PCI order)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        by_uuid = {bare_uuid(pynvml.nvmlDeviceGetUUID(h)): i for i, h in enumerate(handles)}
    finally:
        pynvml.nvmlShutdown()
    torch_uuids = [bare_uuid(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
    if not all(uuid in by_uuid for uuid in torch_uuids):
        pytest.skip("the visible CUDA devices are MIG instances: NVML has no GPU index or GPU-UUID for them")
    return [(by_uuid[uuid], f"GPU-{uuid}") for uuid in torch_uuids]


def _visible_value(form: str) -> list[str]:
    """CUDA_VISIBLE_DEVICES entries naming this process's devices in reverse order."""
    gpus = _visible_gpus()[::-1]
    if form == "gpu-uuid":
        return [uuid for _, uuid in gpus]
    if form == "uuid-prefix":  # CUDA accepts a unique prefix, e.g. GPU-8932f937
        return [uuid[: len("GPU-") + 8] for _, uuid in gpus]
    return [str(index) for index, _ in gpus]


@pytest.mark.parametrize("form", ["gpu-uuid", "uuid-prefix", "nvml-index", "fastest-first"])
def test_cuda_visible_devices_maps_each_torch_index_to_its_nvml_device(form, figures):
    entries = _visible_value(form)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(entries)}
    if form == "fastest-first":  # CUDA's default order; NVML's is PCI order: only UUIDs agree
        env["CUDA_DEVICE_ORDER"] = "FASTEST_FIRST"
    child = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0, child.stderr[-3000:]
    rows = json.loads(next(line for line in child.stdout.splitlines() if line.startswith("ROWS "))[5:])
    figures.record(f"1 CUDA_VISIBLE_DEVICES {form}", value=",".join(entries), children=rows)
    assert len(rows) == len(entries)
    for index, row in enumerate(rows):
        record = row["record"]
        assert bare_uuid(row["mapped_uuid"]) == bare_uuid(row["torch_uuid"]), (
            f"{form} cuda:{index}: devicemem maps {entries[index]!r} to {row['mapped_uuid']}, "
            f"CUDA uses {row['torch_uuid']}"
        )
        assert record["sources"][0].startswith("nvml"), f"{form} cuda:{index}: NVML did not answer: {record}"
        tolerance = agreement_tolerance(row["torch_total"])
        assert abs(record["total_bytes"] - row["torch_total"]) <= tolerance, row
        assert abs(record["free_bytes"] - row["torch_free"]) <= tolerance, row


def test_usable_counts_this_process_reserved_but_unallocated_cache(figures):
    block_bytes = 8 * GIB
    tolerance = 256 * MIB
    release_cuda()
    before = device_memory("cuda:0")
    block = torch.empty(block_bytes, dtype=torch.uint8, device="cuda:0")
    del block
    torch.cuda.synchronize()
    cached = torch.cuda.memory_reserved(0) - torch.cuda.memory_allocated(0)
    after = device_memory("cuda:0")
    figures.record(
        "2 usable with cached blocks", block_bytes=block_bytes, cached_bytes=cached,
        free_before=before.free_bytes, usable_before=before.usable_bytes,
        free_after=after.free_bytes, usable_after=after.usable_bytes, sources_after=list(after.sources),
    )
    assert cached >= block_bytes, "the freed block should stay in torch's cache"
    assert after.free_bytes <= before.free_bytes - block_bytes + tolerance, "the driver counts cached blocks as used"
    assert after.usable_bytes - after.free_bytes == cached
    assert "torch.cuda cache" in after.sources[0]
    assert abs(after.usable_bytes - before.usable_bytes) <= tolerance, (
        f"usable moved from {format_bytes(before.usable_bytes)} to {format_bytes(after.usable_bytes)} "
        "although the process only moved memory into its own cache"
    )
    reused = torch.empty(block_bytes, dtype=torch.uint8, device="cuda:0")  # served from the cache
    free_now, _ = torch.cuda.mem_get_info(0)
    del reused
    assert free_now >= after.free_bytes - tolerance, "allocating the cached bytes took new device memory"

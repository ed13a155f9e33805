"""The registry: device order, lookup by name, user overrides, bad input, extra backends."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

import devicemem
import devicemem.backends.registry as registry
from devicemem.backends import (
    Backend, DeviceMemory, device_memory, devices, get_backend, limit_source, parse_max_memory, register_backend,
)
from devicemem.backends.cuda import CUDA_CONTEXT_BYTES, CudaBackend
from backend_fakes import FakeCuda, FakeGpu, FakeNvml, GiB, fake_torch, meminfo, probe, write_tree

GPUS = [FakeGpu("GPU-a", "NVIDIA A100", 80 * GiB, 70 * GiB), FakeGpu("GPU-b", "NVIDIA H100", 96 * GiB, 90 * GiB)]
MPS = SimpleNamespace(recommended_max_memory=lambda: 16 * GiB, driver_allocated_memory=lambda: 0,
                      current_allocated_memory=lambda: 0)


def machine(tmp_path: Path, *, gpus: int = 2, environ=None, mps=None, initialized: bool = False, current: int = 0):
    """A probe for a host with 48 GiB available, ``gpus`` CUDA devices and optionally MPS."""
    write_tree(tmp_path, {"proc/meminfo": meminfo(64 * GiB, 48 * GiB)})
    cuda = FakeCuda([(g.name, g.total, g.free) for g in GPUS[:gpus]], initialized=initialized, current=current,
                    uuids=[g.uuid.removeprefix("GPU-") for g in GPUS[:gpus]])
    return probe(tmp_path, environ=environ, nvml=FakeNvml(GPUS[:gpus]), torch=fake_torch(cuda, mps=mps))


def test_devices_lists_cpu_then_cuda_in_order_then_mps(tmp_path: Path) -> None:
    found = devices(probe=machine(tmp_path, mps=MPS))
    assert [m.device for m in found] == ["cpu", "cuda:0", "cuda:1", "mps"]
    assert all(isinstance(m, DeviceMemory) for m in found)


def test_package_level_names_work_after_the_backends_package_was_imported(tmp_path: Path) -> None:
    p = machine(tmp_path, gpus=1)
    assert [m.device for m in devicemem.devices(probe=p)] == ["cpu", "cuda:0"]
    assert devicemem.device_memory("cuda:0", probe=p).name == "NVIDIA A100"
    assert devicemem.get_backend("cuda:3") is get_backend("cuda")


@pytest.mark.parametrize(
    ("name", "expected"),
    [("cpu", "cpu"), ("cpu:0", "cpu"), ("cuda:1", "cuda:1"), ("CUDA:1", "cuda:1"), ("mps", "mps")],
)
def test_device_memory_by_name(tmp_path: Path, name: str, expected: str) -> None:
    assert device_memory(name, probe=machine(tmp_path, mps=MPS)).device == expected


def test_device_memory_accepts_a_torch_device(tmp_path: Path) -> None:
    import torch

    assert device_memory(torch.device("cuda", 1), probe=machine(tmp_path)).device == "cuda:1"
    assert device_memory(torch.device("cpu"), probe=machine(tmp_path)).device == "cpu"


def test_plain_cuda_is_cuda0_or_the_current_device(tmp_path: Path) -> None:
    assert device_memory("cuda", probe=machine(tmp_path, current=1)).device == "cuda:0"
    assert device_memory("cuda", probe=machine(tmp_path, current=1, initialized=True)).device == "cuda:1"


def test_absent_device_names_it_and_lists_what_exists(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'cuda:7' is not visible to this process; this process sees: cpu, cuda:0"):
        device_memory("cuda:7", probe=machine(tmp_path, gpus=1))
    with pytest.raises(ValueError, match=r"'cuda' is not visible.*sees: cpu \(known kinds: cpu, cuda, mps\)"):
        device_memory("cuda", probe=machine(tmp_path, gpus=0))


@pytest.mark.parametrize("name", ["tpu", "tpu:0"])
def test_unknown_kind_names_it_and_lists_what_exists(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match=rf"'{name}' is not a known kind; this process sees: cpu, cuda:0"):
        device_memory(name, probe=machine(tmp_path, gpus=1))
    with pytest.raises(ValueError, match=r"unknown device kind 'tpu'.*known kinds: cpu, cuda, mps"):
        get_backend(name)


@pytest.mark.parametrize("name", ["cuda:", "gpu 0", ":1", ""])
def test_malformed_device_names_say_what_is_accepted(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match=r"device: could not read device .*expected a kind"):
        device_memory(name, probe=machine(tmp_path))


def test_get_backend_picks_by_kind() -> None:
    assert isinstance(get_backend("cuda:1"), CudaBackend)
    assert get_backend("cpu").kind == "cpu"


# --- overrides -----------------------------------------------------------------------------


def test_environment_override_is_one_more_limit(tmp_path: Path) -> None:
    found = devices(probe=machine(tmp_path, environ={"DEVICEMEM_MAX_MEMORY": "cpu=8GiB, cuda:1=20GB"}))
    cpu, cuda0, cuda1 = found
    assert (cpu.limit_bytes, cpu.usable_bytes) == (8 * GiB, 8 * GiB)
    assert cpu.sources == ("/proc/meminfo", "override:DEVICEMEM_MAX_MEMORY")
    assert limit_source(cpu) == "override:DEVICEMEM_MAX_MEMORY"
    assert (cuda0.limit_bytes, cuda0.usable_bytes) == (None, 70 * GiB - CUDA_CONTEXT_BYTES)  # no context yet
    assert (cuda1.limit_bytes, cuda1.usable_bytes) == (20 * 10**9, 20 * 10**9)


def test_argument_override_beats_the_environment_for_the_same_device(tmp_path: Path) -> None:
    p = machine(tmp_path, environ={"DEVICEMEM_MAX_MEMORY": "cpu=8GiB"})
    cpu = device_memory("cpu", max_memory={"cpu": "16GiB"}, probe=p)
    assert (cpu.usable_bytes, limit_source(cpu)) == (16 * GiB, "override:max_memory")
    assert device_memory("cpu", max_memory="cpu=4GiB", probe=p).usable_bytes == 4 * GiB


def test_a_kind_override_caps_every_device_of_that_kind_and_an_index_wins(tmp_path: Path) -> None:
    found = devices(max_memory={"cuda": 10 * GiB, "cuda:1": "5GiB"}, probe=machine(tmp_path))
    assert [m.usable_bytes for m in found] == [48 * GiB, 10 * GiB, 5 * GiB]


def test_a_loose_override_is_listed_but_does_not_bind(tmp_path: Path) -> None:
    base = write_tree(tmp_path, {"proc/meminfo": meminfo(64 * GiB, 48 * GiB)})
    p = probe(base, environ={"SLURM_MEM_PER_NODE": "4096"})
    cpu = device_memory("cpu", max_memory={"cpu": "32GiB"}, probe=p)
    assert (cpu.limit_bytes, cpu.usable_bytes) == (4 * GiB, 4 * GiB)
    assert cpu.sources == ("/proc/meminfo", "slurm:SLURM_MEM_PER_NODE", "override:max_memory")


def test_an_override_gives_a_figure_when_nothing_could_be_read(tmp_path: Path) -> None:
    cpu = device_memory("cpu", max_memory={"cpu": "2GiB"}, probe=probe(tmp_path))
    assert (cpu.free_bytes, cpu.limit_bytes, cpu.usable_bytes) == (None, 2 * GiB, 2 * GiB)
    assert cpu.sources == ("override:max_memory",)


@pytest.mark.parametrize(("text", "expected"), [("8GiB", 8 * GiB), ("8G", 8 * 10**9), ("8000MB", 8 * 10**9)])
def test_override_sizes_in_every_documented_form(text: str, expected: int) -> None:
    assert parse_max_memory(None, {"DEVICEMEM_MAX_MEMORY": f"cpu={text}"}) == {
        "cpu": (expected, "override:DEVICEMEM_MAX_MEMORY"),
    }


@pytest.mark.parametrize(
    ("max_memory", "environ", "message"),
    [
        (None, "cpu=lots", r"DEVICEMEM_MAX_MEMORY\['cpu'\]: could not read 'lots'; expected .*8GiB"),
        (None, "cpu8GiB", r"DEVICEMEM_MAX_MEMORY: could not read 'cpu8GiB'; expected comma-separated device=size"),
        (None, "tpu=1GiB", r"DEVICEMEM_MAX_MEMORY: unknown device 'tpu'; expected a kind \(cpu, cuda, mps\)"),
        ({"cpu": "lots"}, "", r"max_memory\['cpu'\]: could not read 'lots'"),
        ({"cuda:x": "1GiB"}, "", r"max_memory: could not read device 'cuda:x'"),
        ({"cpu": -1}, "", r"max_memory\['cpu'\]: must be a finite, non-negative size"),
        ([("cpu", "1GiB")], "", r"max_memory: expected a dict like"),
        ("cpu=", "", r"max_memory: could not read 'cpu='"),
    ],
)
def test_bad_overrides_name_the_variable_and_the_accepted_forms(tmp_path: Path, max_memory, environ, message) -> None:
    p = machine(tmp_path, environ={"DEVICEMEM_MAX_MEMORY": environ})
    with pytest.raises(ValueError, match=message):
        devices(max_memory=max_memory, probe=p)


def test_bad_overrides_fail_before_any_device_is_read(tmp_path: Path) -> None:
    cuda = FakeCuda([("gpu", GiB, GiB)])
    p = probe(tmp_path, torch=fake_torch(cuda), environ={"DEVICEMEM_MAX_MEMORY": "cuda:0=lots"})
    with pytest.raises(ValueError):
        device_memory("cuda:0", probe=p)
    assert cuda.calls == []


def test_an_override_for_an_absent_device_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="devicemem"):
        found = devices(max_memory={"cuda:7": "1GiB"}, probe=machine(tmp_path, gpus=1))
    assert [m.device for m in found] == ["cpu", "cuda:0"]
    assert "max_memory names cuda:7, which this process does not see (it sees cpu, cuda:0)" in caplog.text


# --- extra backends ------------------------------------------------------------------------


class FakeTpu(Backend):
    kind = "tpu"

    def discover(self, probe):
        return [DeviceMemory("tpu:0", "Fake TPU", 16 * GiB, 15 * GiB, None, 15 * GiB, ("fake",))]

    def torch_device(self, device):
        raise NotImplementedError

    def reset_peak(self, device):
        pass

    def current_bytes(self, device):
        return 0

    def peak_bytes(self, device):
        return 0

    def empty_cache(self, device):
        pass

    def is_oom(self, exc):
        return False


class BrokenBackend(FakeTpu):
    kind = "broken"

    def discover(self, probe):
        raise RuntimeError("driver exploded")


@pytest.fixture
def own_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations in a test go to a copy of the registry."""
    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))


def test_registered_backends_are_listed_after_the_built_in_ones(tmp_path: Path, own_registry: None) -> None:
    register_backend("tpu", FakeTpu())
    p = machine(tmp_path, gpus=1)
    assert [m.device for m in devices(probe=p)] == ["cpu", "cuda:0", "tpu:0"]
    assert device_memory("tpu", max_memory="tpu:0=1GiB", probe=p).usable_bytes == GiB
    assert isinstance(get_backend("tpu:0"), FakeTpu)


def test_a_failing_backend_is_left_out_with_a_warning(tmp_path: Path, own_registry: None,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    register_backend("broken", BrokenBackend())
    with caplog.at_level(logging.WARNING, logger="devicemem"):
        found = devices(probe=machine(tmp_path, gpus=1))
    assert [m.device for m in found] == ["cpu", "cuda:0"]
    assert "cannot list broken devices (RuntimeError: driver exploded)" in caplog.text


@pytest.mark.parametrize(
    ("name", "backend", "error"),
    [("tpu", object(), TypeError), ("TPU", FakeTpu(), ValueError), ("tpu:0", FakeTpu(), ValueError),
     ("xpu", FakeTpu(), ValueError)],
)
def test_register_backend_rejects_bad_registrations(own_registry: None, name, backend, error) -> None:
    with pytest.raises(error, match="register_backend"):
        register_backend(name, backend)


# --- this machine --------------------------------------------------------------------------


def test_this_machine_lists_the_host_first_with_a_usable_figure() -> None:
    import psutil

    first = devices()[0]
    assert first.device == "cpu" and first.sources[0] == "psutil.virtual_memory"
    assert 0 < first.usable_bytes <= psutil.virtual_memory().total

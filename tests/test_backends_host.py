"""Host RAM discovery over fake /proc and /sys trees, peak measurement, and real capped children."""

from __future__ import annotations

import json
import logging
import resource
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from devicemem.backends.host import CpuBackend
from tests.support.child import cgroup_unavailable_reason, run_child
from backend_fakes import GiB, MiB, fake_psutil, meminfo, probe, status, write_tree

V1_NONE = 9223372036854771712
HOST = {"proc/meminfo": meminfo(64 * GiB, 48 * GiB)}


def cpu(p) -> object:
    (memory,) = CpuBackend().discover(p)
    return memory


# --- free memory ---------------------------------------------------------------------------


def test_free_memory_comes_from_psutil_when_it_imports(tmp_path: Path) -> None:
    memory = cpu(probe(write_tree(tmp_path, HOST), psutil=fake_psutil(32 * GiB, 20 * GiB)))
    assert (memory.device, memory.total_bytes, memory.free_bytes) == ("cpu", 32 * GiB, 20 * GiB)
    assert memory.usable_bytes == 20 * GiB
    assert memory.limit_bytes is None
    assert memory.sources == ("psutil.virtual_memory",)


def test_without_psutil_free_memory_comes_from_proc_meminfo(tmp_path: Path) -> None:
    memory = cpu(probe(write_tree(tmp_path, HOST), psutil=None))
    assert (memory.total_bytes, memory.free_bytes, memory.usable_bytes) == (64 * GiB, 48 * GiB, 48 * GiB)
    assert memory.sources == ("/proc/meminfo",)


def test_failing_psutil_falls_back_to_proc_meminfo(tmp_path: Path) -> None:
    def broken() -> None:
        raise OSError("no /proc in this sandbox")

    memory = cpu(probe(write_tree(tmp_path, HOST), psutil=SimpleNamespace(virtual_memory=broken)))
    assert memory.free_bytes == 48 * GiB


def test_nothing_readable_means_usable_is_unknown(tmp_path: Path) -> None:
    memory = cpu(probe(tmp_path, psutil=None))
    assert (memory.total_bytes, memory.free_bytes, memory.usable_bytes, memory.limit_bytes) == (None,) * 4
    assert memory.sources == ()


def test_a_limit_still_applies_when_free_memory_is_unknown(tmp_path: Path) -> None:
    memory = cpu(probe(tmp_path, environ={"SLURM_MEM_PER_NODE": "1024"}))
    assert memory.usable_bytes == memory.limit_bytes == GiB
    assert memory.sources == ("slurm:SLURM_MEM_PER_NODE",)


# --- cgroups -------------------------------------------------------------------------------

V2_MOUNT = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
V1_MOUNT = "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"


def test_cgroup_v2_ancestor_tighter_than_a_max_leaf_wins(tmp_path: Path) -> None:
    job = "sys/fs/cgroup/slurm/uid_1/job_2"
    write_tree(tmp_path, {
        **HOST,
        "proc/self/mountinfo": V2_MOUNT,
        "proc/self/cgroup": "0::/slurm/uid_1/job_2/step_0\n",
        "sys/fs/cgroup/cgroup.controllers": "cpu memory",
        f"{job}/step_0/memory.max": "max",
        f"{job}/step_0/memory.high": "max",
        f"{job}/step_0/memory.current": 900 * MiB,
        f"{job}/memory.max": 4 * GiB,
        f"{job}/memory.current": GiB,
        f"{job}/memory.stat": f"anon 1\ninactive_file {256 * MiB}\nactive_file 5\n",
        "sys/fs/cgroup/slurm/uid_1/memory.max": 8 * GiB,
        "sys/fs/cgroup/slurm/uid_1/memory.current": 2 * GiB,
    })
    memory = cpu(probe(tmp_path))
    assert memory.limit_bytes == 4 * GiB
    assert memory.usable_bytes == 4 * GiB - (GiB - 256 * MiB)  # inactive page cache is reclaimable
    assert memory.sources == ("/proc/meminfo", "cgroup-v2:/slurm/uid_1/job_2 (memory.max)")


def test_cgroup_v2_memory_high_counts_as_a_limit(tmp_path: Path) -> None:
    write_tree(tmp_path, {
        **HOST,
        "proc/self/mountinfo": V2_MOUNT,
        "proc/self/cgroup": "0::/app\n",
        "sys/fs/cgroup/app/memory.max": 6 * GiB,
        "sys/fs/cgroup/app/memory.high": 3 * GiB,
        "sys/fs/cgroup/app/memory.current": GiB,
    })
    memory = cpu(probe(tmp_path))
    assert (memory.limit_bytes, memory.usable_bytes) == (3 * GiB, 2 * GiB)
    assert memory.sources[1] == "cgroup-v2:/app (memory.high)"


def test_cgroup_v1_found_without_mountinfo_walks_to_the_tight_ancestor(tmp_path: Path) -> None:
    base = "sys/fs/cgroup/memory"
    write_tree(tmp_path, {
        **HOST,
        "proc/self/cgroup": "5:devices:/\n4:memory:/slurm/uid_1/job_2/step_batch\n0::/\n",
        f"{base}/memory.limit_in_bytes": V1_NONE,
        f"{base}/slurm/uid_1/job_2/step_batch/memory.limit_in_bytes": V1_NONE,
        f"{base}/slurm/uid_1/job_2/step_batch/memory.usage_in_bytes": 100 * MiB,
        f"{base}/slurm/uid_1/job_2/memory.limit_in_bytes": 2 * GiB,
        f"{base}/slurm/uid_1/job_2/memory.usage_in_bytes": 512 * MiB,
        f"{base}/slurm/uid_1/job_2/memory.stat": "cache 0\ntotal_inactive_file 0\n",
    })
    memory = cpu(probe(tmp_path))
    assert (memory.limit_bytes, memory.usable_bytes) == (2 * GiB, 2 * GiB - 512 * MiB)
    assert memory.sources[1] == "cgroup-v1:/slurm/uid_1/job_2 (memory.limit_in_bytes)"


def test_cgroup_mount_root_inside_a_container_is_stripped(tmp_path: Path) -> None:
    write_tree(tmp_path, {
        **HOST,
        "proc/self/mountinfo": "35 31 0:32 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory\n",
        "proc/self/cgroup": "4:memory:/docker/abc\n",
        "sys/fs/cgroup/memory/memory.limit_in_bytes": 3 * GiB,
        "sys/fs/cgroup/memory/memory.usage_in_bytes": GiB,
    })
    assert cpu(probe(tmp_path)).usable_bytes == 2 * GiB


def test_hybrid_v1_and_v2_take_the_tighter(tmp_path: Path) -> None:
    write_tree(tmp_path, {
        **HOST,
        "proc/self/mountinfo": V1_MOUNT + "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n",
        "proc/self/cgroup": "4:memory:/job\n0::/job\n",
        "sys/fs/cgroup/memory/job/memory.limit_in_bytes": 5 * GiB,
        "sys/fs/cgroup/memory/job/memory.usage_in_bytes": GiB,
        "sys/fs/cgroup/unified/job/memory.max": 3 * GiB,
        "sys/fs/cgroup/unified/job/memory.current": GiB,
    })
    memory = cpu(probe(tmp_path))
    assert (memory.limit_bytes, memory.usable_bytes) == (3 * GiB, 2 * GiB)
    assert memory.sources[1:] == ("cgroup-v2:/job (memory.max)", "cgroup-v1:/job (memory.limit_in_bytes)")


def test_unlimited_and_unreadable_cgroups_are_no_limit(tmp_path: Path) -> None:
    write_tree(tmp_path, {
        **HOST,
        "proc/self/mountinfo": V1_MOUNT,
        "proc/self/cgroup": "4:memory:/job\n",
        "sys/fs/cgroup/memory/job/memory.limit_in_bytes": V1_NONE,
        "sys/fs/cgroup/memory/memory.limit_in_bytes": "garbage",
    })
    memory = cpu(probe(tmp_path))
    assert (memory.limit_bytes, memory.usable_bytes) == (None, 48 * GiB)


def test_free_memory_binds_when_it_is_below_every_limit(tmp_path: Path) -> None:
    write_tree(tmp_path, {
        "proc/meminfo": meminfo(64 * GiB, GiB),
        "proc/self/mountinfo": V2_MOUNT,
        "proc/self/cgroup": "0::/job\n",
        "sys/fs/cgroup/job/memory.max": 8 * GiB,
    })
    memory = cpu(probe(tmp_path))
    assert (memory.limit_bytes, memory.usable_bytes) == (8 * GiB, GiB)


# --- SLURM ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "cap", "source"),
    [
        ({"SLURM_MEM_PER_NODE": "4096"}, 4 * GiB, "slurm:SLURM_MEM_PER_NODE"),
        ({"SLURM_MEM_PER_NODE": "6G"}, 6 * GiB, "slurm:SLURM_MEM_PER_NODE"),
        ({"SLURM_MEM_PER_CPU": "2048", "SLURM_CPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "1"}, 8 * GiB,
         "slurm:SLURM_MEM_PER_CPU*SLURM_CPUS_ON_NODE"),
        ({"SLURM_MEM_PER_CPU": "1024", "SLURM_CPUS_PER_TASK": "3"}, 3 * GiB,
         "slurm:SLURM_MEM_PER_CPU*SLURM_CPUS_PER_TASK"),
        ({"SLURM_MEM_PER_CPU": "1024", "SLURM_JOB_CPUS_PER_NODE": "4(x2),2", "SLURM_NODEID": "2"}, 2 * GiB,
         "slurm:SLURM_MEM_PER_CPU*SLURM_JOB_CPUS_PER_NODE"),
        ({"SLURM_MEM_PER_CPU": "1024", "SLURM_JOB_CPUS_PER_NODE": "4(x2),3"}, 3 * GiB,
         "slurm:SLURM_MEM_PER_CPU*SLURM_JOB_CPUS_PER_NODE"),
        ({"SLURM_MEM_PER_CPU": "1024", "SLURM_JOB_CPUS_PER_NODE": "8(x2)", "SLURM_NODEID": "1"}, 8 * GiB,
         "slurm:SLURM_MEM_PER_CPU*SLURM_JOB_CPUS_PER_NODE"),
    ],
)
def test_slurm_allocation_minus_own_rss(tmp_path: Path, environ: dict, cap: int, source: str) -> None:
    write_tree(tmp_path, {**HOST, "proc/self/status": status(VmRSS=100 * MiB)})
    memory = cpu(probe(tmp_path, environ=environ))
    assert (memory.limit_bytes, memory.usable_bytes) == (cap, cap - 100 * MiB)
    assert memory.sources == ("/proc/meminfo", source)


def test_slurm_mem_zero_means_the_whole_node(tmp_path: Path) -> None:
    memory = cpu(probe(write_tree(tmp_path, HOST), environ={"SLURM_MEM_PER_NODE": "0"}))
    assert (memory.limit_bytes, memory.usable_bytes) == (None, 48 * GiB)


@pytest.mark.parametrize("variable", ["SLURM_MEM_PER_NODE", "SLURM_MEM_PER_CPU"])
def test_malformed_slurm_memory_is_ignored_with_a_warning(tmp_path: Path, variable: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    environ = {variable: "lots", "SLURM_CPUS_ON_NODE": "2"}
    with caplog.at_level(logging.WARNING, logger="devicemem"):
        memory = cpu(probe(write_tree(tmp_path, HOST), environ=environ))
    assert memory.usable_bytes == 48 * GiB
    assert f"{variable}='lots'" in caplog.text and "megabytes" in caplog.text


def test_malformed_slurm_cpu_counts_fall_through_then_assume_one_cpu(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    environ = {"SLURM_MEM_PER_CPU": "1024", "SLURM_CPUS_ON_NODE": "four", "SLURM_JOB_CPUS_PER_NODE": "2(x"}
    with caplog.at_level(logging.WARNING, logger="devicemem"):
        memory = cpu(probe(write_tree(tmp_path, HOST), environ=environ))
    assert memory.limit_bytes == GiB
    assert "SLURM_CPUS_ON_NODE='four'" in caplog.text
    assert "SLURM_JOB_CPUS_PER_NODE='2(x'" in caplog.text
    assert "assuming 1 CPU" in caplog.text


# --- rlimits -------------------------------------------------------------------------------


def test_rlimit_as_and_data_minus_current_vmsize_and_vmdata(tmp_path: Path) -> None:
    write_tree(tmp_path, {**HOST, "proc/self/status": status(VmSize=900 * MiB, VmData=300 * MiB, VmRSS=MiB)})
    limits = {resource.RLIMIT_AS: 2 * GiB, resource.RLIMIT_DATA: GiB}
    memory = cpu(probe(tmp_path, rlimits=limits))
    assert (memory.limit_bytes, memory.usable_bytes) == (GiB, GiB - 300 * MiB)
    assert memory.sources == ("/proc/meminfo", "rlimit:RLIMIT_DATA", "rlimit:RLIMIT_AS")


def test_rlimit_as_usage_from_psutil_without_proc_status(tmp_path: Path) -> None:
    memory = cpu(probe(tmp_path, rlimits={resource.RLIMIT_AS: 2 * GiB},
                       psutil=fake_psutil(32 * GiB, 20 * GiB, vms=500 * MiB)))
    assert memory.usable_bytes == 2 * GiB - 500 * MiB


def test_every_limit_is_listed_tightest_first(tmp_path: Path) -> None:
    write_tree(tmp_path, {
        **HOST,
        "proc/self/status": status(VmSize=GiB, VmRSS=GiB // 2),
        "proc/self/mountinfo": V2_MOUNT,
        "proc/self/cgroup": "0::/job\n",
        "sys/fs/cgroup/job/memory.max": 5 * GiB,
        "sys/fs/cgroup/job/memory.current": 2 * GiB,
    })
    memory = cpu(probe(tmp_path, environ={"SLURM_MEM_PER_NODE": "8192"}, rlimits={resource.RLIMIT_AS: 3 * GiB}))
    assert memory.sources == ("/proc/meminfo", "rlimit:RLIMIT_AS", "cgroup-v2:/job (memory.max)",
                              "slurm:SLURM_MEM_PER_NODE")
    assert (memory.limit_bytes, memory.usable_bytes) == (3 * GiB, 2 * GiB)


# --- peak measurement ----------------------------------------------------------------------


def test_peak_resets_through_clear_refs_and_reads_vmhwm(tmp_path: Path) -> None:
    write_tree(tmp_path, {"proc/self/clear_refs": "", "proc/self/status": status(VmHWM=700 * MiB, VmRSS=200 * MiB)})
    backend = CpuBackend(probe(tmp_path))
    backend.reset_peak("cpu")
    assert (tmp_path / "proc/self/clear_refs").read_text() == "5"
    assert (backend.peak_bytes("cpu"), backend.current_bytes("cpu")) == (700 * MiB, 200 * MiB)


def test_peak_falls_back_to_sampling_rss_when_clear_refs_is_not_writable(tmp_path: Path) -> None:
    readings = iter([100 * MiB, 150 * MiB, 900 * MiB, 300 * MiB])
    sampled = threading.Event()

    def memory_info() -> SimpleNamespace:
        value = next(readings, None)
        if value is None:
            sampled.set()
            value = 300 * MiB
        return SimpleNamespace(rss=value)

    psutil = SimpleNamespace(Process=lambda pid=None: SimpleNamespace(memory_info=memory_info))
    backend = CpuBackend(probe(tmp_path, psutil=psutil))
    backend.reset_peak("cpu")
    assert not (tmp_path / "proc/self/clear_refs").exists()
    assert sampled.wait(timeout=30)
    assert backend.peak_bytes("cpu") == 900 * MiB
    assert backend.peak_bytes("cpu") == 900 * MiB  # the window closed at the first read


def _touch(n_bytes: int) -> bytes:
    return b"\x01" * n_bytes


def test_real_peak_sees_a_freed_allocation() -> None:
    backend = CpuBackend()
    backend.reset_peak("cpu")
    before = backend.current_bytes("cpu")
    block = _touch(200 * MiB)
    del block
    peak = backend.peak_bytes("cpu")
    assert peak >= before + 190 * MiB
    assert backend.current_bytes("cpu") < peak - 150 * MiB


def test_real_rss_sampler_sees_a_held_allocation(tmp_path: Path) -> None:
    import psutil
    import time

    backend = CpuBackend(probe(tmp_path, psutil=psutil))  # no /proc under tmp_path: sampler path
    backend.reset_peak("cpu")
    before = psutil.Process().memory_info().rss
    block = _touch(200 * MiB)
    time.sleep(0.3)  # hold it across many 2 ms samples
    del block
    assert backend.peak_bytes("cpu") >= before + 190 * MiB


def test_is_oom_recognises_host_allocation_failures() -> None:
    backend = CpuBackend()
    assert backend.is_oom(MemoryError())
    assert backend.is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:119] DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    assert not backend.is_oom(RuntimeError("shape mismatch"))
    assert not backend.is_oom(ValueError("can't allocate memory"))


# --- real capped children ------------------------------------------------------------------

_READ_USABLE = (
    "import json; from devicemem.backends import device_memory; "
    "m = device_memory('cpu'); print(json.dumps({'usable': m.usable_bytes, 'sources': m.sources}))"
)


def test_child_in_a_1gib_cgroup_reports_usable_within_the_limit_minus_its_use() -> None:
    reason = cgroup_unavailable_reason()
    if reason:
        pytest.skip(reason)
    snippet = "block = b'\\x01' * (300 << 20); " + _READ_USABLE
    result = run_child([sys.executable, "-c", snippet], cap_bytes=GiB, cap_method="cgroup", timeout=120)
    assert result.ok, result.stderr
    reading = json.loads(result.stdout)
    assert 0 < reading["usable"] <= GiB - 300 * MiB
    assert any(source.startswith("cgroup-") for source in reading["sources"])


def test_child_under_rlimit_as_can_allocate_usable_but_not_more() -> None:
    cap = 2 * GiB
    snippet = (
        "import torch; from devicemem.backends import device_memory, get_backend\n"
        "usable = device_memory('cpu').usable_bytes\n"
        "try:\n"
        "    torch.empty(usable + (64 << 20), dtype=torch.uint8)\n"
        "    print(usable, 'allocated')\n"
        "except Exception as exc:\n"
        "    print(usable, get_backend('cpu').is_oom(exc))\n"
        "torch.empty(int(usable * 0.8), dtype=torch.uint8).fill_(1)\n"
    )
    result = run_child([sys.executable, "-c", snippet], cap_bytes=cap, cap_method="rlimit", timeout=180)
    assert result.ok, result.stderr
    usable, outcome = result.stdout.split()
    assert 0 < int(usable) < cap
    assert outcome == "True"

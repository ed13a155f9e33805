"""Usable CPU cores over fake affinity, cgroup CPU quotas (v1, v2, ancestors) and SLURM."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from devicemem.backends import device_memory
from devicemem.backends.host import CpuBackend
from backend_fakes import probe, write_tree

V2_MOUNT = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
V1_CPU_MOUNT = "36 31 0:33 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
V1_MEMORY_MOUNT = "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"


def cores(p) -> tuple[int | None, str | None]:
    (memory,) = CpuBackend().discover(p)
    return memory.cores, memory.cores_source


def test_affinity_binds_below_the_machine(tmp_path: Path) -> None:
    assert cores(probe(tmp_path, affinity={0, 2, 5}, cpu_count=32)) == (3, "affinity")


def test_without_any_limit_the_machine_count_is_used(tmp_path: Path) -> None:
    assert cores(probe(tmp_path, cpu_count=32)) == (32, "os.cpu_count")
    assert cores(probe(tmp_path)) == (None, None)


def test_cgroup_v2_cpu_max_of_an_ancestor_binds_and_rounds_up(tmp_path: Path) -> None:
    write_tree(tmp_path, {
        "proc/self/mountinfo": V2_MOUNT,
        "proc/self/cgroup": "0::/slurm/job_2/step_0\n",
        "sys/fs/cgroup/cgroup.controllers": "cpu memory",
        "sys/fs/cgroup/slurm/job_2/step_0/cpu.max": "max 100000",
        "sys/fs/cgroup/slurm/job_2/cpu.max": "250000 100000",
        "sys/fs/cgroup/slurm/cpu.max": "800000 100000",
    })
    assert cores(probe(tmp_path, affinity=set(range(32)))) == (3, "cgroup-v2:/slurm/job_2 (cpu.max)")


def test_cgroup_v1_cfs_quota_in_its_own_cpu_hierarchy(tmp_path: Path) -> None:
    base = "sys/fs/cgroup/cpu,cpuacct"
    write_tree(tmp_path, {
        "proc/self/mountinfo": V1_MEMORY_MOUNT + V1_CPU_MOUNT,
        "proc/self/cgroup": "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n",
        f"{base}/docker/abc/cpu.cfs_quota_us": 200000,
        f"{base}/docker/abc/cpu.cfs_period_us": 100000,
        f"{base}/cpu.cfs_quota_us": -1,
        f"{base}/cpu.cfs_period_us": 100000,
        # the memory hierarchy has no CPU files: it must not be the one read
        "sys/fs/cgroup/memory/docker/abc/cpu.cfs_quota_us": 100000,
        "sys/fs/cgroup/memory/docker/abc/cpu.cfs_period_us": 100000,
    })
    assert cores(probe(tmp_path, affinity=set(range(16)))) == (2, "cgroup-v1:/docker/abc (cpu.cfs_quota_us)")


def test_unlimited_quota_leaves_affinity(tmp_path: Path) -> None:
    write_tree(tmp_path, {
        "proc/self/mountinfo": V1_CPU_MOUNT,
        "proc/self/cgroup": "5:cpu,cpuacct:/job\n",
        "sys/fs/cgroup/cpu,cpuacct/job/cpu.cfs_quota_us": -1,
        "sys/fs/cgroup/cpu,cpuacct/job/cpu.cfs_period_us": 100000,
    })
    assert cores(probe(tmp_path, affinity={0, 1, 2, 3})) == (4, "affinity")


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"SLURM_CPUS_PER_TASK": "4", "SLURM_CPUS_ON_NODE": "8"}, (4, "slurm:SLURM_CPUS_PER_TASK")),
        ({"SLURM_CPUS_ON_NODE": "6"}, (6, "slurm:SLURM_CPUS_ON_NODE")),
        ({"SLURM_CPUS_PER_TASK": "64"}, (16, "affinity")),
    ],
)
def test_slurm_allocation_binds_when_tightest(tmp_path: Path, environ: dict, expected: tuple) -> None:
    assert cores(probe(tmp_path, environ=environ, affinity=set(range(16)))) == expected


def test_malformed_slurm_cores_are_ignored_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="devicemem"):
        found = cores(probe(tmp_path, environ={"SLURM_CPUS_PER_TASK": "two"}, affinity={0, 1, 2}))
    assert found == (3, "affinity")
    assert "SLURM_CPUS_PER_TASK='two'" in caplog.text


def test_this_process_reports_its_real_affinity() -> None:
    memory = device_memory("cpu")
    assert memory.cores is not None and 1 <= memory.cores <= len(os.sched_getaffinity(0))

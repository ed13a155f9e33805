"""How many CPU cores this process may keep busy: the tightest of its CPU affinity, every cgroup
CPU quota from its own cgroup up to the root (v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``,
v2 ``cpu.max``) and SLURM's allocation (``SLURM_CPUS_PER_TASK``, ``SLURM_CPUS_ON_NODE``).

``os.cpu_count`` (and psutil) report the machine; inside a SLURM job or a container with a CPU
quota, threads beyond the allocation only queue for the same time slices.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from devicemem.backends.cgroups import cgroup_levels
from devicemem.backends.probe import SystemProbe

logger = logging.getLogger("devicemem.backends")

SLURM_CORE_VARS = ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE")


def _quota(probe: SystemProbe, directory: Path, version: str) -> tuple[int, str] | None:
    """(cores, file) of one cgroup's CPU quota, rounded up; None when unlimited or unreadable."""
    if version == "v2":
        fields = (probe.read_text(directory / "cpu.max") or "").split()
        name = "cpu.max"
        quota, period = (fields + ["", ""])[:2]
    else:
        quota = (probe.read_text(directory / "cpu.cfs_quota_us") or "").strip()
        period = (probe.read_text(directory / "cpu.cfs_period_us") or "").strip()
        name = "cpu.cfs_quota_us"
    if not (quota.isdigit() and period.isdigit()) or int(period) == 0 or int(quota) == 0:
        return None  # "max" / -1: no quota
    return max(1, math.ceil(int(quota) / int(period))), name


def core_limits(probe: SystemProbe) -> list[tuple[int, str]]:
    """Every cap on the cores this process may use, as (cores, source), tightest first."""
    limits: list[tuple[int, str]] = []
    if probe.affinity is not None:
        try:
            limits.append((len(probe.affinity()), "affinity"))
        except OSError as exc:
            logger.debug("[MEMORY] cannot read the CPU affinity (%s)", exc)
    for version, level, directory in cgroup_levels(probe, "cpu"):
        quota = _quota(probe, directory, version)
        if quota is not None:
            limits.append((quota[0], f"cgroup-{version}:{level} ({quota[1]})"))
    for name in SLURM_CORE_VARS:
        value = probe.environ.get(name)
        if value is None:
            continue
        if value.strip().isdigit() and int(value) > 0:
            limits.append((int(value), f"slurm:{name}"))
        else:
            logger.warning("[MEMORY] ignoring %s=%r: expected a positive integer", name, value)
    return sorted(limits, key=lambda limit: limit[0])


def usable_cores(probe: SystemProbe) -> tuple[int | None, str | None]:
    """(cores, source): the tightest of :func:`core_limits`, else ``os.cpu_count``, else
    (None, None)."""
    limits = core_limits(probe)
    if limits:
        return limits[0]
    count = probe.cpu_count()
    return (count, "os.cpu_count") if count else (None, None)

"""Where this process's cgroups are: the v1 hierarchy of one controller and the v2 hierarchy,
and the directories from this process's own cgroup up to the root of each.

SLURM and container runtimes often limit an ancestor while the leaf says "max", so every limit
(memory, CPU quota) is read at every level of :func:`cgroup_levels`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

from devicemem.backends.probe import SystemProbe


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def cgroup_mounts(probe: SystemProbe, controller: str) -> list[tuple[str, Path, str]]:
    """(version, mount directory, mounted cgroup root) for the v1 hierarchy that carries
    ``controller`` ("memory", "cpu") and for the v2 hierarchy."""
    text = probe.read_text(probe.proc("mountinfo"))
    mounts: dict[str, tuple[str, Path, str]] = {}
    for line in (text or "").splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        fstype = fields[sep + 1] if len(fields) > sep + 1 else ""
        options = fields[sep + 3].split(",") if len(fields) > sep + 3 else []
        if fstype == "cgroup2":
            version = "v2"
        elif fstype == "cgroup" and controller in options:
            version = "v1"
        else:
            continue
        if version not in mounts:
            mount = probe.root / _unescape(fields[4]).lstrip("/")
            mounts[version] = (version, mount, _unescape(fields[3]))
    if text is None:
        v1 = probe.root / "sys/fs/cgroup" / controller
        v2 = probe.root / "sys/fs/cgroup"
        if v1.is_dir():
            mounts["v1"] = ("v1", v1, "/")
        if (v2 / "cgroup.controllers").exists():
            mounts["v2"] = ("v2", v2, "/")
    return list(mounts.values())


def own_cgroup_paths(probe: SystemProbe, controller: str) -> dict[str, str]:
    """This process's cgroup path in the v1 hierarchy of ``controller`` and in the v2 one."""
    paths: dict[str, str] = {}
    for line in (probe.read_text(probe.proc("cgroup")) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if controller in controllers.split(","):
            paths.setdefault("v1", path)
        elif hierarchy == "0" and controllers == "":
            paths.setdefault("v2", path)
    return paths


def cgroup_levels(probe: SystemProbe, controller: str) -> Iterator[tuple[str, str, Path]]:
    """(version, level, directory) for every cgroup this process is in, per hierarchy, from its
    own cgroup up to the root; ``level`` is the path relative to the mount, e.g. "/slurm/job_2"."""
    own = own_cgroup_paths(probe, controller)
    for version, mount, mount_root in cgroup_mounts(probe, controller):
        path = own.get(version)
        if path is None:
            continue
        relative = path[len(mount_root):] if path.startswith(mount_root) else ""
        parts = [p for p in relative.split("/") if p]
        if ".." in parts:  # our cgroup lies outside this mount's namespace: start at its top
            parts = []
        for depth in range(len(parts), -1, -1):
            yield version, "/" + "/".join(parts[:depth]), mount.joinpath(*parts[:depth])

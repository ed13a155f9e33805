"""Run a command in a child process under a real memory cap and measure its peak RSS.

Used by the test-suite and the benchmarks to check memory claims by measurement. The cap is
a child memory cgroup where this process may create one (cgroup v1 memory controller or
cgroup v2, normally needs root), else ``RLIMIT_AS``. Peak RSS is measured by a small
watcher process between this one and the command (see ``_WATCHER``), so it is the command's
own, whatever the size of the caller and whether the command resets its high-water mark.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Mapping, Sequence

CapMethod = Literal["auto", "cgroup", "rlimit", "none"]


@dataclass(frozen=True)
class ChildResult:
    """Outcome of one capped child: exit status, peak resident memory, and how it was capped."""

    returncode: int
    peak_rss_bytes: int
    killed: bool
    timed_out: bool
    stdout: str
    stderr: str
    cap_bytes: int | None
    cap_method: str
    wall_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _memory_cgroup_dir(root: Path = Path("/")) -> tuple[str, Path] | None:
    """The (version, directory) of this process's own memory cgroup, if one is mounted."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            base = root / "sys/fs/cgroup/memory"
            if base.is_dir():
                return "v1", base / path.lstrip("/")
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and controllers == "":
            base = root / "sys/fs/cgroup"
            if (base / "cgroup.controllers").exists():
                return "v2", base / path.lstrip("/")
    return None


class _Cgroup:
    """A temporary child memory cgroup with a hard limit; removed on close."""

    def __init__(self, limit_bytes: int) -> None:
        found = _memory_cgroup_dir()
        if found is None:
            raise OSError("no memory cgroup controller is mounted")
        self.version, parent = found
        self.path = parent / f"devicemem-test-{uuid.uuid4().hex[:12]}"
        self.path.mkdir()
        try:
            if self.version == "v1":
                (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
                swap = self.path / "memory.memsw.limit_in_bytes"
                if swap.exists():
                    swap.write_text(str(limit_bytes))
            else:
                (self.path / "memory.max").write_text(str(limit_bytes))
                swap = self.path / "memory.swap.max"
                if swap.exists():
                    swap.write_text("0")
        except OSError:
            self.close()
            raise

    def enter(self) -> None:
        """Move the calling process into the cgroup (run in the child before exec)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def close(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.02)


# The watcher runs ``argv`` as its own child and keeps that child's peak RSS: the larger of
# ``VmHWM`` read every millisecond and ``wait4``'s ``ru_maxrss``. It exists because a process
# forked straight from a big parent (pytest, the bench driver) inherits the parent's RSS
# high-water mark into ``ru_maxrss`` at exec; forked from this small watcher it inherits only
# the watcher's few MB. Sampling ``VmHWM`` keeps the peak of a child that resets its own mark
# (devicemem's CPU backend writes /proc/self/clear_refs before each batch).
_WATCHER = r"""
import os, signal, sys, time
result, argv = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        sys.stderr.write(f"cannot run {argv[0]}: {exc}\n")
        os._exit(127)
peak = 0
def record(value):
    global peak
    if value > peak:
        peak = value
        with open(result, "w") as f:
            f.write(str(peak))
while True:
    got, status, usage = os.wait4(pid, os.WNOHANG)
    if got == pid:
        break
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    record(int(line.split()[1]) * 1024)
                    break
    except OSError:
        pass
    time.sleep(0.001)
record(usage.ru_maxrss * 1024)
if os.WIFSIGNALED(status):
    if os.WTERMSIG(status) != signal.SIGKILL:
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
    os.kill(os.getpid(), os.WTERMSIG(status))
sys.exit(os.WEXITSTATUS(status))
"""


def cgroup_unavailable_reason() -> str | None:
    """None when a child memory cgroup can be created here, else why not (for pytest.skip)."""
    try:
        group = _Cgroup(1 << 30)
    except OSError as exc:
        return f"cannot create a child memory cgroup here: {exc}"
    group.close()
    return None


def run_child(
    argv: Sequence[str],
    *,
    cap_bytes: int | None = None,
    cap_method: CapMethod = "auto",
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> ChildResult:
    """Run ``argv`` to completion under ``cap_bytes`` and return its peak RSS and outcome.

    ``cap_method="auto"`` uses a cgroup where possible, else RLIMIT_AS. A child over a cgroup
    cap is SIGKILLed by the kernel (``killed``); over RLIMIT_AS its allocations fail instead.
    """
    if cap_bytes is None:
        cap_method = "none"
    group: _Cgroup | None = None
    method = cap_method
    if cap_method in ("auto", "cgroup"):
        try:
            group = _Cgroup(int(cap_bytes))  # type: ignore[arg-type]
            method = f"cgroup-{group.version}"
        except OSError:
            if cap_method == "cgroup":
                raise
            method = "rlimit"
    preexec: Callable[[], None] | None = None
    if group is not None:
        preexec = group.enter
    elif method == "rlimit":
        limit = int(cap_bytes)  # type: ignore[arg-type]

        def preexec() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    out_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"devicemem-child-{uuid.uuid4().hex}"
    start = time.perf_counter()
    timed_out = False
    try:
        with open(f"{out_path}.out", "w+") as out, open(f"{out_path}.err", "w+") as err:
            proc = subprocess.Popen(
                [sys.executable, "-S", "-c", _WATCHER, f"{out_path}.peak", *argv],
                stdout=out, stderr=err, env=dict(env) if env is not None else None,
                cwd=cwd, preexec_fn=preexec, start_new_session=True,
            )
            deadline = None if timeout is None else start + timeout
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid == proc.pid:
                    break
                if deadline is not None and time.perf_counter() > deadline:
                    timed_out = True
                    os.killpg(proc.pid, signal.SIGKILL)
                    pid, status, usage = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.01)
            proc.returncode = os.waitstatus_to_exitcode(status)
            wall = time.perf_counter() - start
            out.seek(0)
            err.seek(0)
            stdout, stderr = out.read(), err.read()
            peak_path = Path(f"{out_path}.peak")
            peak = int(peak_path.read_text() or 0) if peak_path.exists() else 0
    finally:
        for suffix in (".out", ".err", ".peak"):
            Path(f"{out_path}{suffix}").unlink(missing_ok=True)
        if group is not None:
            group.close()
    return ChildResult(
        returncode=proc.returncode,
        peak_rss_bytes=peak,
        killed=proc.returncode == -signal.SIGKILL and not timed_out,
        timed_out=timed_out,
        stdout=stdout,
        stderr=stderr,
        cap_bytes=cap_bytes,
        cap_method=method,
        wall_s=wall,
    )

"""tests.support.child: the capped-child runner every memory claim in tests and bench relies on."""

from __future__ import annotations

import sys

import pytest

from tests.support.child import cgroup_unavailable_reason, run_child

ALLOC_300MB = "import numpy as np; a = np.ones(300_000_000 // 8); a.sum()"


def test_peak_rss_survives_the_child_resetting_its_high_water_mark() -> None:
    code = ALLOC_300MB + "; del a; open('/proc/self/clear_refs', 'w').write('5'); import time; time.sleep(0.05)"
    result = run_child([sys.executable, "-c", code])
    assert result.ok, result.stderr
    assert 300e6 <= result.peak_rss_bytes < 450e6


def test_rlimit_cap_makes_the_allocation_fail_in_the_child() -> None:
    result = run_child([sys.executable, "-c", ALLOC_300MB], cap_bytes=200 << 20, cap_method="rlimit")
    assert result.cap_method == "rlimit"
    assert result.returncode == 1 and "MemoryError" in result.stderr
    assert not result.killed


@pytest.mark.skipif(cgroup_unavailable_reason() is not None, reason=str(cgroup_unavailable_reason()))
def test_cgroup_cap_kills_a_child_over_it_and_lets_one_under_it_finish() -> None:
    over = run_child([sys.executable, "-c", ALLOC_300MB], cap_bytes=200 << 20, cap_method="cgroup")
    assert over.cap_method.startswith("cgroup") and over.killed
    under = run_child([sys.executable, "-c", ALLOC_300MB], cap_bytes=600 << 20, cap_method="cgroup")
    assert under.ok and under.peak_rss_bytes >= 300e6


def test_timeout_kills_and_is_reported() -> None:
    result = run_child([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert result.timed_out and not result.killed and result.wall_s < 10


def test_peak_rss_is_the_childs_own_not_its_big_parents() -> None:
    ballast = bytearray(600_000_000)
    ballast[::4096] = b"\x01" * len(ballast[::4096])
    result = run_child([sys.executable, "-c", "pass"])
    del ballast
    assert result.ok and result.peak_rss_bytes < 100e6

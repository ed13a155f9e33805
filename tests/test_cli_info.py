"""`devicemem info` in-process and in a child under a real RLIMIT_AS cap."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import pytest

from devicemem.cli import main
from devicemem.backends import DeviceMemory
from tests.support.child import run_child

GiB = 1 << 30


def info_json(capsys: pytest.CaptureFixture, *args: str) -> list[dict]:
    assert main(["info", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_keys_mirror_device_memory(capsys: pytest.CaptureFixture) -> None:
    rows = info_json(capsys)
    fields = [field.name for field in dataclasses.fields(DeviceMemory)]
    assert rows and all(list(row) == fields for row in rows)
    cpu = rows[0]
    assert cpu["device"] == "cpu"
    for key in ("total_bytes", "free_bytes", "usable_bytes"):
        assert isinstance(cpu[key], int) and cpu[key] > 0
    assert isinstance(cpu["sources"], list) and cpu["sources"][0] == "psutil.virtual_memory"
    assert 1 <= cpu["cores"] <= os.cpu_count() and cpu["cores_source"]
    assert all(row["cores"] is None for row in rows[1:])


def test_environment_override_shows_as_the_limit(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVICEMEM_MAX_MEMORY", "cpu=1GiB")
    (cpu, *_) = info_json(capsys)
    assert (cpu["limit_bytes"], cpu["usable_bytes"]) == (GiB, GiB)
    assert cpu["sources"][1] == "override:DEVICEMEM_MAX_MEMORY"
    assert main(["info"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["device", "name", "total", "free", "limit", "(from)", "usable", "cores", "(from)"]
    assert table[1].startswith("cpu ") and "1.07 GB (override:DEVICEMEM_MAX_MEMORY)" in table[1]
    assert table[1].split("(override:DEVICEMEM_MAX_MEMORY)")[1].split()[:2] == ["1.07", "GB"]
    assert table[1].endswith(f"{cpu['cores']} ({cpu['cores_source']})")


def test_max_memory_option_caps_like_the_environment(capsys: pytest.CaptureFixture) -> None:
    (cpu, *_) = info_json(capsys, "--max-memory", "cpu=512MiB")
    assert cpu["usable_bytes"] == 512 << 20 and cpu["sources"][1] == "override:max_memory"


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--max-memory", "cpu=lots"], None, "max_memory['cpu']: could not read 'lots'; expected"),
        ([], "cuda:0=20GiB,tpu=1G", "DEVICEMEM_MAX_MEMORY: unknown device 'tpu'"),
    ],
)
def test_bad_input_exits_2_with_one_line_not_a_traceback(capsys, monkeypatch, args, env, message) -> None:
    if env is not None:
        monkeypatch.setenv("DEVICEMEM_MAX_MEMORY", env)
    assert main(["info", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("devicemem: error: ") and message in err
    assert "Traceback" not in err


def test_child_under_rlimit_as_reports_usable_within_its_limit() -> None:
    cap = 3 * GiB // 2
    result = run_child([sys.executable, "-m", "devicemem.cli", "info", "--json"], cap_bytes=cap,
                       cap_method="rlimit", timeout=180)
    assert result.ok, result.stderr
    cpu = json.loads(result.stdout)[0]
    assert cpu["limit_bytes"] == cap and "rlimit:RLIMIT_AS" in cpu["sources"]
    assert 0 < cpu["usable_bytes"] <= cap

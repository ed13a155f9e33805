"""The benchmark harness on a tiny workload, so bench/ cannot rot: real children, real caps."""

from __future__ import annotations

import json

import pytest

from bench import report
from bench.baselines import batch_sizes, bayesdream_batch_size
from bench.data import DataSpec, write_dataset
from bench.harness import Config, run_configs
from bench.workloads import build_workloads
from tests.support.child import cgroup_unavailable_reason


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "tiny.pt"
    write_dataset(DataSpec(n_cells=40, n_features=30), path)
    return str(path)


def _spec(data: str, baseline: str, **extra) -> dict:
    return {"kind": "predictive", "baseline": baseline, "num_samples": 12, "observe": True,
            "return_sites": ["y_obs"], "reduce_sites": ["y_obs"], "device": "cpu", "seed": 0,
            "data": data, **extra}


@pytest.mark.slow
def test_measures_a_run_and_records_a_config_killed_under_its_cap(tiny_data, tmp_path):
    configs = [
        Config("sweep-B=5", _spec(tiny_data, "sweep", batch_size=5)),
        # 48 MiB cannot even hold `import torch`: the kernel kills the child (cgroup), or its
        # allocations fail (RLIMIT_AS); either way the row must be kept with that outcome.
        Config("capped", _spec(tiny_data, "pyro-full"), cap_bytes=48 * 2**20, timeout_s=120),
    ]
    ok, capped = run_configs(configs, reps=2, cache_dir=tmp_path)

    assert ok.status == "ok" and len(ok.reps) == 2
    first = ok.reps[0]
    assert 0 < first.sample_wall_s < first.total_wall_s
    assert first.peak_rss_bytes > 100 * 2**20  # torch and pyro were imported
    assert ok.info == {"batch_size": 5, "n_batches": 3, "vectorized": True, "samples_drawn": 12}
    assert first.payload["outputs"] == {"y_obs:mean": [40, 30], "y_obs:var": [40, 30]}

    expected = "killed" if cgroup_unavailable_reason() is None else ("oom", "failed")
    assert capped.status in expected
    assert len(capped.reps) == 1, "a config that failed under its cap is not repeated"
    assert capped.median_wall_s is None and capped.reps[0].error

    workload = {"name": "W2a", "group": "W2", "title": "tiny", "reps": 2,
                "reference": "sweep-B=5", "params": {"cap_bytes": 48 * 2**20},
                "rows": [{**row.to_json(), "info": row.info} for row in (ok, capped)]}
    results = {"date": "today", "quick": True, "duration_s": 1.0, "workloads": [workload],
               "machine": {"host": "h", "cpu": "c", "cores": 2, "ram_bytes": 2**30,
                           "torch": "t", "pyro": "p", "cap_method": "m", "load_before": "0",
                           "load_after": "0"}}
    paths = report.write(results, tmp_path, "tiny")
    table = paths["md"].read_text()
    assert f"| capped | **{capped.status}** |" in table
    assert "| sweep-B=5 | ok | 5 x 3 vec |" in table
    assert paths["png"].stat().st_size > 1000
    saved = json.loads(paths["json"].read_text())
    assert [row["status"] for row in saved["workloads"][0]["rows"]] == ["ok", capped.status]


def test_bayesdream_rule_reproduces_its_published_choice():
    # bayesDREAM chose 41 sequential batches of 25 at N=3000, T=4000, C=2, S=1000 with ~14 GB
    # available: 0.35 * 14e9 / ((2*2*4000 + 3*4000)*4 + 16*3000*4000) = 25.5.
    assert bayesdream_batch_size(3000, 4000, 2, 1000, 14 * 10**9) == 25
    assert bayesdream_batch_size(3000, 4000, 2, 1000, 10**9) == 10  # clamped up
    assert bayesdream_batch_size(100, 100, 2, 1000, 10**12) == 100  # clamped down
    assert bayesdream_batch_size(100, 100, 2, 30, 10**12) == 30
    assert batch_sizes(12, 5) == [5, 5, 2] and batch_sizes(10, 5) == [5, 5]


def test_workloads_cover_every_baseline_and_skip_w6_without_cuda():
    workloads = {w.name: w for w in build_workloads(quick=False, cuda=False)}
    names = [c.name for c in workloads["W1a"].configs]
    assert names[:4] == ["pyro-full", "pyro-sequential", "bayesdream-rule", "conservative-50"]
    assert {f"sweep-B={b}" for b in (10, 25, 50, 100, 250, 1000)} <= set(names)
    assert names[-1] == "devicemem-auto"
    assert workloads["W2a"].params["cap_bytes"] == 4 * 2**30
    assert workloads["W6"].kind == "skipped" and "CUDA" in workloads["W6"].notes[0]


def _row(name: str, status: str, wall: float | None, peak: int = 2**30) -> dict:
    return {"name": name, "status": status, "median_wall_s": wall, "peak_rss_bytes": peak,
            "info": {}, "reps": [{"status": status}]}


def test_w2_acceptance_compares_with_the_best_completed_sweep_only():
    rows = [_row("conservative-50", "killed", None), _row("sweep-B=10", "ok", 12.0),
            _row("sweep-B=25", "ok", 10.0), _row("sweep-B=100", "killed", None),
            _row("sweep-B=250", "ok", 1.0), _row("devicemem-auto", "ok", 10.5)]
    workload = {"name": "W2a", "group": "W2", "params": {"cap_bytes": 4 * 2**30}, "rows": rows}
    completes, vs_sweep, vs_conservative = report.summarize({"workloads": [workload]})
    assert completes["passed"] is True
    assert "sweep-B=25" in vs_sweep["claim"]  # B=250 is outside {10, 25, 50, 100}
    assert vs_sweep["value"] == "0.95x" and vs_sweep["passed"] is True
    assert vs_conservative["passed"] is True and "killed" in vs_conservative["value"]

    rows[-1] = _row("devicemem-auto", "ok", 12.0)
    _, vs_sweep, _ = report.summarize({"workloads": [workload]})
    assert vs_sweep["value"] == "0.83x" and vs_sweep["passed"] is False


def test_w2_extrapolates_a_reduced_run_to_the_issues_sample_count():
    auto = {**_row("devicemem-auto", "ok", 60.0), "info": {"batches_s": 50.0}}
    workload = {"name": "W2a", "group": "W2", "rows": [_row("sweep-B=25", "ok", 50.0), auto],
                "params": {"cap_bytes": 4 * 2**30, "S": 100, "issue_S": 1000}}
    rows = report.summarize({"workloads": [workload]})
    measured, projected = rows[1], rows[2]
    assert measured["value"] == "0.83x"
    # 10 s of fixed overhead over 10x the work: 500 / (500 + 10)
    assert projected["value"] == "0.98x" and "not measured" in projected["claim"]
    assert projected["passed"] is None

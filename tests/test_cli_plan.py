"""`bayesdream-ext plan-predictive` (was `devicemem plan`): the technical model's Predictive plan from
shapes, as text and JSON, and its errors."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bayesDREAM_ext.cli import main
from devicemem.planner import Plan

CAP = ["--max-memory", "cpu=2GB"]  # a fixed budget whatever the machine has free


def plan_json(capsys: pytest.CaptureFixture, *args: str) -> dict:
    assert main(["plan-predictive", "--json", *CAP, *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_mirrors_plan_and_the_seed_case_is_one_vectorised_batch(capsys):
    plan = plan_json(capsys, "--cells", "3000", "--features", "4000", "--groups", "2", "--samples", "1000")
    assert list(plan) == [field.name for field in dataclasses.fields(Plan)]
    assert (plan["device"], plan["batch_size"], plan["n_batches"], plan["vectorized"]) == ("cpu", 1000, 1, True)
    assert plan["budget_bytes"] == int(0.8 * 2e9) - plan["output_bytes"]
    assert plan["reasons"][0].startswith("Available CPU RAM: 2.00 GB usable (limit 2.00 GB from override:max_memory)")


def test_with_obs_splits_into_batches_that_fit(capsys):
    plan = plan_json(capsys, "--cells", "1000", "--features", "1000", "--groups", "2", "--samples", "100",
                     "--with-obs", "--safety-factor", "0.5")
    assert plan["n_batches"] > 1 and plan["vectorized"]
    assert plan["predicted_peak_bytes"] <= plan["budget_bytes"] == int(0.5 * 2e9) - plan["output_bytes"]


def test_results_on_disk_do_not_count(capsys):
    # 1.58 GB of results leave a small budget: on the host they shrink the batch
    args = ["--cells", "100", "--features", "100", "--groups", "2", "--samples", "37500", "--with-obs"]
    on_host = plan_json(capsys, *args)
    on_disk = plan_json(capsys, *args, "--results-on-disk")
    assert on_disk["output_bytes"] == 0 and on_disk["batch_size"] > on_host["batch_size"]


def test_text_output_says_why(capsys):
    assert main(["plan-predictive", *CAP, "--cells", "500", "--features", "300", "--groups", "3", "--samples", "200",
                 "--guide", "iaf", "--distribution", "normal"]) == 0
    out = capsys.readouterr().out
    assert "batches         1 vectorised of 200 (200 samples)" in out
    assert "  - Will use one vectorised batch of 200 on cpu" in out


SHAPES = ["--cells", "9", "--features", "3", "--groups", "2", "--samples", "5"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cells", "0", "--features", "3", "--groups", "1", "--samples", "5"], "argument --cells: expected an integer >= 1"),
        ([*SHAPES, "--samples", "x"], "argument --samples: expected an integer >= 1; got 'x'"),
        ([*SHAPES, "--distribution", "poisson"], "argument --distribution: invalid choice: 'poisson'"),
        ([*SHAPES, "--guide", "lowrank"], "argument --guide: invalid choice: 'lowrank'"),
    ],
)
def test_unreadable_options_exit_2_naming_them(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan-predictive", *CAP, *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--cells", "2", "--features", "3", "--groups", "4", "--samples", "5"], "n_groups: cannot exceed n_cells"),
        ([*SHAPES, "--safety-factor", "1.5"], "--safety-factor: expected a number in (0, 1]"),
        ([*SHAPES, "--device", "cuda:7"], "device: 'cuda:7' is not visible"),
    ],
)
def test_bad_values_exit_2_naming_them(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan-predictive", *CAP, *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_one_sample_that_cannot_fit_is_an_error_with_numbers(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["plan-predictive", "--max-memory", "cpu=100MB", "--cells", "5000", "--features", "5000", "--groups", "2",
              "--samples", "10", "--with-obs", "--results-on-disk"])
    assert exit_info.value.code == 2 and "one sample needs" in capsys.readouterr().err

"""out=DIR keeps a manifest and an interrupted run resumes (issue 15): after a Ctrl-C the
manifest says how far the run got, and resume=True finishes it with the draws an uninterrupted
run makes, likelihood included."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bayesDREAM_ext.model import technical_model
from devicemem.predictive import Predictive
from tests.runner_fakes import Faulty, make_plan

NUM, BATCH = 20, 6


def manifest(path):
    return json.loads((path / "manifest.json").read_text())


def test_an_interrupted_run_is_marked_incomplete_and_resumes_to_the_uninterrupted_draws(problem, tmp_path):
    args, guide = problem
    options = dict(guide=guide, num_samples=NUM, seed=3, progress=False, parallel=True)  # no vectorising check
    whole = Predictive(technical_model, plan=make_plan(NUM, BATCH), out=tmp_path / "whole", **options)
    expected = {name: value.clone() for name, value in whole(*args).items()}
    done = manifest(tmp_path / "whole")
    assert done["complete"] and done["complete_samples"] == NUM and done["seed"] == 3
    assert done["plan"]["batch_size"] == BATCH

    interrupted = Faulty(technical_model, KeyboardInterrupt, fail_calls=(3,))  # the third batch
    with pytest.raises(KeyboardInterrupt):
        Predictive(interrupted, plan=make_plan(NUM, BATCH), out=tmp_path / "cut", **options)(*args)
    cut = manifest(tmp_path / "cut")
    assert not cut["complete"] and cut["complete_samples"] == 2 * BATCH

    resumed = Predictive(technical_model, out=tmp_path / "cut", resume=True, **options)
    result = resumed(*args)
    assert [(row.start, row.size) for row in resumed.report] == [(12, 6), (18, 2)]
    assert manifest(tmp_path / "cut")["complete"]
    for name, value in expected.items():
        assert torch.equal(result[name], value), name
        assert np.array_equal(np.load(tmp_path / "cut" / f"{name}.npy"), value.numpy()), name


def test_resume_refuses_another_runs_directory(problem, tmp_path):
    args, guide = problem
    Predictive(technical_model, guide=guide, num_samples=8, seed=1, plan=make_plan(8, 4), out=tmp_path,
               progress=False)(*args)
    for options, message in [
        (dict(num_samples=8, seed=2), "records a run with seed=1; this call has 2"),
        (dict(num_samples=9, seed=1), "records a run with num_samples=8"),
        (dict(num_samples=8, seed=1, return_sites=["beta_o"]), "records a run with sites="),
    ]:
        with pytest.raises(ValueError, match=message):
            Predictive(technical_model, guide=guide, out=tmp_path, resume=True, progress=False, **options)(*args)
    with pytest.raises(ValueError, match="nothing to resume"):
        Predictive(technical_model, guide=guide, num_samples=8, out=tmp_path / "empty", resume=True,
                   progress=False)(*args)
    for options in (dict(), dict(reduce={"y_obs": "mean"}, out=tmp_path), dict(plan=make_plan(8, 4), out=tmp_path)):
        with pytest.raises(ValueError, match="resume: continues a single-device run"):
            Predictive(technical_model, guide=guide, num_samples=8, resume=True, **options)

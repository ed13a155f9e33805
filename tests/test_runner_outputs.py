"""Where results go: streaming reducers, numpy memmaps in out=DIR, progress and logs."""

import logging
from pathlib import Path

import numpy as np
import torch

from bayesDREAM_ext.model import technical_model
from devicemem.predictive import Predictive
from tests.runner_fakes import make_plan


def test_reducers_agree_with_mean_and_var_of_the_stored_samples(problem):
    args, guide = problem
    stored = Predictive(technical_model, guide=guide, num_samples=50, seed=6, plan=make_plan(50, 7), progress=False)(*args)
    reduced = Predictive(
        technical_model, guide=guide, num_samples=50, seed=6, plan=make_plan(50, 7), progress=False,
        reduce={"y_obs": ("mean", "var"), "mu_ntc": "mean"},
    )(*args)
    assert "y_obs" not in reduced and "mu_ntc" not in reduced
    assert set(reduced) == (set(stored) - {"y_obs", "mu_ntc"}) | {"y_obs:mean", "y_obs:var", "mu_ntc:mean"}
    samples = stored["y_obs"].double()
    assert reduced["y_obs:mean"].dtype == torch.float64
    assert reduced["y_obs:mean"].shape == samples.shape[1:]
    # each batch is reduced where it was drawn, in the samples' float32: float32's resolution
    torch.testing.assert_close(reduced["y_obs:mean"], samples.mean(0), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(reduced["y_obs:var"], samples.var(0), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(reduced["mu_ntc:mean"], stored["mu_ntc"].double().mean(0), rtol=1e-6, atol=1e-12)
    assert torch.equal(reduced["beta_o"], stored["beta_o"])


def test_out_writes_numpy_memmaps_with_the_same_draws(problem, tmp_path):
    args, guide = problem
    in_memory = Predictive(technical_model, guide=guide, num_samples=11, seed=1, plan=make_plan(11, 4),
                           progress=False)(*args)
    on_disk = Predictive(technical_model, guide=guide, num_samples=11, seed=1, plan=make_plan(11, 4),
                         progress=False, out=tmp_path / "draws")(*args)
    assert sorted(path.name for path in (tmp_path / "draws").iterdir()) == sorted([f"{name}.npy" for name in in_memory] + ["manifest.json"])
    for name, value in in_memory.items():
        assert torch.equal(on_disk[name], value)
        saved = np.load(Path(tmp_path / "draws" / f"{name}.npy"), mmap_mode="r")
        assert saved.dtype == value.numpy().dtype and np.array_equal(saved, value.numpy())


def test_progress_bar_shows_memory_and_logs_go_to_devicemem(problem, capsys, caplog):
    args, guide = problem
    with caplog.at_level(logging.INFO, logger="devicemem"):
        Predictive(technical_model, guide=guide, num_samples=6, plan=make_plan(6, 3), progress=True)(*args)
    err = capsys.readouterr().err
    assert "6/6" in err and "mem=" in err and "peak=" in err
    assert "[MEMORY] Using the given plan: 2 vectorised batch(es) of 3 on cpu" in caplog.text
    assert "test plan" not in caplog.text  # a given plan's reasons were logged by whoever made it
    Predictive(technical_model, guide=guide, num_samples=6, plan=make_plan(6, 3), progress=False)(*args)
    assert capsys.readouterr().err == ""


def test_report_has_a_row_per_batch_with_measured_peaks(problem):
    args, guide = problem
    runner = Predictive(technical_model, guide=guide, num_samples=10, plan=make_plan(10, 4), progress=False)
    assert runner.report == []
    runner(*args)
    assert runner.plan == make_plan(10, 4)
    assert [(row.start, row.size, row.device, row.retries) for row in runner.report] == [
        (0, 4, "cpu", 0), (4, 4, "cpu", 0), (8, 2, "cpu", 0)
    ]
    assert all(row.wall_s > 0 and row.peak_bytes >= row.base_bytes > 50e6 for row in runner.report)
    assert all(row.working_bytes == row.peak_bytes - row.base_bytes < 200e6 for row in runner.report)

"""Nothing lost, errors before work (issue 15): the CLI checks every option and its --out
before reading or training; a Ctrl-C during Predictive keeps the trained guide in a recovery
file that resumes the fit; damaged files, bad seeds and counts beyond float32 are ValueErrors."""

from __future__ import annotations

import tempfile
import time

import numpy as np
import pandas as pd
import pytest
import torch

import bayesDREAM_ext.fit as fit_module
from bayesDREAM_ext.cli import main
from bayesDREAM_ext.fit import PredictiveInterrupted, fit_technical
from bayesDREAM_ext.records import GuideState, TechnicalFit
from bayesDREAM_ext.synthetic import synthetic_technical

FAST = dict(niters=20, nsamples=6, progress=False, seed=0)


@pytest.fixture
def files(tmp_path):
    data = synthetic_technical(40, 6, 2, seed=1)
    np.savez(tmp_path / "counts.npz", counts=data.counts)
    pd.DataFrame({"lane": np.where(data.groups == 0, "L1", "L2")}).to_csv(tmp_path / "meta.csv")
    return tmp_path


def no_training(*args, **kwargs):
    raise AssertionError("training started before a bad option was reported")


@pytest.mark.parametrize(
    "option, value, named",
    [
        ("--out", "/no/such/dir/f.pt", "--out"),
        ("--out", "{tmp}", "--out: "),
        ("--threads", "0", "--threads"),
        ("--nsamples", "0", "--nsamples"),
        ("--niters", "-3", "--niters"),
        ("--lr", "-1", "--lr"),
        ("--safety-factor", "1.5", "--safety-factor"),
        ("--seed", "-1", "--seed"),
        ("--max-memory", "cpu=lots", "max_memory"),
        ("--device", "tpu:9", "device"),
        ("--guide-state", "{tmp}/counts.npz", "GuideState"),
    ],
)
def test_cli_reports_a_bad_option_before_reading_or_training(files, monkeypatch, capsys, option, value, named):
    monkeypatch.setattr(fit_module, "train", no_training)
    argv = {"--counts": str(files / "counts.npz"), "--meta": str(files / "meta.csv"), "--group-col": "lane",
            "--out": str(files / "fit.pt"), "--quiet": None}
    argv[option] = value.format(tmp=files)
    started = time.perf_counter()
    with pytest.raises(SystemExit) as exited:
        main(["fit-technical"] + [part for key, val in argv.items() for part in (key, val) if part is not None])
    assert time.perf_counter() - started < 1.0
    assert exited.value.code == 2
    assert named in capsys.readouterr().err
    assert not (files / "fit.pt").exists()


class InterruptedPredictive:
    """Stands in for devicemem.Predictive and is interrupted like a Ctrl-C would."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        raise KeyboardInterrupt


def test_ctrl_c_during_predictive_keeps_the_guide_in_a_recovery_file_that_resumes(files, monkeypatch, capsys):
    data = synthetic_technical(60, 8, 2, seed=3)
    args = (data.counts, data.groups, data.sum_factors)
    monkeypatch.setattr(tempfile, "tempdir", str(files))
    with monkeypatch.context() as patch:
        patch.setattr(fit_module, "Predictive", InterruptedPredictive)
        with pytest.raises(PredictiveInterrupted) as interrupted:
            fit_technical(*args, **FAST)
    assert isinstance(interrupted.value, KeyboardInterrupt)
    path = interrupted.value.recovery_path
    assert path is not None and path in str(interrupted.value)
    saved = GuideState.load(path)
    kept = interrupted.value.guide_state
    assert saved.losses == kept.losses and saved.svi_plan == kept.svi_plan
    for name, value in kept.state_dict.items():
        torch.testing.assert_close(saved.state_dict[name], value)

    monkeypatch.setattr(fit_module, "train", no_training)
    from_memory = fit_technical(*args, guide_state=kept, **FAST)
    from_file = fit_technical(*args, guide_state=saved, **FAST)
    for name, value in from_memory.posterior_samples.items():
        torch.testing.assert_close(from_file.posterior_samples[name], value, equal_nan=True)


def test_cli_resumes_from_a_recovery_file_without_training(files, monkeypatch):
    data = synthetic_technical(40, 6, 2, seed=1)
    monkeypatch.setattr(tempfile, "tempdir", str(files))
    monkeypatch.setattr(fit_module, "Predictive", InterruptedPredictive)
    with pytest.raises(PredictiveInterrupted) as interrupted:
        main(["fit-technical", "--counts", str(files / "counts.npz"), "--meta", str(files / "meta.csv"),
              "--group-col", "lane", "--out", str(files / "fit.pt"), "--niters", "10", "--nsamples", "4", "--quiet"])
    assert "--guide-state" in str(interrupted.value)
    monkeypatch.undo()
    monkeypatch.setattr(fit_module, "train", no_training)
    code = main(["fit-technical", "--counts", str(files / "counts.npz"), "--meta", str(files / "meta.csv"),
                 "--group-col", "lane", "--out", str(files / "fit.pt"), "--nsamples", "4", "--quiet",
                 "--guide-state", interrupted.value.recovery_path])
    assert code == 0
    assert TechnicalFit.load(files / "fit.pt").posterior_samples["log2_alpha_y"].shape == (4, 1, data.counts.shape[1])


def test_loading_a_truncated_or_foreign_file_names_it(tmp_path):
    data = synthetic_technical(40, 6, 2, seed=1)
    good = tmp_path / "fit.pt"
    fit_technical(data.counts, data.groups, data.sum_factors, **FAST).save(good)
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[:300])
    (tmp_path / "text.pt").write_bytes(b"hello world")
    torch.save({"a": torch.ones(2)}, tmp_path / "other.pt")
    torch.save({"metadata": "{not json"}, tmp_path / "badjson.pt")
    for name in ("truncated", "text", "other", "badjson"):
        with pytest.raises(ValueError, match=f"path: '.*{name}.pt' is not a readable TechnicalFit file"):
            TechnicalFit.load(tmp_path / f"{name}.pt")
    with pytest.raises(ValueError, match="is not a saved GuideState .*TechnicalFit"):
        GuideState.load(good)


@pytest.mark.parametrize("seed", [-1, "abc", 2**32, 1.5, True])
def test_a_bad_seed_is_rejected_before_any_work(seed, monkeypatch):
    data = synthetic_technical(40, 6, 2, seed=1)
    monkeypatch.setattr(fit_module, "train", no_training)
    with pytest.raises(ValueError, match=r"seed: expected None or an integer in \[0, 2\*\*32 - 1\]"):
        fit_technical(data.counts, data.groups, data.sum_factors, niters=5, nsamples=2, progress=False, seed=seed)


def test_values_beyond_float32_are_rejected_not_turned_into_inf():
    data = synthetic_technical(40, 6, 2, seed=1)
    counts = data.counts.astype(np.float64)
    counts[3, 2] = 1e39
    with pytest.raises(ValueError, match="counts: has values beyond float32's range .*1e\\+39"):
        fit_technical(counts, data.groups, data.sum_factors, niters=5, nsamples=2, progress=False)
    factors = data.sum_factors.astype(np.float64)
    factors[0] = 1e39
    with pytest.raises(ValueError, match="sum_factors: 1 value.* exceed float32's range"):
        fit_technical(data.counts, data.groups, factors, niters=5, nsamples=2, progress=False)

"""bayesdream-ext: fit-technical from each file format, and a small demo run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import io as scipy_io
from scipy import sparse

from bayesDREAM_ext.cli import main
from bayesDREAM_ext.records import TechnicalFit
from bayesDREAM_ext.synthetic import synthetic_technical

FAST = ["--niters", "10", "--nsamples", "5", "--seed", "0", "--quiet"]


@pytest.fixture
def dataset(tmp_path):
    data = synthetic_technical(40, 6, 2, seed=1)
    cells = [f"cell{i}" for i in range(40)]
    meta = pd.DataFrame({"lane": np.where(data.groups == 0, "L1", "L2"), "sf": data.sum_factors}, index=cells)
    meta.iloc[::-1].to_csv(tmp_path / "meta.csv")
    return data, cells, tmp_path


def test_fit_technical_from_a_genes_by_cells_csv_aligns_meta_by_cell_name(dataset, capsys):
    data, cells, tmp = dataset
    pd.DataFrame(data.counts.T, index=[f"g{i}" for i in range(6)], columns=cells).to_csv(tmp / "counts.csv")
    code = main(["fit-technical", "--counts", str(tmp / "counts.csv"), "--meta", str(tmp / "meta.csv"),
                 "--group-col", "lane", "--sum-factor-col", "sf", "--cells-axis", "1", "--out", str(tmp / "fit.pt"), *FAST])
    assert code == 0
    fit = TechnicalFit.load(tmp / "fit.pt")
    assert fit.group_levels == ("L1", "L2")
    assert fit.feature_names == tuple(f"g{i}" for i in range(6))
    assert fit.posterior_samples["log2_alpha_y"].shape == (5, 1, 6)
    assert "Saved" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["npz-dense", "npz-sparse", "mtx"])
def test_fit_technical_from_npz_and_mtx(dataset, fmt):
    data, _, tmp = dataset
    path = tmp / ("counts.mtx" if fmt == "mtx" else "counts.npz")
    if fmt == "npz-dense":
        np.savez(path, counts=data.counts)
    elif fmt == "npz-sparse":
        sparse.save_npz(path, sparse.csr_matrix(data.counts))
    else:
        scipy_io.mmwrite(path, sparse.coo_matrix(data.counts.T))
    meta = pd.read_csv(tmp / "meta.csv", index_col=0).loc[[f"cell{i}" for i in range(40)]]
    meta.to_csv(tmp / "meta_ordered.csv")
    axis = ["--cells-axis", "1"] if fmt == "mtx" else []
    code = main(["fit-technical", "--counts", str(path), "--meta", str(tmp / "meta_ordered.csv"), "--group-col", "lane",
                 "--out", str(tmp / "fit.pt"), "--schedule", "bayesdream", *axis, *FAST])
    assert code == 0
    fit = TechnicalFit.load(tmp / "fit.pt")
    assert fit.posterior_samples["alpha_y_mult"].shape == (5, 2, 6) and fit.schedule == "bayesdream"


def test_bad_arguments_exit_2_with_the_problem(dataset, capsys):
    _, _, tmp = dataset
    (tmp / "counts.txt").write_text("1 2 3")
    with pytest.raises(SystemExit) as exited:
        main(["fit-technical", "--counts", str(tmp / "counts.txt"), "--meta", str(tmp / "meta.csv"), "--group-col", "lane",
              "--out", str(tmp / "fit.pt"), *FAST])
    assert exited.value.code == 2
    assert "unsupported file type '.txt'" in capsys.readouterr().err
    np.savez(tmp / "counts.npz", counts=np.ones((40, 3)))
    with pytest.raises(SystemExit):
        main(["fit-technical", "--counts", str(tmp / "counts.npz"), "--meta", str(tmp / "meta.csv"), "--group-col", "batch",
              "--out", str(tmp / "fit.pt"), *FAST])
    assert "group-col: no column 'batch'" in capsys.readouterr().err


def test_demo_prints_plan_lines_and_the_recovery(capsys):
    code = main(["demo", "--cells", "200", "--features", "40", "--niters", "30", "--nsamples", "50"])
    out = capsys.readouterr().out
    assert code == 0
    assert "[MEMORY] no GPU visible; SVI on the CPU" in out
    assert "[MEMORY] Will use one vectorised batch of 50 on cpu" in out
    assert "Recovered vs true log2 effect of group 1: Pearson r = " in out
    assert "ms/step" in out


def test_plan_prints_the_training_and_predictive_plans_for_an_assumed_machine(capsys):
    seed_size = ["plan", "--cells", "21761", "--features", "31467", "--groups", "2", "--quiet"]
    assert main(seed_size + ["--assume", "cpu=16GiB"]) == 0
    laptop = capsys.readouterr().out
    assert "SVI on cpu (AutoNormal), exact chunked gradient" in laptop and "chunks per step" in laptop
    assert "Predictive: 1000 samples on cpu" in laptop
    assert main(seed_size + ["--assume", "cpu=16GiB,cuda:0=24GB", "--count-dtype", "int16", "--json"]) == 0
    found = __import__("json").loads(capsys.readouterr().out)
    training = found["training"]
    assert training["device"] == "cuda:0" and training["data_dtype"] == "int16" and training["chunk_cells"] < 21761
    assert training["chunks_per_step"] * training["chunk_cells"] >= 21761 and training["device_bytes"] <= training["budget_bytes"]
    assert found["predictive"]["device"] == "cuda:0"


def test_plan_rejects_a_malformed_assumption(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["plan", "--cells", "10", "--features", "10", "--groups", "2", "--assume", "cuda:0"])
    assert exited.value.code == 2 and "assume: expected DEVICE=SIZE" in capsys.readouterr().err

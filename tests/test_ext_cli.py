"""bayesdream-ext: fit-technical from each file format (orientation detected, names kept, NTC
cells chosen), summary and report of the saved fit, the demo, and the plan."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pytest
from scipy import io as scipy_io
from scipy import sparse

from bayesDREAM_ext.cli import main
from bayesDREAM_ext.records import TechnicalFit
from bayesDREAM_ext.synthetic import synthetic_technical

FAST = ["--niters", "10", "--num-samples", "5", "--seed", "0", "--quiet"]
ALL_NTC = "WARNING: No NTC selection given: every cell is taken as an NTC"


@pytest.fixture
def dataset(tmp_path):
    data = synthetic_technical(40, 6, 2, seed=1)
    cells = [f"cell{i}" for i in range(40)]
    target = np.where(np.arange(40) % 4 == 3, "GFI1B", "ntc")
    meta = pd.DataFrame({"lane": np.where(data.groups == 0, "L1", "L2"), "sf": data.sum_factors, "target": target}, index=cells)
    meta.iloc[::-1].to_csv(tmp_path / "meta.csv")
    return data, cells, tmp_path


def tenx_folder(folder, counts, cells, genes):
    """A gzipped Cell Ranger v3 folder of ``counts`` [cells, genes]."""
    folder.mkdir()
    with gzip.open(folder / "matrix.mtx.gz", "wb") as out:
        scipy_io.mmwrite(out, sparse.coo_matrix(counts.T.astype(np.int64)))
    with gzip.open(folder / "features.tsv.gz", "wt") as out:
        out.writelines(f"ENSG{i:05d}\t{gene}\tGene Expression\n" for i, gene in enumerate(genes))
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as out:
        out.writelines(f"{cell}\n" for cell in cells)


def test_a_genes_by_cells_csv_is_detected_and_keeps_the_names(dataset, capsys):
    data, cells, tmp = dataset
    pd.DataFrame(data.counts.T, index=[f"g{i}" for i in range(6)], columns=cells).to_csv(tmp / "counts.csv")
    code = main(["fit-technical", "--counts", str(tmp / "counts.csv"), "--meta", str(tmp / "meta.csv"),
                 "--group-col", "lane", "--sum-factor-col", "sf", "--out", str(tmp / "fit.pt"), *FAST])
    assert code == 0
    fit = TechnicalFit.load(tmp / "fit.pt")
    assert fit.group_levels == ("L1", "L2")
    assert fit.feature_names == tuple(f"g{i}" for i in range(6)) and fit.cell_names == tuple(cells)
    assert "features x cells, transposed" in fit.source
    assert fit.posterior_samples["log2_alpha_y"].shape == (5, 1, 6)
    out, err = capsys.readouterr()
    assert "Saved" in out and "TechnicalFit: negbinom, 6 features" in out
    assert ALL_NTC in err  # shown even with --quiet


@pytest.mark.parametrize("fmt", ["npz-dense", "npz-sparse", "mtx"])
def test_npz_and_mtx_either_way_round(dataset, fmt):
    data, _, tmp = dataset
    path = tmp / ("counts.mtx" if fmt == "mtx" else "counts.npz")
    if fmt == "npz-dense":
        np.savez(path, counts=data.counts)
    elif fmt == "npz-sparse":
        sparse.save_npz(path, sparse.csr_matrix(data.counts))
    else:
        scipy_io.mmwrite(path, sparse.coo_matrix(data.counts.T))  # genes x cells, found from the metadata's 40 rows
    meta = pd.read_csv(tmp / "meta.csv", index_col=0).loc[[f"cell{i}" for i in range(40)]]
    meta.to_csv(tmp / "meta_ordered.csv")
    code = main(["fit-technical", "--counts", str(path), "--meta", str(tmp / "meta_ordered.csv"), "--group-col", "lane",
                 "--out", str(tmp / "fit.pt"), "--schedule", "bayesdream", *FAST])
    assert code == 0
    fit = TechnicalFit.load(tmp / "fit.pt")
    assert fit.posterior_samples["alpha_y_mult"].shape == (5, 2, 6) and fit.schedule == "bayesdream"
    assert fit.cell_names == tuple(meta.index)  # the metadata names cells that the file does not


def test_tenx_folder_with_ntc_cells_then_summary_and_report(dataset, capsys):
    data, cells, tmp = dataset
    genes = [f"GENE{i}" for i in range(6)]
    tenx_folder(tmp / "filtered_feature_bc_matrix", data.counts, cells, genes)
    fit_args = ["fit-technical", "--counts", str(tmp / "filtered_feature_bc_matrix"), "--meta", str(tmp / "meta.csv"),
                "--group-col", "lane", "--ntc-col", "target", "--ntc-value", "ntc", "--out", str(tmp / "fit.pt"), *FAST]
    assert main(fit_args) == 0
    err = capsys.readouterr().err
    assert ALL_NTC not in err
    fit = TechnicalFit.load(tmp / "fit.pt")
    ntc = tuple(cell for i, cell in enumerate(cells) if i % 4 != 3)
    assert fit.cell_names == ntc and fit.feature_names == tuple(genes)
    assert fit.ntc == "NTC cells: 30 of 40 cells have target in ['ntc']"

    assert main(["summary", str(tmp / "fit.pt"), "--csv", str(tmp / "effects.csv"), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "NTC cells: 30 of 40 cells have target in ['ntc']" in out and "Largest 3 of 6 effects" in out
    table = pd.read_csv(tmp / "effects.csv")
    assert list(table["feature"]) == genes and set(table["group"]) == {"L2"}
    np.testing.assert_allclose(table["effect_mean"], fit.posterior_samples["log2_alpha_y"][:, 0].double().mean(0).numpy(), rtol=1e-6)
    assert main(["summary", str(tmp / "fit.pt"), "--json"]) == 0
    assert [row["feature"] for row in json.loads(capsys.readouterr().out)] == genes

    assert main(["report", str(tmp / "fit.pt"), "--out", str(tmp / "report.png")]) == 0
    assert (tmp / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_h5ad_brings_its_own_metadata(dataset):
    anndata = pytest.importorskip("anndata")
    data, cells, tmp = dataset
    obs = pd.read_csv(tmp / "meta.csv", index_col=0).loc[cells]
    adata = anndata.AnnData(X=sparse.csr_matrix(data.counts), obs=obs)
    adata.var_names = [f"G{i}" for i in range(6)]
    adata.write_h5ad(tmp / "cells.h5ad")
    assert main(["fit-technical", "--counts", str(tmp / "cells.h5ad"), "--group-col", "lane", "--ntc-col", "target",
                 "--ntc-value", "ntc", "GFI1B", "--out", str(tmp / "fit.pt"), *FAST]) == 0
    fit = TechnicalFit.load(tmp / "fit.pt")
    assert fit.cell_names == tuple(cells) and fit.feature_names == tuple(f"G{i}" for i in range(6))


def run_fails(capsys, argv):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


def test_bad_input_exits_2_with_the_problem_and_a_hint(dataset, capsys):
    data, _, tmp = dataset
    common = ["--meta", str(tmp / "meta.csv"), "--group-col", "lane", "--out", str(tmp / "fit.pt"), *FAST]
    (tmp / "counts.txt").write_text("1 2 3")
    err = run_fails(capsys, ["fit-technical", "--counts", str(tmp / "counts.txt"), *common])
    assert "cannot read 'counts.txt'; expected a 10x directory" in err
    np.savez(tmp / "counts.npz", counts=data.counts)
    err = run_fails(capsys, ["fit-technical", "--counts", str(tmp / "counts.npz"), *common[:2], "--group-col", "batch", *common[4:]])
    assert "groups: no column 'batch' in the cell metadata (--group-col); it has lane, sf, target" in err
    err = run_fails(capsys, ["fit-technical", "--counts", str(tmp / "counts.npz"), *common, "--ntc-col", "target", "--ntc-value", "NTC"])
    assert "ntc-value: no cell has target in ['NTC']; the column holds 'ntc' (30), 'GFI1B' (10)" in err
    np.savez(tmp / "square.npz", counts=data.counts[:6])
    meta6 = pd.read_csv(tmp / "meta.csv", index_col=0).iloc[:6]
    meta6.to_csv(tmp / "meta6.csv")
    err = run_fails(capsys, ["fit-technical", "--counts", str(tmp / "square.npz"), "--meta", str(tmp / "meta6.csv"), *common[2:]])
    assert "cannot tell which axis of square.npz (6 x 6) holds the cells" in err and "pass --cells-axis 0" in err


@pytest.mark.parametrize("extra, message", [
    (["--ntc-value", "ntc"], "--ntc-value: needs --ntc-col"),
    (["--ntc-col", "target"], "--ntc-col: needs --ntc-value"),
])
def test_half_an_ntc_selection_exits_2_before_reading(dataset, capsys, extra, message):
    _, _, tmp = dataset
    err = run_fails(capsys, ["fit-technical", "--counts", str(tmp / "missing.npz"), "--group-col", "lane",
                             "--out", str(tmp / "fit.pt"), *FAST, *extra])
    assert message in err


def test_report_checks_its_output_before_loading(dataset, capsys):
    _, _, tmp = dataset
    (tmp / "fit.pt").write_bytes(b"not read")
    err = run_fails(capsys, ["report", str(tmp / "fit.pt"), "--out", str(tmp / "r.pdf")])
    assert "--out: expected a path ending in .html or .png" in err
    assert "FIT: no such file" in run_fails(capsys, ["report", str(tmp / "nothing.pt"), "--out", str(tmp / "r.png")])


def test_demo_logs_the_plan_on_stderr_and_the_recovery_on_stdout(capsys):
    code = main(["demo", "--cells", "200", "--features", "40", "--niters", "30", "--num-samples", "50"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "[MEMORY] no GPU visible; SVI on the CPU" in err and "[MEMORY]" not in out
    assert "[MEMORY] Will use one vectorised batch of 50 on cpu" in err
    assert "Recovered vs true log2 effect of group 1: Pearson r = " in out and "ms/step" in out


def test_plan_prints_the_training_and_predictive_plans_for_an_assumed_machine(capsys):
    seed_size = ["plan", "--cells", "21761", "--features", "31467", "--groups", "2"]
    assert main(seed_size + ["--assume", "cpu=16GiB"]) == 0
    laptop, logged = capsys.readouterr()
    assert "SVI on cpu (AutoNormal), exact chunked gradient" in laptop and "chunks per step" in laptop
    assert "Predictive: 1000 samples on cpu" in laptop and "[MEMORY]" not in laptop and "[MEMORY]" in logged
    assert main(seed_size + ["--assume", "cpu=16GiB,cuda:0=24GB", "--count-dtype", "int16", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    training = found["training"]
    assert training["device"] == "cuda:0" and training["data_dtype"] == "int16" and training["chunk_cells"] < 21761
    assert training["chunks_per_step"] * training["chunk_cells"] >= 21761 and training["device_bytes"] <= training["budget_bytes"]
    assert found["predictive"]["device"] == "cuda:0"


def test_plan_rejects_a_malformed_assumption(capsys):
    err = run_fails(capsys, ["plan", "--cells", "10", "--features", "10", "--groups", "2", "--assume", "cuda:0"])
    assert "assume: expected DEVICE=SIZE" in err

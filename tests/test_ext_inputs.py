"""fit_technical's inputs in Python: any file or container through bayesDREAM_ext.readers, the
orientation detected, metadata columns by name, NTC cells chosen (ntc= or ntc_col/ntc_value),
names kept into the saved fit; the fit's repr, summary() and report(); verbose=True and
devicemem.log_to_stderr() show the [MEMORY] plan."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import io as scipy_io
from scipy import sparse

import devicemem
from bayesDREAM_ext.fit import fit_technical
from bayesDREAM_ext.records import TechnicalFit
from bayesDREAM_ext.summary import summary
from bayesDREAM_ext.synthetic import synthetic_technical

FAST = dict(niters=10, nsamples=5, seed=0, progress=False)
N, T = 40, 6


@pytest.fixture(scope="module")
def data():
    return synthetic_technical(N, T, 2, seed=1)


@pytest.fixture
def files(tmp_path, data):
    cells = [f"bc{i}" for i in range(N)]
    meta = pd.DataFrame({"lane": np.where(data.groups == 0, "L1", "L2"), "target": np.where(np.arange(N) % 5 == 0, "MYB", "ntc")},
                        index=pd.Index(cells, name="cell"))
    meta.iloc[::-1].to_csv(tmp_path / "cells.csv")
    folder = tmp_path / "filtered_feature_bc_matrix"
    folder.mkdir()
    scipy_io.mmwrite(folder / "matrix.mtx", sparse.coo_matrix(data.counts.T.astype(np.int64)))
    (folder / "features.tsv").write_text("".join(f"ENSG{i}\tGENE{i}\tGene Expression\n" for i in range(T)))
    (folder / "barcodes.tsv").write_text("".join(f"{cell}\n" for cell in cells))
    return tmp_path, meta


def samples_equal(a: TechnicalFit, b: TechnicalFit) -> bool:
    return all(torch.equal(a.posterior_samples[k].nan_to_num(), b.posterior_samples[k].nan_to_num()) for k in a.posterior_samples)


def test_a_tenx_folder_by_path_with_ntc_cells_from_the_metadata(files, data, tmp_path):
    folder, meta = files
    fit = fit_technical(folder / "filtered_feature_bc_matrix", "lane", meta=folder / "cells.csv", ntc_col="target",
                        ntc_value="ntc", **FAST)
    ntc = tuple(f"bc{i}" for i in range(N) if i % 5)
    assert fit.cell_names == ntc and fit.feature_names == tuple(f"GENE{i}" for i in range(T))
    assert fit.ntc == "NTC cells: 32 of 40 cells have target in ['ntc']" and "10x v3 folder" in fit.source
    keep = np.arange(N) % 5 != 0
    by_hand = fit_technical(data.counts[keep], np.where(data.groups == 0, "L1", "L2")[keep], **FAST)
    assert samples_equal(fit, by_hand)  # the same cells, the same fit
    fit.save(tmp_path / "fit.pt")
    loaded = TechnicalFit.load(tmp_path / "fit.pt")
    assert (loaded.cell_names, loaded.ntc, loaded.source) == (fit.cell_names, fit.ntc, fit.source)


def test_a_genes_by_cells_array_is_turned_by_the_groups_length(data):
    cells_first = fit_technical(data.counts, data.groups, data.sum_factors, **FAST)
    detected = fit_technical(data.counts.T.copy(), data.groups, data.sum_factors, **FAST)
    told = fit_technical(data.counts.T.copy(), data.groups, data.sum_factors, cells_axis=1, **FAST)
    assert samples_equal(cells_first, detected) and samples_equal(cells_first, told)
    assert "columns match the 40 group labels: features x cells, transposed" in detected.source
    square = fit_technical(data.counts[:T], [0, 0, 0, 1, 1, 1], **FAST)  # 6 x 6: nothing tells, so cells x features
    assert "cells x features, the convention for arrays: nothing tells the axes apart" in square.source


def test_an_ntc_mask_or_indices_equal_the_cells_taken_by_hand(data):
    keep = np.arange(N) % 3 != 0
    by_hand = fit_technical(data.counts[keep], data.groups[keep], data.sum_factors[keep], **FAST)
    masked = fit_technical(data.counts, data.groups, data.sum_factors, ntc=keep, **FAST)
    indexed = fit_technical(pd.DataFrame(data.counts), pd.Series(data.groups), data.sum_factors, ntc=np.flatnonzero(keep), **FAST)
    assert samples_equal(by_hand, masked) and samples_equal(by_hand, indexed)
    assert masked.ntc == f"NTC cells: {keep.sum()} of {N} cells (given as ntc=)"


@pytest.mark.parametrize("kwargs, message", [
    (dict(ntc=np.ones(N, bool), ntc_col="target", ntc_value="ntc"), "give either ntc="),
    (dict(ntc_col="target"), "ntc_value: ntc_col was given without it"),
    (dict(ntc_value="ntc"), "ntc_col: ntc_value was given without it"),
    (dict(ntc_col="target", ntc_value="ntc"), "the counts came with none; pass meta="),
    (dict(ntc=np.ones(N - 1, bool)), "one value per cell (40)"),
    (dict(ntc=[3]), "selects 1 cell(s)"),
])
def test_bad_ntc_selections_are_value_errors(data, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        fit_technical(data.counts, data.groups, **kwargs, **FAST)


def test_a_column_name_needs_metadata_that_has_it(data, files):
    with pytest.raises(ValueError, match="groups: no column 'lane' in the cell metadata .--group-col.; the counts came with none"):
        fit_technical(data.counts, "lane", **FAST)
    _, meta = files
    with pytest.raises(ValueError, match="sum_factors: no column 'sf' in the cell metadata .--sum-factor-col.; it has lane, target"):
        fit_technical(data.counts, "lane", "sf", meta=meta.loc[[f"bc{i}" for i in range(N)]].reset_index(drop=True), **FAST)


def test_repr_summary_and_report_of_a_fit(data, tmp_path):
    fit = fit_technical(pd.DataFrame(data.counts, columns=[f"g{i}" for i in range(T)]), data.groups, **FAST)
    text = repr(fit)
    assert text.startswith("TechnicalFit: negbinom, 6 features (6 fitted), groups 0 (baseline), 1")
    assert len(text.splitlines()) <= 8 and "tensor(" not in text and str(fit) == text
    pd.testing.assert_frame_equal(fit.summary(), summary(fit))
    assert list(fit.summary(0.5).columns[6:8]) == ["effect_q25", "effect_q75"]
    assert fit.report(tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_a_file_saved_before_the_new_fields_loads(data, tmp_path):
    import json

    fit = fit_technical(data.counts, data.groups, **FAST)
    fit.save(tmp_path / "fit.pt")
    stored = torch.load(tmp_path / "fit.pt", weights_only=True)
    meta = json.loads(stored["metadata"])
    for key in ("cell_names", "ntc", "source"):
        del meta[key]
    stored["metadata"] = json.dumps(meta)
    torch.save(stored, tmp_path / "old.pt")
    old = TechnicalFit.load(tmp_path / "old.pt")
    assert (old.cell_names, old.ntc, old.source) == (None, None, None)
    assert "TechnicalFit: negbinom" in repr(old)


def test_verbose_shows_the_memory_plan_for_the_call_only(data, capsys):
    logger = logging.getLogger("devicemem")
    level, handlers = logger.level, list(logger.handlers)
    fit_technical(data.counts, data.groups, **FAST)
    assert "[MEMORY]" not in capsys.readouterr().err
    fit_technical(data.counts, data.groups, verbose=True, **FAST)
    err = capsys.readouterr().err
    assert "[MEMORY] Will use one vectorised batch of 5 on cpu" in err and "NTC cells: all 40 cells" in err
    assert (logger.level, logger.handlers) == (level, handlers)


def test_log_to_stderr_once_for_every_call_and_no_line_twice(capsys):
    import pyro
    import pyro.distributions as dist

    def model():
        pyro.sample("x", dist.Normal(torch.zeros(3), 1.0).to_event(1))

    logger = logging.getLogger("devicemem")
    level = logger.level
    try:
        handler = devicemem.log_to_stderr()
        assert devicemem.log_to_stderr() is not handler and logger.handlers.count(handler) == 0  # replaced, not added
        devicemem.Predictive(model, num_samples=4, progress=False, verbose=True)()
        err = capsys.readouterr().err
        planned = [line for line in err.splitlines() if line.startswith("[MEMORY] Will use")]
        assert len(planned) == 1
    finally:
        for added in [h for h in logger.handlers if type(h).__name__ == "_Handler"]:
            logger.removeHandler(added)
        logger.setLevel(level)
    devicemem.Predictive(model, num_samples=4, progress=False)()
    assert "[MEMORY]" not in capsys.readouterr().err

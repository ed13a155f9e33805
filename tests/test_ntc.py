"""select_ntc(): NTC cells from the metadata; errors that say what exists; names end to end."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import io as scipy_io
from scipy import sparse

from bayesDREAM_ext.ntc import ALL_CELLS_NTC, describe_ntc, select_ntc
from bayesDREAM_ext.readers import read_counts
from bayesDREAM_ext.synthetic import synthetic_technical

META = pd.DataFrame(
    {"target": ["ntc", "GFI1B", "ntc", "non-targeting", "MYB", "ntc"], "guide_n": [0, 1, 0, 0, 2, 0]},
    index=[f"c{i}" for i in range(6)],
)


def test_selects_by_one_or_several_values():
    np.testing.assert_array_equal(select_ntc(META, "target", "ntc"), [True, False, True, False, False, True])
    np.testing.assert_array_equal(select_ntc(META, "target", ["ntc", "non-targeting"]), [True, False, True, True, False, True])


def test_values_from_a_command_line_match_a_numeric_column():
    np.testing.assert_array_equal(select_ntc(META, "guide_n", "0"), [True, False, True, True, False, True])


def test_a_missing_column_lists_the_columns():
    with pytest.raises(ValueError, match="no column 'gene' in the cell metadata; it has target, guide_n"):
        select_ntc(META, "gene", "ntc")


def test_a_value_no_cell_has_lists_what_the_column_holds():
    with pytest.raises(ValueError, match=r"no cell has target in \['NTC'\]; the column holds 'ntc' \(3\), "):
        select_ntc(META, "target", "NTC")


def test_a_single_cell_is_not_enough():
    with pytest.raises(ValueError, match="only 1 cell.*at least 2 NTC cells"):
        select_ntc(META, "target", "MYB")


def test_the_message_without_a_selection_names_both_ways():
    assert "every cell is taken as an NTC" in ALL_CELLS_NTC
    assert "--ntc-col COL --ntc-value VALUE" in ALL_CELLS_NTC and "select_ntc(meta, COL, VALUE)" in ALL_CELLS_NTC
    assert describe_ntc(select_ntc(META, "target", "ntc"), "target", "ntc") == "NTC cells: 3 of 6 cells have target in ['ntc']"


def test_names_end_to_end_from_a_tenx_folder_to_the_fit(tmp_path):
    """10x folder -> NTC cells by metadata -> fit_technical: the fit keeps the gene names."""
    from bayesDREAM_ext.fit import fit_technical

    data = synthetic_technical(30, 4, 2, seed=2)
    folder = tmp_path / "filtered_feature_bc_matrix"
    folder.mkdir()
    scipy_io.mmwrite(folder / "matrix.mtx", sparse.coo_matrix(data.counts.T.astype(np.int64)))
    (folder / "features.tsv").write_text("".join(f"ENSG{i}\tGENE{i}\tGene Expression\n" for i in range(4)))
    (folder / "barcodes.tsv").write_text("".join(f"bc{i}\n" for i in range(30)))
    meta = pd.DataFrame({"lane": data.groups, "target": np.where(np.arange(30) % 5 == 0, "MYB", "ntc")},
                        index=[f"bc{i}" for i in range(30)]).iloc[::-1]
    record = read_counts(folder, meta=meta)
    ntc = record.take_cells(select_ntc(record.cell_meta, "target", "ntc"))
    assert ntc.shape == (24, 4) and ntc.feature_names == ("GENE0", "GENE1", "GENE2", "GENE3")
    frame = pd.DataFrame.sparse.from_spmatrix(ntc.counts, index=list(ntc.cell_names), columns=list(ntc.feature_names))
    fit = fit_technical(frame, ntc.cell_meta["lane"], niters=5, nsamples=3, seed=0, progress=False)
    assert fit.feature_names == ntc.feature_names
    assert fit.posterior_samples["log2_alpha_y"].shape == (3, 1, 4)

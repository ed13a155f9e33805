"""read_counts(): every format on small files written here; names, orientation, gz, metadata."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import io as scipy_io
from scipy import sparse

from bayesDREAM_ext.readers import MissingDependencyError, detect_cells_axis, read_counts

CELLS, GENES = 9, 5
RNG = np.random.default_rng(0)
COUNTS = RNG.poisson(2.0, size=(CELLS, GENES)).astype(np.int64)  # cells x genes, the truth
BARCODES = [f"AAAC{i:02d}-1" for i in range(CELLS)]
GENE_IDS = [f"ENSG{i:04d}" for i in range(GENES)]
SYMBOLS = ["CD3E", "MS4A1", "GFI1B", "NKG7", "MS4A1"]  # a repeated symbol, as in real references


def _write(path: Path, text: str, gz: bool) -> None:
    with (gzip.open(path, "wt") if gz else open(path, "w")) as out:
        out.write(text)


def _tenx_v3(folder: Path, gz: bool = True, guides: int = 0) -> Path:
    """Cell Ranger v3 files: features x cells matrix, features.tsv with types, barcodes; with
    ``guides`` extra CRISPR Guide Capture features after the genes."""
    folder.mkdir(parents=True)
    extra = RNG.poisson(5.0, size=(CELLS, guides))
    matrix = sparse.coo_matrix(np.hstack([COUNTS, extra]).T)
    suffix = ".gz" if gz else ""
    scipy_io.mmwrite(folder / "matrix.mtx", matrix)
    if gz:
        with open(folder / "matrix.mtx", "rb") as source, gzip.open(folder / "matrix.mtx.gz", "wb") as target:
            target.write(source.read())
        (folder / "matrix.mtx").unlink()
    rows = [f"{i}\t{s}\tGene Expression" for i, s in zip(GENE_IDS, SYMBOLS)]
    rows += [f"guide{j}\tguide{j}\tCRISPR Guide Capture" for j in range(guides)]
    _write(folder / f"features.tsv{suffix}", "\n".join(rows) + "\n", gz)
    _write(folder / f"barcodes.tsv{suffix}", "\n".join(BARCODES) + "\n", gz)
    return folder


def _assert_cells_first(record, names: bool = True) -> None:
    assert record.shape == (CELLS, GENES)
    dense = record.counts.toarray() if sparse.issparse(record.counts) else record.counts
    np.testing.assert_array_equal(dense, COUNTS)
    if names:
        assert record.cell_names == tuple(BARCODES)
        assert len(record.cell_meta) == CELLS and list(record.cell_meta.index) == BARCODES


def test_tenx_v3_folder_gzipped_found_from_the_run_folder(tmp_path):
    _tenx_v3(tmp_path / "run" / "outs" / "filtered_feature_bc_matrix", guides=3)
    record = read_counts(tmp_path / "run")
    _assert_cells_first(record)
    assert isinstance(record.counts, sparse.csr_matrix)
    assert record.feature_names == ("CD3E", "MS4A1", "GFI1B", "NKG7", "MS4A1-1")
    assert list(record.feature_meta["id"]) == GENE_IDS
    assert record.cells_axis == 1 and "10x v3 folder: features x cells" in record.orientation


def test_tenx_feature_type_none_keeps_the_guide_features(tmp_path):
    folder = _tenx_v3(tmp_path / "filtered_feature_bc_matrix", guides=2)
    record = read_counts(folder, feature_type=None)
    assert record.shape == (CELLS, GENES + 2)
    assert record.feature_names[-2:] == ("guide0", "guide1")
    with pytest.raises(ValueError, match="no 'Antibody Capture' features.*CRISPR Guide Capture, Gene Expression"):
        read_counts(folder, feature_type="Antibody Capture")


def test_the_matrix_file_inside_a_tenx_folder_reads_the_folder(tmp_path):
    folder = _tenx_v3(tmp_path / "m")
    _assert_cells_first(read_counts(folder / "matrix.mtx.gz"))


def test_tenx_v2_folder_with_genes_tsv(tmp_path):
    folder = tmp_path / "outs" / "filtered_gene_bc_matrices" / "hg19"
    folder.mkdir(parents=True)
    scipy_io.mmwrite(folder / "matrix.mtx", sparse.coo_matrix(COUNTS.T))
    _write(folder / "genes.tsv", "".join(f"{i}\t{s}\n" for i, s in zip(GENE_IDS, SYMBOLS)), gz=False)
    _write(folder / "barcodes.tsv", "\n".join(BARCODES) + "\n", gz=False)
    record = read_counts(tmp_path)
    _assert_cells_first(record)
    assert "10x v2 folder" in record.orientation and record.feature_names[0] == "CD3E"


def test_tenx_folder_problems_are_named(tmp_path):
    folder = _tenx_v3(tmp_path / "m")
    (folder / "barcodes.tsv.gz").unlink()
    with pytest.raises(ValueError, match=r"has no barcodes.tsv\[.gz\]"):
        read_counts(folder)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="is not a 10x directory.*notes.txt"):
        read_counts(tmp_path / "empty")
    with pytest.raises(ValueError, match="holds cells on axis 1 by its format"):
        read_counts(_tenx_v3(tmp_path / "n"), cells_axis=0)


def _tenx_h5(path: Path, version: int) -> Path:
    h5py = pytest.importorskip("h5py")
    matrix = sparse.csc_matrix(COUNTS.T)
    with h5py.File(path, "w") as store:
        group = store.create_group("matrix" if version == 3 else "GRCh38")
        for name, values in (("data", matrix.data), ("indices", matrix.indices), ("indptr", matrix.indptr), ("shape", matrix.shape)):
            group.create_dataset(name, data=np.asarray(values))
        group.create_dataset("barcodes", data=np.array(BARCODES, dtype="S"))
        if version == 3:
            features = group.create_group("features")
            features.create_dataset("id", data=np.array(GENE_IDS, dtype="S"))
            features.create_dataset("name", data=np.array(SYMBOLS, dtype="S"))
            features.create_dataset("feature_type", data=np.array(["Gene Expression"] * GENES, dtype="S"))
        else:
            group.create_dataset("genes", data=np.array(GENE_IDS, dtype="S"))
            group.create_dataset("gene_names", data=np.array(SYMBOLS, dtype="S"))
    return path


@pytest.mark.parametrize("version", [3, 2])
def test_tenx_h5(tmp_path, version):
    record = read_counts(_tenx_h5(tmp_path / "filtered_feature_bc_matrix.h5", version))
    _assert_cells_first(record)
    assert isinstance(record.counts, sparse.csr_matrix)
    assert record.feature_names[-1] == "MS4A1-1" and f"10x v{version} .h5" in record.orientation


def test_tenx_h5_found_in_an_outs_folder(tmp_path):
    (tmp_path / "outs").mkdir()
    _tenx_h5(tmp_path / "outs" / "filtered_feature_bc_matrix.h5", 3)
    _assert_cells_first(read_counts(tmp_path))


def test_h5ad_x_layer_raw_and_obs(tmp_path):
    anndata = pytest.importorskip("anndata")
    obs = pd.DataFrame({"target": ["ntc", "GFI1B", "ntc"] * 3, "lane": ["L1"] * 4 + ["L2"] * 5}, index=BARCODES)
    adata = anndata.AnnData(X=sparse.csr_matrix(np.log1p(COUNTS).astype(np.float32)), obs=obs,
                            var=pd.DataFrame(index=GENE_IDS), layers={"counts": sparse.csr_matrix(COUNTS)})
    adata.raw = anndata.AnnData(X=sparse.csr_matrix(COUNTS), obs=obs, var=pd.DataFrame(index=GENE_IDS))
    adata.write_h5ad(tmp_path / "cells.h5ad")
    record = read_counts(tmp_path / "cells.h5ad", layer="counts")
    _assert_cells_first(record)
    assert record.feature_names == tuple(GENE_IDS)
    assert list(record.cell_meta["target"]) == list(obs["target"]) and "obs x var" in record.orientation
    _assert_cells_first(read_counts(tmp_path / "cells.h5ad", layer="raw"))
    assert read_counts(tmp_path / "cells.h5ad").counts.dtype == np.float32
    with pytest.raises(ValueError, match="no layer 'spliced'.*counts"):
        read_counts(tmp_path / "cells.h5ad", layer="spliced")
    with pytest.raises(ValueError, match="holds cells on axis 0"):
        read_counts(tmp_path / "cells.h5ad", cells_axis=1)


def _meta(order=None) -> pd.DataFrame:
    frame = pd.DataFrame({"target": ["ntc", "GFI1B", "ntc"] * 3, "lane": ["L1"] * 4 + ["L2"] * 5}, index=BARCODES)
    return frame if order is None else frame.iloc[order]


@pytest.mark.parametrize("gz", [False, True])
def test_mtx_orientation_from_the_metadata(tmp_path, gz):
    path = tmp_path / ("genes_by_cells.mtx" + (".gz" if gz else ""))
    scipy_io.mmwrite(tmp_path / "genes_by_cells.mtx", sparse.coo_matrix(COUNTS.T))
    if gz:
        with open(tmp_path / "genes_by_cells.mtx", "rb") as source, gzip.open(path, "wb") as target:
            target.write(source.read())
    record = read_counts(path, meta=_meta())
    _assert_cells_first(record, names=False)
    assert record.cells_axis == 1 and "the metadata's 9 rows" in record.orientation
    assert list(record.cell_meta["target"]) == list(_meta()["target"])


def test_mtx_orientation_from_names_files_and_when_nothing_tells(tmp_path):
    scipy_io.mmwrite(tmp_path / "m.mtx", sparse.coo_matrix(COUNTS.T))
    _write(tmp_path / "barcodes.txt", "\n".join(BARCODES) + "\n", gz=False)
    record = read_counts(tmp_path / "m.mtx", cell_names=tmp_path / "barcodes.txt", feature_names=SYMBOLS)
    _assert_cells_first(record)
    assert record.feature_names == tuple(SYMBOLS) and "the 9 cell names" in record.orientation
    with pytest.raises(ValueError, match="cannot tell which axis.*--cells-axis 0 .cells x features. or 1"):
        read_counts(tmp_path / "m.mtx")
    given = read_counts(tmp_path / "m.mtx", cells_axis=1)
    _assert_cells_first(given, names=False)
    assert given.orientation.startswith("given: cells_axis=1")
    with pytest.raises(ValueError, match="cell_names: 5 names, but the counts have 9 cells"):
        read_counts(tmp_path / "m.mtx", cells_axis=1, cell_names=SYMBOLS)


def test_a_square_matrix_is_ambiguous_without_names(tmp_path):
    with pytest.raises(ValueError, match="cannot tell.*the metadata's 4 rows.*--cells-axis"):
        detect_cells_axis((4, 4), meta=pd.DataFrame(index=list("abcd")), source="x.mtx")


@pytest.mark.parametrize("kind", ["sparse", "dense"])
def test_npz(tmp_path, kind):
    path = tmp_path / "counts.npz"
    if kind == "sparse":
        sparse.save_npz(path, sparse.csr_array(COUNTS))
    else:
        np.savez(path, counts=COUNTS)
    record = read_counts(path, meta=_meta())
    _assert_cells_first(record, names=False)
    assert record.cells_axis == 0
    assert isinstance(record.counts, sparse.csr_matrix if kind == "sparse" else np.ndarray)


@pytest.mark.parametrize("name, sep", [("counts.csv", ","), ("counts.tsv.gz", "\t")])
def test_delimited_genes_by_cells_oriented_by_the_metadata_names(tmp_path, name, sep):
    pd.DataFrame(COUNTS.T, index=SYMBOLS[:4] + ["X"], columns=BARCODES).to_csv(tmp_path / name, sep=sep)
    shuffled = _meta(order=[3, 1, 0, 2, 8, 7, 6, 5, 4])
    record = read_counts(tmp_path / name, meta=shuffled)
    _assert_cells_first(record)
    assert record.cells_axis == 1 and "columns match the metadata's cell names" in record.orientation
    assert list(record.cell_meta["target"]) == list(_meta()["target"])  # aligned by name, not by row


def test_metadata_alignment_problems(tmp_path):
    pd.DataFrame(COUNTS, index=BARCODES, columns=SYMBOLS[:4] + ["X"]).to_csv(tmp_path / "c.csv")
    with pytest.raises(ValueError, match="1 of the 9 cells of the counts are not in it, e.g. 'AAAC08-1'"):
        read_counts(tmp_path / "c.csv", meta=_meta().iloc[:8], cells_axis=0)
    bigger = pd.concat([_meta(), pd.DataFrame({"target": ["ntc"], "lane": ["L9"]}, index=["other"])])
    record = read_counts(tmp_path / "c.csv", meta=bigger)
    assert len(record.cell_meta) == CELLS and record.cells_axis == 0
    _meta().to_csv(tmp_path / "meta.tsv", sep="\t")
    assert list(read_counts(tmp_path / "c.csv", meta=tmp_path / "meta.tsv").cell_meta["lane"]) == list(_meta()["lane"])


def test_non_numeric_csv_and_unknown_files(tmp_path):
    pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}, index=["c1", "c2"]).to_csv(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match=r"non-numeric columns \(b\)"):
        read_counts(tmp_path / "bad.csv", cells_axis=0)
    (tmp_path / "counts.loom").write_text("x")
    with pytest.raises(ValueError, match="cannot read 'counts.loom'.*10x directory"):
        read_counts(tmp_path / "counts.loom")
    with pytest.raises(ValueError, match="no such file"):
        read_counts(tmp_path / "missing.mtx")


def test_take_cells_keeps_names_and_metadata_in_step(tmp_path):
    record = read_counts(_tenx_v3(tmp_path / "m"), meta=_meta())
    mask = (record.cell_meta["target"] == "ntc").to_numpy()
    subset = record.take_cells(mask)
    assert subset.shape == (int(mask.sum()), GENES)
    assert subset.cell_names == tuple(np.array(BARCODES)[mask])
    np.testing.assert_array_equal(subset.counts.toarray(), COUNTS[mask])
    assert (subset.cell_meta["target"] == "ntc").all()


@pytest.mark.parametrize("module, make", [("h5py", lambda p: p / "x.h5"), ("anndata", lambda p: p / "x.h5ad")])
def test_a_missing_library_names_the_install_command(tmp_path, monkeypatch, module, make):
    path = make(tmp_path)
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingDependencyError, match=rf'needs {module}.*pip install -e "\.\[io\]"'):
        read_counts(path)

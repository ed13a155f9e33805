"""A Cell Ranger-like example to try ``bayesdream-ext`` on: synthetic counts with known technical
effects, written as a gzipped 10x v3 run folder, with a cell metadata table and the truth.

    python -m bench.tenx_example OUT [--cells 5000] [--genes 2000] [--ntc-fraction 0.6] [--seed 7]

writes ``OUT/run1/outs/filtered_feature_bc_matrix/`` (matrix.mtx.gz, features.tsv.gz,
barcodes.tsv.gz), ``OUT/cells.csv`` (barcode, ``lane``: the technical group, ``target``: "ntc"
for about ``--ntc-fraction`` of the cells, else a gene) and ``OUT/truth.csv`` (each gene's true
log2 effect of lane2 against lane1). Then, for instance:

    bayesdream-ext fit-technical --counts OUT/run1 --meta OUT/cells.csv --group-col lane \\
        --ntc-col target --ntc-value ntc --out OUT/fit.pt
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from scipy import io, sparse

from bayesDREAM_ext.synthetic import synthetic_technical


def write_example(out: Path, cells: int, genes: int, ntc_fraction: float, seed: int) -> Path:
    """Write the run folder, cells.csv and truth.csv under ``out``; returns the matrix folder."""
    if not 2 <= cells <= 4**8:
        raise ValueError(f"cells: expected 2 .. {4**8}; got {cells}")
    data = synthetic_technical(cells, genes, 2, seed=seed)
    folder = out / "run1" / "outs" / "filtered_feature_bc_matrix"
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / "matrix.mtx.gz", "wb", compresslevel=1) as target:
        io.mmwrite(target, sparse.coo_matrix(data.counts.T.astype(np.int64)))
    symbols = [f"GENE{i}" for i in range(genes)]
    with gzip.open(folder / "features.tsv.gz", "wt") as target:
        target.writelines(f"ENSG{i:011d}\t{symbol}\tGene Expression\n" for i, symbol in enumerate(symbols))
    spread = np.random.default_rng(seed).permutation(4**8)[:cells] * 4**8 + np.arange(cells)  # unique 16-base codes
    barcodes = [np.base_repr(code, 4).rjust(16, "0").translate(str.maketrans("0123", "ACGT")) + "-1" for code in spread]
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as target:
        target.writelines(f"{barcode}\n" for barcode in barcodes)
    rng = np.random.default_rng(seed + 1)
    targets = np.where(rng.random(cells) < ntc_fraction, "ntc", rng.choice(["GFI1B", "MYB", "NFE2"], cells))
    pd.DataFrame({"lane": np.where(data.groups == 0, "lane1", "lane2"), "target": targets},
                 index=pd.Index(barcodes, name="barcode")).to_csv(out / "cells.csv")
    pd.DataFrame({"feature": symbols, "log2_effect": data.log2_alpha_true[0]}).to_csv(out / "truth.csv", index=False)
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tenx_example", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write into")
    parser.add_argument("--cells", type=int, default=5000, help="cells")
    parser.add_argument("--genes", type=int, default=2000, help="genes")
    parser.add_argument("--ntc-fraction", type=float, default=0.6, help="share of cells whose target is ntc")
    parser.add_argument("--seed", type=int, default=7, help="seed of the synthetic data")
    args = parser.parse_args(argv)
    folder = write_example(args.out, args.cells, args.genes, args.ntc_fraction, args.seed)
    print(f"wrote {folder}, {args.out / 'cells.csv'} and {args.out / 'truth.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

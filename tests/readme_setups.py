"""Small data for the README's snippets (``<!-- readme-test: setup NAME -->``).

Each function runs in the snippet's own temporary folder: it may write the files the snippet
reads there, and returns the names a python snippet uses. Keep them tiny: they run in the
test-suite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

CELLS, FEATURES = 60, 12


def technical() -> dict[str, Any]:
    """``counts`` [cells, features], ``groups`` and ``sum_factors`` of a small synthetic
    dataset; also counts.mtx (features x cells, as bayesDREAM stores them) and cells.csv
    (cell names, ``cell_line``, ``sum_factor``, ``target`` with 'ntc' for two thirds)."""
    import pandas as pd
    from scipy import io, sparse

    from bayesDREAM_ext.synthetic import synthetic_technical

    data = synthetic_technical(CELLS, FEATURES, 2, seed=0)
    names = [f"cell{i}" for i in range(CELLS)]
    io.mmwrite("counts.mtx", sparse.coo_matrix(data.counts.T))
    pd.DataFrame(
        {"cell_line": np.where(data.groups == 0, "K562", "HEK293"), "sum_factor": data.sum_factors,
         "target": np.where(np.arange(CELLS) % 3 == 2, "GFI1B", "ntc")},
        index=pd.Index(names, name="cell"),
    ).to_csv("cells.csv")
    return {"counts": data.counts, "groups": data.groups, "sum_factors": data.sum_factors}


def tenx() -> dict[str, Any]:
    """A Cell Ranger v3 folder ``filtered_feature_bc_matrix/`` (gzipped) and cells.csv."""
    import gzip

    technical()
    folder = Path("filtered_feature_bc_matrix")
    folder.mkdir()
    with open("counts.mtx", "rb") as source, gzip.open(folder / "matrix.mtx.gz", "wb") as target:
        target.write(source.read())
    with gzip.open(folder / "features.tsv.gz", "wt") as out:
        out.writelines(f"ENSG{i:011d}\tGENE{i}\tGene Expression\n" for i in range(FEATURES))
    with gzip.open(folder / "barcodes.tsv.gz", "wt") as out:
        out.writelines(f"cell{i}\n" for i in range(CELLS))
    return {}


def pyro_model() -> dict[str, Any]:
    """A small Pyro ``model`` with an AutoNormal ``guide`` trained a few steps, its
    ``model_args`` / ``model_kwargs``, ``run_code_that_calls_pyro_infer_Predictive``, and
    ``devicemem`` imported."""
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal
    from pyro.optim import Adam

    def model(y: torch.Tensor | None = None) -> None:
        loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        with pyro.plate("data", 20):
            pyro.sample("y", dist.Normal(loc, 1.0), obs=y)

    y = torch.randn(20) + 3.0
    guide = AutoNormal(model)
    svi = SVI(model, guide, Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(20):
        svi.step(y)

    def run_code_that_calls_pyro_infer_Predictive() -> dict[str, torch.Tensor]:
        return pyro.infer.Predictive(model, guide=guide, num_samples=10)(y)

    import devicemem

    return {"model": model, "guide": guide, "model_args": (y,), "model_kwargs": {}, "devicemem": devicemem,
            "run_code_that_calls_pyro_infer_Predictive": run_code_that_calls_pyro_infer_Predictive}

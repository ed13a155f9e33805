"""Benchmark data sets: synthetic technical-model data generated once per run, loaded by children.

Generating counts is slow at large sizes and is not what a benchmark measures, so each data set
is written once to a cache file (by a child process: ``python -m bench.data``, which keeps the
harness process small) and every configuration's child only loads it, outside its timed region.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DataSpec:
    """Shape of a synthetic technical data set: N cells, T features, C technical groups."""

    n_cells: int
    n_features: int
    n_groups: int = 2
    seed: int = 0

    @property
    def key(self) -> str:
        return f"N{self.n_cells}-T{self.n_features}-C{self.n_groups}-s{self.seed}"


def write_dataset(spec: DataSpec, path: Path) -> None:
    """Draw the counts, compute mu_ntc's prior, and save every model argument to ``path``."""
    import torch

    from bayesDREAM_ext.model import mu_ntc_prior
    from bayesDREAM_ext.synthetic import synthetic_technical

    data = synthetic_technical(spec.n_cells, spec.n_features, spec.n_groups, seed=spec.seed)
    counts = torch.from_numpy(data.counts)
    groups = torch.from_numpy(data.groups)
    sum_factors = torch.from_numpy(data.sum_factors)
    mean, sd = mu_ntc_prior(counts, groups, sum_factors)
    tmp = path.with_suffix(".tmp")
    torch.save({"counts": counts, "groups": groups, "sum_factors": sum_factors,
                "mu_prior_mean": mean, "mu_prior_sd": sd, "n_groups": spec.n_groups}, tmp)
    tmp.rename(path)


def load_dataset(path: str | Path) -> dict[str, Any]:
    """The tensors ``write_dataset`` saved (counts, groups, sum_factors, mu prior, n_groups)."""
    import torch

    return torch.load(path, weights_only=True)


if __name__ == "__main__":
    n_cells, n_features, n_groups, seed = (int(x) for x in sys.argv[1:5])
    write_dataset(DataSpec(n_cells, n_features, n_groups, seed), Path(sys.argv[5]))

"""Child process for the real-cap test: posterior predictive of a model with per-cell latents
and a Normal observation site [N, T] (x=None), by devicemem (streaming mean/var of the
observation, auto-planned on the host) or by plain ``pyro.infer.Predictive(parallel=True)``.

Usage: python -m tests.cap_workload {devicemem,pyro} N T S
Prints "ok <largest measured batch peak in bytes> <batch sizes>" when devicemem succeeds.
"""

from __future__ import annotations

import sys

import pyro
import torch
from pyro.infer.autoguide import AutoNormal

from tests.runner_fakes import cell_model


def main(argv: list[str]) -> None:
    mode, n_cells, n_features, num_samples = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    pyro.set_rng_seed(0)
    guide = AutoNormal(cell_model)
    guide(torch.randn(n_cells, n_features), n_cells, n_features)
    args = (None, n_cells, n_features)
    if mode == "pyro":
        samples = pyro.infer.Predictive(cell_model, guide=guide, num_samples=num_samples, parallel=True)(*args)
        print("ok", tuple(samples["x"].shape))
        return
    import devicemem

    runner = devicemem.Predictive(
        cell_model, guide=guide, num_samples=num_samples, device="cpu", seed=0, progress=False,
        reduce={"x": ("mean", "var")},
    )
    result = runner(*args)
    assert result["x:mean"].shape == (n_cells, n_features)
    assert result["z"].shape == (num_samples, n_cells, 1)
    assert sum(row.size for row in runner.report) == num_samples
    peak = max(row.peak_bytes or 0 for row in runner.report)
    print("ok", peak, ",".join(str(row.size) for row in runner.report))


if __name__ == "__main__":
    main(sys.argv[1:])

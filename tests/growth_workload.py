"""Child process for the super-linear growth test: a model whose vectorised batch of B samples
builds a [B, B, N, T] intermediate (bayesDREAM's trans model does, through ``phi.unsqueeze(-2)``
under the sample plate), drawn by devicemem with the planner's own batch size.

Usage: python -m tests.growth_workload {devicemem,pyro} N T S
devicemem prints "ok <plan's batch size> <its predicted peak> <the working bytes measured for a
batch of that size> <batch sizes>"; pyro (one ``parallel=True`` call) prints "ok".
"""

from __future__ import annotations

import sys

import pyro
import pyro.distributions as dist
import torch


def growth_model(n_cells: int, n_features: int) -> torch.Tensor:
    """``phi.unsqueeze(-2) * z`` is [1, N, T] unvectorised and [B, B, N, T] under a plate of B:
    the sites keep Pyro's shapes, the memory grows with B squared."""
    with pyro.plate("features", n_features, dim=-1):
        phi = pyro.sample("phi", dist.Normal(0.0, 1.0))
    with pyro.plate("cells", n_cells, dim=-2):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
    rate = (phi.unsqueeze(-2) * z).exp().mean(0)
    with pyro.plate("cells_y", n_cells, dim=-2), pyro.plate("features_y", n_features, dim=-1):
        return pyro.sample("y", dist.Normal(rate.log(), 1.0))


def main(argv: list[str]) -> None:
    mode, n_cells, n_features, num_samples = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    pyro.set_rng_seed(0)
    if mode == "pyro":
        pyro.infer.Predictive(growth_model, num_samples=num_samples, parallel=True, return_sites=["phi"])(
            n_cells, n_features
        )
        print("ok")
        return
    import devicemem

    runner = devicemem.Predictive(
        growth_model, num_samples=num_samples, parallel=True, device="cpu", seed=0, progress=False,
        return_sites=["phi"], reduce={"phi": ("mean",)},
    )
    runner(n_cells, n_features)
    plan = runner.plan
    at_plan = max(row.working_bytes or 0 for row in runner.report if row.size == plan.batch_size)
    print("ok", plan.batch_size, plan.predicted_peak_bytes, at_plan, ",".join(str(row.size) for row in runner.report))


if __name__ == "__main__":
    main(sys.argv[1:])

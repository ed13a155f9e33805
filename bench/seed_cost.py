"""Cost of per-sample latent seeds (issue 15): a seeded Predictive draws each sample's
closed-form latents from its own generator; unseeded, one ``normal_`` per site fills the batch.

    python -m bench.seed_cost [--features T] [--samples S]

Params-only technical model (AutoNormal latents and deterministic sites, no likelihood), one
vectorised batch of S on the CPU, one torch thread; seeded and unseeded calls interleaved,
median of 5 each; prints the ratio seeded / unseeded.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import torch
from pyro.infer.autoguide import AutoNormal

from bayesDREAM_ext.data import prepare_technical
from bayesDREAM_ext.model import build_model_inputs
from bayesDREAM_ext.synthetic import synthetic_technical
from devicemem.predictive import Predictive
from tests.runner_fakes import make_plan

SITES = ["log2_alpha_y", "alpha_y_mul", "o_y", "mu_ntc", "beta_o"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--features", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=1000)
    options = parser.parse_args()
    torch.set_num_threads(1)
    data = synthetic_technical(500, options.features, 3, seed=0)
    inputs = build_model_inputs(prepare_technical(data.counts, data.groups, data.sum_factors))
    kwargs = inputs.params_only()
    pyro.clear_param_store()
    guide = AutoNormal(inputs.model)
    guide(**kwargs)
    plan = make_plan(options.samples, options.samples)
    times: dict[str, list[float]] = {"seeded": [], "unseeded": []}
    for _ in range(6):
        for label, seed in (("seeded", 0), ("unseeded", None)):
            runner = Predictive(inputs.model, guide=guide, num_samples=options.samples, return_sites=SITES,
                                seed=seed, plan=plan, progress=False)
            began = time.perf_counter()
            runner(**kwargs)
            times[label].append(time.perf_counter() - began)
    seeded, unseeded = (statistics.median(times[k][1:]) for k in ("seeded", "unseeded"))
    print(f"T={options.features} S={options.samples}: seeded {seeded:.3f} s, unseeded {unseeded:.3f} s, "
          f"ratio {seeded / unseeded:.2f}")


if __name__ == "__main__":
    main()

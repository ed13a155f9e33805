"""Child process for the real-cap SVI test: fit_technical on the CPU with data written by the
parent, then print one JSON line: the training plan, the output shapes and the recovered
effects' correlation with the truth.

    python tests/ext_fit_child.py DATA.npz NITERS
"""

import json
import sys

import numpy as np
import torch

from bayesDREAM_ext.fit import fit_technical

path, niters = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(2)
with np.load(path) as stored:
    counts, groups, factors, truth = stored["counts"], stored["groups"], stored["sum_factors"], stored["truth"]
fit = fit_technical(counts.astype(np.float32, copy=False), groups, factors, device="cpu", niters=niters, nsamples=20, seed=0, progress=False)
recovered = fit.posterior_samples["log2_alpha_y"].mean(dim=0)[0].numpy()
plan = fit.svi_plan
print(json.dumps({
    "chunk_cells": plan.chunk_cells, "chunks_per_step": plan.chunks_per_step, "budget": plan.budget_bytes,
    "predicted": plan.predicted_peak_bytes, "measured": plan.measured_peak_bytes, "steps": len(fit.losses),
    "shapes": {name: list(value.shape) for name, value in fit.posterior_samples.items()},
    "r": float(np.corrcoef(recovered, truth[0])[0, 1]),
}))

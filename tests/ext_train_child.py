"""Child process for the training-memory test: load data written by the parent, run ``steps``
SVI steps on the CPU and print the planned footprint and the peak the CPU backend measured
over the first step (bytes above the RSS when training started).

    python tests/ext_train_child.py DATA.npz DISTRIBUTION GUIDE STEPS
"""

import sys

import numpy as np
import torch

from bayesDREAM_ext.data import prepare_technical
from bayesDREAM_ext.model import build_model_inputs
from bayesDREAM_ext.memory import plan_training
from bayesDREAM_ext.training import SVIOptions, train

path, distribution, guide, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(1)
with np.load(path) as stored:
    denominator = stored["denominator"] if "denominator" in stored.files else None
    data = prepare_technical(stored["counts"], stored["groups"], distribution=distribution, denominator=denominator)
inputs = build_model_inputs(data)
plan = plan_training(
    data.n_cells, data.n_features, data.n_groups, data.n_categories, distribution=distribution, device="cpu",
    guide=guide, safety_factor=1.0,
)
result = train(inputs, plan, SVIOptions(niters=steps, lr=1e-3, tolerance=0.0, alpha_ewma=0.05, progress=False))
print(result.plan.predicted_peak_bytes, result.plan.measured_peak_bytes)

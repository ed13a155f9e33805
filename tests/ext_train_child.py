"""Child process for the training-memory test: fit the technical model's SVI on synthetic data
for ``steps`` steps (0 = only load and prepare the data), then exit; the parent measures the
peak RSS with devicemem.testing.run_child.

    python tests/ext_train_child.py DISTRIBUTION N T C K GUIDE STEPS
"""

import sys

import torch

from bayesDREAM_ext.data import prepare_technical
from bayesDREAM_ext.model import build_model_inputs
from bayesDREAM_ext.synthetic import synthetic_data
from bayesDREAM_ext.training import plan_training, train

distribution, guide = sys.argv[1], sys.argv[6]
n_cells, n_features, n_groups, n_categories, steps = map(int, sys.argv[2:6] + sys.argv[7:8])
torch.set_num_threads(1)
synthetic = synthetic_data(distribution, n_cells, n_features, n_groups, n_categories=n_categories, seed=0)
data = prepare_technical(synthetic.counts, synthetic.groups, distribution=distribution, denominator=synthetic.denominator)
del synthetic
inputs = build_model_inputs(data)
if steps:
    plan = plan_training(data.n_cells, data.n_features, data.n_groups, data.n_categories, distribution=distribution, device="cpu", guide=guide, safety_factor=1.0)
    result = train(inputs, plan, niters=steps, lr=1e-3, tolerance=0.0, alpha_ewma=0.05, progress=False)
    print(result.plan.predicted_peak_bytes, result.plan.measured_peak_bytes)

"""Child process for the cross-process seed test: a seeded Predictive under a ``max_memory``
that forces several batches, planned from a probe in this fresh process; prints the plan's
batch size and a digest of the returned latent sites.

    python tests/seed_child.py
"""

import hashlib

import torch

from devicemem.predictive import Predictive
from tests.runner_fakes import technical_problem
from bayesDREAM_ext.model import technical_model

torch.set_num_threads(1)
args, guide = technical_problem(n_cells=300, n_features=100, n_groups=3)
runner = Predictive(technical_model, guide=guide, num_samples=200, seed=0, max_memory="cpu=60MB",
                    return_sites=["log2_alpha_y", "o_y", "mu_ntc", "beta_o", "y_obs"], progress=False)
result = runner(*args)
digest = hashlib.sha256()
for name in ("log2_alpha_y", "o_y", "mu_ntc", "beta_o"):
    digest.update(result[name].numpy().tobytes())
print(runner.plan.batch_size, digest.hexdigest())

"""scipy is not a core dependency (issue 20): without it, fit_technical fits dense input and a dense
.npz file is read, and sparse input (a Matrix Market file; a scipy.sparse matrix cannot exist
without scipy) says how to get scipy in a clone (make setup). Run in a child whose scipy cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys
class NoScipy:  # as if scipy were not installed
    def find_spec(self, name, path=None, target=None):
        if name == "scipy" or name.startswith("scipy."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NoScipy())
import numpy as np
from bayesDREAM_ext.readers import read_counts
from bayesDREAM_ext.fit import fit_technical
from bayesDREAM_ext.synthetic import synthetic_technical
folder = sys.argv[1]
data = synthetic_technical(40, 8, 2, seed=0)
fit = fit_technical(data.counts, data.groups, data.sum_factors, device="cpu", niters=3, nsamples=4, seed=0, progress=False)
np.savez(f"{folder}/counts.npz", counts=data.counts)
out = {"dense": list(fit.posterior_samples["log2_alpha_y"].shape), "npz": list(read_counts(f"{folder}/counts.npz", cells_axis=0).shape)}
open(f"{folder}/counts.mtx", "w").write("%%MatrixMarket matrix coordinate integer general\n2 2 1\n1 1 3\n")
try:
    read_counts(f"{folder}/counts.mtx", cells_axis=0)
except ImportError as exc:
    out["sparse"] = str(exc)
out["scipy_loaded"] = "scipy" in sys.modules
print("RESULT" + json.dumps(out))
"""


def test_dense_input_fits_and_sparse_input_names_the_install_without_scipy(tmp_path):
    run = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("RESULT"))[len("RESULT"):])
    assert result["dense"] == [4, 1, 8] and result["npz"] == [40, 8] and not result["scipy_loaded"]
    assert result["sparse"].startswith("reading Matrix Market files needs scipy, which is not installed: in the repository run `make setup`")

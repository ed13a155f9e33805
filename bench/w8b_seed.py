"""W8b: memory-aware SVI at the seed's size (21,761 cells x 31,467 features, C=2) on the CPU
inside a 16 GiB memory cgroup: 5 chunked steps, ms/step and peak, and the projected time to
convergence. Needs about 16 GiB of free RAM and 15-40 minutes on 2 cores; skipped in --quick.

    python -m bench --only W8b

The child checkpoints after every step (as a long run would) and logs each with its time, so
a child stopped by the time limit still gives its steps' ms/step.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from bench.w8_svi import run_spec

SEED = dict(N=21761, T=31467, C=2, steps=5)
CAP_BYTES = 16 * 2**30
# bayesDREAM's default niters for negbinom: the most steps a fit takes before early stop.
MAX_STEPS = 50_000


def run(quick: bool = False, timeout_s: float | None = None) -> dict[str, Any]:
    """Measure in a fresh child; one stopped at ``timeout_s`` (default ``BENCH_W8B_TIMEOUT_S``
    from the environment, else 3 hours) still reports the steps it logged."""
    timeout_s = timeout_s or float(os.environ.get("BENCH_W8B_TIMEOUT_S", 3 * 3600))
    if quick:
        return {"status": "skipped", "notes": ["skipped in --quick: needs 16 GiB and 15-40 minutes."]}
    with tempfile.TemporaryDirectory(prefix="devicemem-w8b-") as scratch:
        rep = run_spec({**SEED, "checkpoint": str(Path(scratch) / "svi.pt")}, cap_bytes=CAP_BYTES, timeout=timeout_s)
    point = {
        "config": f"seed size N={SEED['N']}, T={SEED['T']}, C={SEED['C']}, cap {CAP_BYTES / 2**30:g} GiB", "status": rep["status"],
        "ms_per_step": rep.get("ms_per_step"), "steps": rep.get("steps"), "chunk_cells": rep.get("chunk_cells"),
        "chunks_per_step": rep.get("chunks_per_step"), "training_peak_bytes": rep.get("training_peak_bytes"),
        "predicted_bytes": rep.get("predicted_bytes"), "budget_bytes": rep.get("budget_bytes"),
        "logged_first_step_peak": rep.get("training_peak"), "peak_rss_bytes": rep["peak_rss_bytes"], "prepare_s": rep.get("prepare_s"), "wall_s": rep["wall_s"], "error": rep["error"],
    }
    figures = {}
    if rep.get("ms_per_step"):
        figures["hours_for_50000_steps"] = rep["ms_per_step"] * MAX_STEPS / 3.6e6
        figures["hours_for_5000_steps"] = rep["ms_per_step"] * 5000 / 3.6e6
    return {
        "status": "done", "params": {**SEED, "cap_bytes": CAP_BYTES, "cap_method": rep["cap_method"]}, "points": [point], "figures": figures,
        "notes": [
            "Counts drawn in the child a block of cells at a time (2.74 GB float32 resident), prepared by "
            "prepare_technical and build_model_inputs, then train() plans chunks from the cgroup's headroom.",
            f"Projected time to convergence: ms/step x steps; {MAX_STEPS} is bayesDREAM's default niters (early stop "
            "usually ends sooner, so it is an upper bound); 5000 steps shown for scale. Load average "
            f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at the end.",
        ],
    }

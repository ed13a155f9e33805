"""Workloads and CUDA helpers shared by the GPU tests (importable without a GPU)."""

from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from devicemem.units import parse_bytes

MIB = parse_bytes("1MiB")
GIB = parse_bytes("1GiB")

# The seed's real size (the user report that started the project): NTC cells, features, technical groups, samples.
SEED_N, SEED_T, SEED_C, SEED_S = 21_761, 31_467, 2, 1000


def cuda_unavailable_reason() -> str | None:
    """Why this process cannot run the GPU tests; None when it can."""
    if torch.cuda.is_available():
        return None
    return (
        f"CUDA is not available (torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
        "gpu_tests prove the CUDA path and need an NVIDIA GPU: run gpu_tests/run.sh on a GPU machine"
    )


def release_cuda() -> None:
    """Drop unreachable tensors and hand torch's cached blocks back to the driver."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


@contextmanager
def occupy_gpu(leave_bytes: int, device: int = 0) -> Iterator[int]:
    """Hold one tensor over all of ``device``'s free memory but ``leave_bytes``, as another
    job would; yields the free bytes left. The tensor is freed on exit."""
    release_cuda()
    free, _ = torch.cuda.mem_get_info(device)
    hog = torch.empty(max(free - leave_bytes, 0), dtype=torch.uint8, device=f"cuda:{device}")
    try:
        yield torch.cuda.mem_get_info(device)[0]
    finally:
        del hog
        release_cuda()


@dataclass(frozen=True)
class TechnicalProblem:
    """Positional arguments of ``technical_model`` on the CPU, counts None (params only with
    ``observe=False``; posterior predictive, which samples ``y_obs`` [N, T], without)."""

    n_cells: int
    n_features: int
    n_groups: int
    args: tuple

    def guide(self) -> Any:
        """A fresh AutoNormal over the model's latent sites, started where bayesDREAM starts a
        fit without group differences: no effects, baseline means at their prior mean, every
        other site at its prior median. Its prototype trace skips the likelihood, so ``y_obs``
        is never a guide site."""
        import pyro
        from pyro.infer.autoguide import AutoNormal
        from pyro.infer.autoguide.initialization import init_to_median, init_to_value

        from bayesDREAM_ext.model import technical_model

        _, _, _, mean, _, n_groups = self.args
        start = {"log2_alpha_y": torch.zeros(n_groups - 1, self.n_features), "mu_ntc": mean}
        pyro.clear_param_store()
        guide = AutoNormal(technical_model, init_loc_fn=init_to_value(values=start, fallback=init_to_median))
        with torch.no_grad():
            guide(*self.args, observe=False)
        return guide

    def expected_counts_total(self) -> float:
        """Sum over cells and features of E[y_obs] at the guide's start: sum_n s_n * sum_t mean_t
        (AutoNormal's initial scale 0.1 raises it by < 1%)."""
        _, _, sum_factors, mean, _, _ = self.args
        return float(sum_factors.double().sum() * mean.double().sum())


def technical_problem(n_cells: int, n_features: int, n_groups: int = 2, seed: int = 0) -> TechnicalProblem:
    """Model arguments at any size without a counts matrix: every group present (baseline 0
    first), log-normal size factors and baseline means, and the mean prior's sd at 10% of the
    mean (``mu_ntc_prior``'s floor). Cheap even at the seed's full size."""
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, n_groups, size=n_cells)
    groups[:n_groups] = np.arange(n_groups)
    groups.sort()
    sum_factors = rng.lognormal(0.0, 0.3, size=n_cells).astype(np.float32)
    mean = rng.lognormal(1.0, 1.2, size=n_features).astype(np.float32)
    args = (
        None,
        torch.from_numpy(groups.astype(np.int64)),
        torch.from_numpy(sum_factors),
        torch.from_numpy(mean),
        torch.from_numpy(0.1 * mean),
        n_groups,
    )
    return TechnicalProblem(n_cells, n_features, n_groups, args)

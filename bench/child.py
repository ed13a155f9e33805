"""One benchmark configuration, run in a fresh process: ``python -m bench.child '<json spec>'``.

The child sets up outside the timed region (imports, loading the cached data set, building
and initialising the guide), then times only the measured call, and prints one line
``BENCH-RESULT {json}`` with ``sample_wall_s``, the CUDA peak when on CUDA, and details.
Spec kinds: ``predictive`` (a baseline on the technical model), ``raw_fill`` (W4: float32
normals into a preallocated buffer).
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from typing import Any, Callable

MARKER = "BENCH-RESULT "


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def _cuda_peak(device: str) -> int | None:
    import torch

    return int(torch.cuda.max_memory_allocated(device)) if device.startswith("cuda") else None


def _reset_cuda_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def technical_setup(spec: dict) -> tuple[Callable, Any, tuple, dict, Any]:
    """Model, an initialised AutoNormal guide, args, kwargs and the data (kept alive)."""
    import pyro
    import torch
    from pyro.infer.autoguide import AutoNormal
    from pyro.infer.autoguide.initialization import init_to_median

    from bayesDREAM_ext.model import technical_model
    from bench.data import load_dataset

    data = load_dataset(spec["data"])
    pyro.set_rng_seed(spec.get("seed", 0))
    pyro.clear_param_store()
    rest = (data["groups"], data["sum_factors"], data["mu_prior_mean"], data["mu_prior_sd"],
            data["n_groups"])
    guide = AutoNormal(technical_model, init_loc_fn=init_to_median)
    with torch.no_grad():
        guide(data["counts"], *rest, observe=False)
    observe = spec["observe"]
    args = (None if observe else data["counts"],) + rest
    return technical_model, guide, args, {"observe": observe}, data


def run_predictive(spec: dict) -> dict:
    """One baseline on the technical model; times the sampling call and the result assembly."""
    import pyro
    import torch

    from bench.baselines import run_baseline

    model, guide, args, kwargs, data = technical_setup(spec)
    if spec["baseline"] == "devicemem-auto":  # imported before the clock starts, as pyro is for the others
        importlib.import_module("devicemem.predictive")
        importlib.import_module("devicemem.execute.ray")
    device = spec.get("device", "cpu")
    if spec["baseline"] != "devicemem-auto" and device != "cpu":
        from devicemem.placement import to_device

        device = "cuda" if device == "auto" else device
        args = to_device(args, device)
        guide.to(device)
    measured = "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
    return_sites = spec.get("return_sites")
    shape = (data["counts"].shape[0], data["counts"].shape[1], data["n_groups"])
    pyro.set_rng_seed(spec.get("seed", 0) + 1)
    _sync(measured)
    _reset_cuda_peak(measured)
    start = time.perf_counter()
    result, info = run_baseline(
        spec["baseline"], model, guide, args, kwargs, spec["num_samples"], return_sites,
        reduce_sites=spec.get("reduce_sites"), batch_size=spec.get("batch_size"), shape=shape,
        device=device,
    )
    _sync(measured)
    wall = time.perf_counter() - start
    cuda_peak = _cuda_peak(measured)
    if cuda_peak is not None:  # devicemem resets the CUDA peak before each batch
        cuda_peak = max(cuda_peak, info.get("max_batch_peak_bytes", 0))
    return {
        "sample_wall_s": wall,
        "cuda_peak_bytes": cuda_peak,
        "outputs": {name: list(value.shape) for name, value in result.items()},
        "info": info,
        "torch_threads": torch.get_num_threads(),
    }


def run_raw_fill(spec: dict) -> dict:
    """W4: time ``normal_()`` over a preallocated, already touched float32 buffer."""
    import torch

    device = spec.get("device", "cpu")
    buffer = torch.zeros(spec["n_elements"], dtype=torch.float32, device=device)
    torch.manual_seed(spec.get("seed", 0))
    _sync(device)
    _reset_cuda_peak(device)
    start = time.perf_counter()
    buffer.normal_()
    _sync(device)
    wall = time.perf_counter() - start
    return {"sample_wall_s": wall, "cuda_peak_bytes": _cuda_peak(device),
            "info": {"n_elements": spec["n_elements"]}}


KINDS: dict[str, Callable[[dict], dict]] = {
    "predictive": run_predictive,
    "raw_fill": run_raw_fill,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    result = KINDS[spec["kind"]](spec)
    print(MARKER + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

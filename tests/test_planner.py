"""The planner's decisions, each branch with a fake device list and a fake footprint probe."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from bayesDREAM_ext.memory import estimate_predictive_memory_and_set_minibatch, plan_technical
from devicemem.backends import DeviceMemory, MemoryView, SystemProbe
from devicemem.footprint import Footprint
from devicemem.planner import (
    CONSERVATIVE_BATCH,
    DEFAULT_SAFETY_FACTOR,
    DEVICEMEM_SAFETY_FACTOR,
    DEVICEMEM_THREADS,
    plan_predictive,
    resolve_threads,
)

GB = 10**9
MB = 10**6


def memory(device: str, usable: int | None, total: int | None = None, limit: int | None = None) -> DeviceMemory:
    sources = ("fake.free",) + (("cgroup-v1:/job (memory.limit_in_bytes)",) if limit else ())
    return DeviceMemory(device, device, total, usable, limit, usable, sources)


class FakeProbe:
    """A footprint per device name; records every call."""

    def __init__(self, footprints: dict[str, Footprint]) -> None:
        self.footprints = footprints
        self.calls: list[tuple[str, tuple, dict]] = []

    def __call__(self, model, guide, *args, device, return_sites=None, posterior_samples=None, **kwargs):
        self.calls.append((device, args, kwargs))
        return self.footprints[device]


def fp(fixed: int, per_sample: int, *, inputs: int = 0, output: int = 0, saturation: int | None = None) -> Footprint:
    return Footprint(fixed + inputs, per_sample, "fake", input_bytes=inputs, output_per_sample_bytes=output,
                     saturation_batch=saturation)


def model(*args, **kwargs) -> None:
    """Stands in for a Pyro model; the fake probe never runs it."""


def guide(*args, **kwargs) -> None:
    """Stands in for a guide."""


def machine(listing: list[DeviceMemory], environ=None) -> MemoryView:
    """One reading of a fake machine: a probe that lists these devices, in this environment."""
    return MemoryView.read(probe=SystemProbe(environ=environ or {}, listing=tuple(listing)))


def resources(listing: list[DeviceMemory], footprints: dict[str, Footprint] | None = None, environ=None):
    """(the planner's keyword arguments for a fake machine and fake footprints, the fake probe)."""
    probe = FakeProbe(footprints or {})
    return {"view": machine(listing, environ), "measure": probe}, probe


def plan(listing, footprints, num_samples=1000, environ=None, **kwargs):
    res, probe = resources(listing, footprints, environ)
    return plan_predictive(model, guide, num_samples, torch.zeros(3), **res, **kwargs), probe


# --- batch size on one device --------------------------------------------------------------


def test_everything_fits_one_vectorised_batch():
    result, _ = plan([memory("cpu", 10 * GB)], {"cpu": fp(100 * MB, 1 * MB, output=1000)}, safety_factor=0.5)
    assert (result.device, result.batch_size, result.n_batches, result.vectorized) == ("cpu", 1000, 1, True)
    assert result.output_bytes == 1000 * 1000
    assert result.budget_bytes == 5 * GB - 1000 * 1000
    assert result.predicted_peak_bytes == 100 * MB + 1000 * MB
    assert any("one vectorised batch of 1000 on cpu" in r for r in result.reasons)


def test_largest_batch_that_fits_evened_out():
    # budget 1 GB: (1000 MB - 100 MB) / 4 MB = 225 samples fit -> 5 batches of 200
    result, _ = plan([memory("cpu", 2 * GB)], {"cpu": fp(100 * MB, 4 * MB)}, safety_factor=0.5)
    assert (result.batch_size, result.n_batches, result.vectorized) == (200, 5, True)
    assert result.predicted_peak_bytes <= result.budget_bytes
    assert any("at most 225 fit" in r for r in result.reasons)


def test_inputs_resident_on_the_host_are_not_counted_twice():
    # the inputs (500 MB) already live on the cpu, where the tensor argument is
    result, _ = plan([memory("cpu", 2 * GB)], {"cpu": fp(100 * MB, 4 * MB, inputs=500 * MB)}, safety_factor=0.5)
    assert result.batch_size == 200


def test_results_count_against_the_host_budget():
    # 1000 samples x 0.5 MB of results = 500 MB off a 1 GB budget: (500 - 100) / 4 = 100 fit
    result, _ = plan([memory("cpu", 2 * GB)], {"cpu": fp(100 * MB, 4 * MB, output=500_000)}, safety_factor=0.5)
    assert (result.batch_size, result.n_batches, result.output_bytes) == (100, 10, 500 * MB)
    explicit, _ = plan([memory("cpu", 2 * GB)], {"cpu": fp(100 * MB, 4 * MB, output=500_000)}, safety_factor=0.5,
                       output_bytes=0)
    assert explicit.batch_size == 200


def test_saturation_caps_the_batch():
    result, _ = plan([memory("cpu", 100 * GB)], {"cpu": fp(0, 1 * MB, saturation=40)})
    assert (result.batch_size, result.n_batches) == (40, 25)
    assert any("no faster per sample" in r for r in result.reasons)


def test_user_minibatch_is_kept_without_a_probe(caplog):
    caplog.set_level(logging.INFO, logger="devicemem")
    result, probe = plan([memory("cpu", 2 * GB)], {"cpu": fp(100 * MB, 4 * MB)}, safety_factor=0.5, minibatch_size=300)
    assert (result.batch_size, result.n_batches, result.vectorized, result.device) == (250, 4, True, "cpu")
    assert probe.calls == [] and result.predicted_peak_bytes is None and result.budget_bytes is not None
    assert "not probed" in caplog.text
    gpu, probe = plan([memory("cuda:0", 8 * GB), memory("cpu", 2 * GB)], {}, minibatch_size=100)
    assert (gpu.device, gpu.batch_size) == ("cuda:0", 100) and probe.calls == []


def test_super_linear_footprints_ramp_up_from_the_largest_probed_batch():
    quadratic = Footprint(0, 1 * MB, "fake", quadratic_bytes=0.1 * MB, measured_batch=64)
    result, _ = plan([memory("cpu", 100 * GB)], {"cpu": quadratic}, safety_factor=0.5)
    assert result.ramp_from == 64 and result.batch_size > 64
    assert any("faster than linearly" in reason for reason in result.reasons)
    linear, _ = plan([memory("cpu", 100 * GB)], {"cpu": fp(0, 1 * MB)}, safety_factor=0.5)
    assert linear.ramp_from is None


def test_streams_when_one_vectorised_sample_exceeds_the_budget_but_fits_usable(caplog):
    caplog.set_level(logging.WARNING, logger="devicemem")
    result, _ = plan([memory("cpu", 1 * GB)], {"cpu": fp(500 * MB, 400 * MB)}, safety_factor=0.8)
    assert (result.batch_size, result.n_batches, result.vectorized) == (1, 1000, False)
    assert "streaming sample by sample" in caplog.records[-1].getMessage()


def test_raises_with_the_numbers_when_one_sample_cannot_fit():
    with pytest.raises(ValueError, match=r"one sample needs 1\.10 GB on cpu .* only 1\.00 GB is usable"):
        plan([memory("cpu", 1 * GB)], {"cpu": fp(700 * MB, 400 * MB)})


def test_unknown_budget_uses_the_seeds_conservative_default(caplog):
    caplog.set_level(logging.WARNING, logger="devicemem")
    result, probe = plan([memory("cpu", None)], {}, num_samples=120)
    assert (result.batch_size, result.n_batches, result.vectorized) == (40, 3, False)
    assert result.budget_bytes is None and result.predicted_peak_bytes is None
    assert probe.calls == []  # no work when nothing can be planned
    assert "psutil" in caplog.records[-1].getMessage()
    small, _ = plan([memory("cpu", None)], {}, num_samples=1000)
    assert small.batch_size == CONSERVATIVE_BATCH
    user, _ = plan([memory("cpu", None)], {}, num_samples=1000, minibatch_size=10)
    assert (user.batch_size, user.vectorized) == (10, True)


# --- device choice ---------------------------------------------------------------------------


def test_auto_picks_the_gpu_with_most_usable_memory():
    listing = [memory("cpu", 20 * GB), memory("cuda:0", 8 * GB), memory("cuda:1", 40 * GB)]
    footprints = {"cuda:1": fp(1 * GB, 10 * MB, inputs=2 * GB), "cpu": fp(1 * GB, 10 * MB)}
    result, probe = plan(listing, footprints)
    assert result.device == "cuda:1" and [call[0] for call in probe.calls] == ["cuda:1"]
    # the inputs live on the cpu: they count on the GPU
    assert result.predicted_peak_bytes == 2 * GB + 1 * GB + 1000 * 10 * MB


def test_auto_falls_back_to_the_host_when_the_gpu_cannot_hold_one_sample():
    listing = [memory("cpu", 64 * GB), memory("cuda:0", 4 * GB)]
    footprints = {"cuda:0": fp(1 * GB, 3 * GB, inputs=1 * GB), "cpu": fp(1 * GB, 3 * GB, inputs=1 * GB)}
    result, probe = plan(listing, footprints, num_samples=10)
    assert result.device == "cpu" and [call[0] for call in probe.calls] == ["cuda:0", "cpu"]
    assert any("cuda:0 cannot hold one vectorised sample" in r for r in result.reasons)


def test_auto_falls_back_to_the_host_when_probing_the_gpu_runs_out_of_memory():
    listing = [memory("cpu", 64 * GB), memory("cuda:0", 4 * GB)]
    res, probe = resources(listing, {"cpu": fp(0, 1 * MB)})
    calls = []

    def probe_or_oom(model, guide, *args, device, **kwargs):
        calls.append(device)
        if device == "cuda:0":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return probe(model, guide, *args, device=device, **kwargs)

    result = plan_predictive(model, guide, 100, view=res["view"], measure=probe_or_oom)
    assert result.device == "cpu" and calls == ["cuda:0", "cpu"]
    assert any("ran out of memory while probing" in r for r in result.reasons)

    def broken(*args, **kwargs):
        raise RuntimeError("not an OOM")

    with pytest.raises(RuntimeError, match="not an OOM"):  # other errors are not swallowed
        plan_predictive(model, guide, 100, view=res["view"], measure=broken)


def test_a_memory_error_in_the_probes_first_batch_leads_to_one_sample_at_a_time(caplog):
    """Python's MemoryError (no message) is an out-of-memory error of any device: the GPU's
    probe moves to the host, and on the host (the last candidate) the plan draws one sample at
    a time instead of re-raising it."""
    listing = [memory("cpu", 64 * GB), memory("cuda:0", 4 * GB)]
    res, _ = resources(listing)
    calls = []

    def probe_oom(model, guide, *args, device, **kwargs):
        calls.append(device)
        raise MemoryError()

    with caplog.at_level(logging.WARNING, logger="devicemem"):
        result = plan_predictive(model, guide, 100, view=res["view"], measure=probe_oom)
    assert calls == ["cuda:0", "cpu"]
    assert (result.device, result.batch_size, result.n_batches, result.vectorized) == ("cpu", 1, 100, False)
    assert result.budget_bytes is not None and result.budget_bytes > 0
    assert "cpu ran out of memory in the probe's first batch (MemoryError); drawing one sample at a time" in caplog.text


def test_auto_without_gpus_plans_the_host():
    result, _ = plan([memory("cpu", 10 * GB)], {"cpu": fp(0, 1 * MB)})
    assert result.device == "cpu"


def test_explicit_devices_are_honoured():
    listing = [memory("cpu", 64 * GB), memory("cuda:0", 40 * GB), memory("cuda:1", 8 * GB)]
    footprints = {name: fp(0, 1 * MB) for name in ("cpu", "cuda:0", "cuda:1")}
    assert plan(listing, footprints, device="cuda:1")[0].device == "cuda:1"
    assert plan(listing, footprints, device="cpu")[0].device == "cpu"
    assert plan(listing, footprints, device="cuda")[0].device == "cuda:0"
    assert plan(listing, footprints, device=torch.device("cuda", 1))[0].device == "cuda:1"


def test_unknown_or_invisible_device_is_a_clear_error():
    listing = [memory("cpu", 64 * GB), memory("cuda:0", 40 * GB)]
    with pytest.raises(ValueError, match=r"device: 'cuda:3' is not visible .* sees: cpu, cuda:0"):
        plan(listing, {}, device="cuda:3")
    with pytest.raises(ValueError, match="device: 'cuda' is not visible"):
        plan([memory("cpu", 64 * GB)], {}, device="cuda")


def test_explicit_gpu_that_cannot_hold_one_sample_raises():
    listing = [memory("cpu", 64 * GB), memory("cuda:0", 4 * GB)]
    with pytest.raises(ValueError, match="one sample needs .* on cuda:0"):
        plan(listing, {"cuda:0": fp(1 * GB, 4 * GB)}, device="cuda:0")


def test_probe_gets_the_model_arguments_and_keywords():
    _, probe = plan([memory("cpu", 10 * GB)], {"cpu": fp(0, 1)}, observe=False)
    device, args, kwargs = probe.calls[0]
    assert device == "cpu" and args[0].shape == (3,)
    assert kwargs == {"observe": False, "max_batch_size": 1000, "max_probe_bytes": int(0.8 * 10 * GB), "sampler": None,
                      "reduce": (), "on_device": None}


# --- safety factor -------------------------------------------------------------------------


def test_safety_factor_from_argument_environment_or_default():
    listing, footprints = [memory("cpu", 10 * GB)], {"cpu": fp(0, 1)}
    assert plan(listing, footprints)[0].safety_factor == DEFAULT_SAFETY_FACTOR
    from_env, _ = plan(listing, footprints, environ={DEVICEMEM_SAFETY_FACTOR: "0.5"})
    assert (from_env.safety_factor, from_env.budget_bytes) == (0.5, 5 * GB)
    argument, _ = plan(listing, footprints, environ={DEVICEMEM_SAFETY_FACTOR: "0.5"}, safety_factor=0.25)
    assert argument.safety_factor == 0.25


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.01, 2, "x", True])
def test_safety_factor_outside_range_is_rejected(bad):
    with pytest.raises(ValueError, match="safety_factor"):
        plan([memory("cpu", 10 * GB)], {"cpu": fp(0, 1)}, safety_factor=bad)


def test_bad_safety_factor_variable_is_named():
    with pytest.raises(ValueError, match=DEVICEMEM_SAFETY_FACTOR):
        plan([memory("cpu", 10 * GB)], {"cpu": fp(0, 1)}, environ={DEVICEMEM_SAFETY_FACTOR: "1.5"})


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -1, 10.0, "10", True, None])
def test_num_samples_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="num_samples"):
        plan([memory("cpu", 10 * GB)], {"cpu": fp(0, 1)}, num_samples=bad)


@pytest.mark.parametrize("bad", [0, -5, 2.5])
def test_minibatch_size_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="minibatch_size"):
        plan([memory("cpu", 10 * GB)], {"cpu": fp(0, 1)}, minibatch_size=bad)


def test_plan_predictive_needs_a_guide_or_posterior_samples():
    res, _ = resources([memory("cpu", 10 * GB)])
    with pytest.raises(ValueError, match="guide or posterior_samples"):
        plan_predictive(model, None, 10, **res)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"n_cells": 0}, "n_cells"),
        ({"n_features": 0}, "n_features"),
        ({"n_groups": 0}, "n_groups"),
        ({"num_samples": 0}, "num_samples"),
        ({"num_samples": 5.0}, "num_samples"),
        ({"n_groups": 11}, "n_groups"),
        ({"n_categories": 0}, "n_categories"),
        ({"distribution": "poisson"}, "distribution"),
        ({"guide": "lowrank"}, "guide"),
        ({"minibatch_size": 0}, "minibatch_size"),
        ({"safety_factor": 1.5}, "safety_factor"),
    ],
)
def test_plan_technical_rejects_bad_input_naming_the_argument(kwargs, name):
    args = {"n_cells": 10, "n_features": 5, "n_groups": 2, "num_samples": 100, **kwargs}
    res, _ = resources([memory("cpu", 10 * GB)])
    with pytest.raises(ValueError, match=name):
        plan_technical(args.pop("n_cells"), args.pop("n_features"), args.pop("n_groups"), args.pop("num_samples"),
                       view=res["view"], **args)


# --- the analytic twin, the seed's function and the log lines --------------------------------


def test_plan_technical_picks_one_vectorised_batch_for_the_seeds_case():
    res, _ = resources([memory("cpu", 20 * GB)])
    result = plan_technical(3000, 4000, 2, 1000, view=res["view"])
    assert (result.device, result.batch_size, result.n_batches, result.vectorized) == ("cpu", 1000, 1, True)


def test_plan_technical_with_obs_batches_under_the_budget():
    res, _ = resources([memory("cpu", 8 * GB)])
    result = plan_technical(2000, 2000, 2, 200, with_obs=True, view=res["view"])
    assert result.n_batches > 1 and result.predicted_peak_bytes <= result.budget_bytes


def test_seed_function_semantics():
    roomy, _ = resources([memory("cpu", 20 * GB)])
    assert estimate_predictive_memory_and_set_minibatch(3000, 4000, 2, 1000, view=roomy["view"]) == (None, True)
    tight, _ = resources([memory("cpu", 200 * MB)])
    size, parallel = estimate_predictive_memory_and_set_minibatch(3000, 4000, 2, 1000, view=tight["view"])
    assert parallel and 1 <= size < 1000
    assert estimate_predictive_memory_and_set_minibatch(3000, 4000, 2, 1000, minibatch_size=7, view=roomy["view"]) == (7, True)
    unknown, _ = resources([memory("cpu", None)])
    assert estimate_predictive_memory_and_set_minibatch(3000, 4000, 2, 1000, view=unknown["view"]) == (50, False)


def test_memory_lines_in_the_seeds_voice(caplog):
    caplog.set_level(logging.INFO, logger="devicemem")
    res, _ = resources([memory("cpu", 20 * GB, total=32 * GB, limit=24 * GB)])
    plan_technical(3000, 4000, 2, 1000, view=res["view"])
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("devicemem")]
    assert lines[0] == "[MEMORY] Available CPU RAM: 20.00 GB usable (limit 24.00 GB from cgroup-v1:/job (memory.limit_in_bytes))"
    assert any(line.startswith("[MEMORY] Estimated peak for 1000 samples on cpu: ") for line in lines)
    assert lines[-1].startswith("[MEMORY] Will use one vectorised batch of 1000 on cpu")


def test_resolve_threads_argument_then_environment_then_usable_cores():
    cores = lambda: 6  # noqa: E731
    assert resolve_threads(3, cores, {DEVICEMEM_THREADS: "2"}) == (3, "argument")
    assert resolve_threads(None, cores, {DEVICEMEM_THREADS: " 2 "}) == (2, DEVICEMEM_THREADS)
    assert resolve_threads(None, cores, {}) == (6, "usable cores")
    assert resolve_threads(None, lambda: None, {}) == (1, "default")
    with pytest.raises(ValueError, match="DEVICEMEM_THREADS: expected an integer >= 1; got '0'"):
        resolve_threads(None, cores, {DEVICEMEM_THREADS: "0"})
    with pytest.raises(ValueError, match="threads: expected an integer >= 1"):
        resolve_threads(0, cores, {})


def test_plan_technical_caps_host_batches_later_with_more_cores():
    def host(cores):
        return dataclasses.replace(memory("cpu", 100 * GB), cores=cores, cores_source="affinity")

    sizes = {}
    for cores in (1, 8):
        res, _ = resources([host(cores)])
        sizes[cores] = plan_technical(1000, 1000, 2, 200, with_obs=True, view=res["view"]).batch_size
    assert sizes[8] > sizes[1] * 4
    res, _ = resources([host(8)], environ={DEVICEMEM_THREADS: "1"})
    assert plan_technical(1000, 1000, 2, 200, with_obs=True, view=res["view"]).batch_size == sizes[1]

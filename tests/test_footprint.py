"""Footprint estimators: the record's arithmetic, the analytic and probed footprints against
peaks measured in fresh child processes, the probe's line, cache and errors."""

from __future__ import annotations

import json
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

from bench.child import MARKER
from devicemem.backends.base import Backend
from bayesDREAM_ext.memory import technical_footprint
from devicemem.footprint import PROBE_MARGIN, Footprint, _Measure, _saturation, probe_footprint
from tests.support.child import run_child

MB = 10**6


# --- the record ----------------------------------------------------------------------------


def test_peak_counts_inputs_unless_resident():
    fp = Footprint(fixed_bytes=300, per_sample_bytes=10, source="t", input_bytes=200)
    assert fp.peak_bytes(20) == 200 + 100 + 200
    assert fp.peak_bytes(20, inputs_resident=True) == 300


def test_small_batches_cost_more_per_sample():
    fp = Footprint(fixed_bytes=0, per_sample_bytes=10, source="t", small_batch_bytes=5, small_batch_limit=100)
    assert (fp.per_sample_at(99), fp.per_sample_at(100)) == (15, 10)
    assert fp.peak_bytes(99) == 99 * 15 and fp.peak_bytes(100) == 1000


@pytest.mark.parametrize(
    "fp",
    [
        Footprint(300, 10, "t", input_bytes=200),
        Footprint(0, 10, "t", small_batch_bytes=5, small_batch_limit=100),
        Footprint(1000, 7, "t", input_bytes=900, small_batch_bytes=3, small_batch_limit=40),
    ],
)
def test_max_batch_is_the_largest_batch_under_the_budget(fp):
    for resident in (False, True):
        for budget in range(0, 3000, 37):
            best = fp.max_batch(budget, resident)
            fitting = [b for b in range(1, 1000) if fp.peak_bytes(b, resident) <= budget]
            assert best == (max(fitting) if fitting else 0), (budget, resident)


# --- analytic, against measurement -----------------------------------------------------------


def measured_delta(spec: dict) -> tuple[dict, int]:
    """Peak above the pre-call RSS of one vectorised Predictive in a fresh child (bench's W3 child)."""
    child = run_child([sys.executable, "-m", "bench.w3_accuracy", json.dumps(spec)], timeout=600)
    assert child.ok, child.stderr[-2000:]
    payload = json.loads(next(line for line in child.stdout.splitlines() if line.startswith(MARKER))[len(MARKER):])
    return payload, payload["delta_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "with_obs, n_cells, n_features, n_groups, batch",
    [(False, 200, 32000, 3, 400), (True, 500, 2000, 2, 16)],
    ids=["params-only", "with-obs"],
)
def test_technical_footprint_matches_a_measured_peak(with_obs, n_cells, n_features, n_groups, batch):
    spec = dict(model="technical", distribution="negbinom", guide="normal", with_obs=with_obs,
                N=n_cells, T=n_features, C=n_groups, B=batch)
    shapes, measured = measured_delta(spec)
    fp = technical_footprint(shapes["n_cells"], shapes["n_features"], shapes["n_groups"], with_obs=with_obs)
    assert 0.9 <= fp.peak_bytes(batch, inputs_resident=True) / measured <= 1.25


def test_technical_footprint_counts_inputs_and_results():
    fp = technical_footprint(1000, 200, 3)
    counts = 1000 * 200 * 4
    assert fp.input_bytes > counts and fp.fixed_bytes == fp.input_bytes  # params-only: no fixed working memory
    # log2_alpha_y, alpha_y_mul, delta_y_add [2, 200]; o_y, mu_ntc [200]; beta_o
    assert fp.output_per_sample_bytes == (3 * 2 * 200 + 2 * 200 + 1) * 4
    obs = technical_footprint(1000, 200, 3, with_obs=True)
    assert obs.output_per_sample_bytes == fp.output_per_sample_bytes + counts
    assert obs.saturation_batch is not None and fp.saturation_batch is None
    assert obs.fixed_bytes - obs.input_bytes == counts  # the likelihood's one [N, T] of working memory
    assert technical_footprint(1000, 200, 3, dtype=torch.float64).per_sample_bytes == 2 * fp.per_sample_bytes


def test_saturation_with_the_observation_site_shrinks_as_cells_times_features_grow():
    batches = [technical_footprint(n, n, 2, with_obs=True).saturation_batch for n in (250, 1000, 2000, 20000)]
    assert batches == sorted(batches, reverse=True) and batches[0] > 1 and batches[-1] == 1
    assert technical_footprint(250, 250, 2, with_obs=True, on_host=False).saturation_batch is None


def _measures(*points):
    return [_Measure(batch, 0, seconds, 0) for batch, seconds in points]


def test_probe_saturation_is_the_smallest_batch_as_fast_per_sample_as_the_best():
    # per-sample work dominates and big batches are slower per sample (page faults): B=1 wins
    assert _saturation(_measures((1, 0.54), (4, 2.8), (8, 5.5))) == 1
    # flat per-sample time beyond B=4: B=4
    assert _saturation(_measures((1, 1.0), (4, 2.0), (8, 4.05))) == 4


def test_probe_saturation_extrapolates_while_bigger_batches_still_pay():
    # 10 ms per draw, 0.1 ms per sample: 5% overhead at 2000 samples
    assert 1990 <= _saturation(_measures((1, 0.0101), (4, 0.0104), (16, 0.0116))) <= 2010
    # no time growth with the batch at all: no cap
    assert _saturation(_measures((4, 0.01), (8, 0.009))) is None


def test_iaf_parameters_grow_with_the_square_of_the_latent_size():
    small, large = technical_footprint(100, 100, 2, guide="iaf"), technical_footprint(100, 200, 2, guide="iaf")
    assert 3.9 < large.input_bytes / small.input_bytes < 4.1


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"n_cells": 0}, "n_cells"),
        ({"n_features": -3}, "n_features"),
        ({"n_groups": 0}, "n_groups"),
        ({"n_groups": 11}, "n_groups"),
        ({"n_categories": 0}, "n_categories"),
        ({"n_cells": 2.0}, "n_cells"),
        ({"distribution": "gamma"}, "distribution"),
        ({"guide": "AutoLowRank"}, "guide"),
        ({"dtype": "float32"}, "dtype"),
    ],
)
def test_technical_footprint_rejects_bad_input(kwargs, name):
    args = {"n_cells": 10, "n_features": 5, "n_groups": 2, **kwargs}
    with pytest.raises(ValueError, match=name):
        technical_footprint(**args)


# --- the probe -------------------------------------------------------------------------------


@pytest.mark.slow
def test_probe_predicts_a_larger_batch_of_another_model_measured_in_a_fresh_child():
    shapes = dict(model="hill", N=250, T=1000)
    probed, _ = measured_delta_probe(shapes)
    assert probed.source == "probe on cpu at B=64,128"
    _, measured = measured_delta({**shapes, "B": 192})
    assert 0.9 <= probed.peak_bytes(192, inputs_resident=True) / measured <= 1.25


def measured_delta_probe(shapes: dict) -> tuple[Footprint, dict]:
    child = run_child([sys.executable, "-m", "bench.w3_accuracy", json.dumps({**shapes, "probe": True})], timeout=600)
    assert child.ok, child.stderr[-2000:]
    payload = json.loads(next(line for line in child.stdout.splitlines() if line.startswith(MARKER))[len(MARKER):])
    return Footprint(**payload["footprint"]), payload


class Recorder:
    """A model whose vectorised runs record their batch size, and a backend whose peak is
    ``base + slope * batch`` for the batch the model last ran: a probe with known answers."""

    def __init__(self, base: int, slope: int, quad: int = 0) -> None:
        self.base, self.slope, self.quad, self.batch, self.resets = base, slope, quad, 0, 0
        self.batches: list[int] = []

    def model(self, data: torch.Tensor | None = None) -> None:
        with pyro.plate("items", 3, dim=-1):
            value = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0))
        self.batch = value.shape[0] if value.dim() > 1 else 1
        self.batches.append(self.batch)


class ScriptedBackend(Backend):
    kind = "cpu"

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def discover(self, probe):
        return []

    def torch_device(self, device):
        return torch.device("cpu")

    def reset_peak(self, device):
        self.recorder.resets += 1

    def current_bytes(self, device):
        return 5_000

    def peak_bytes(self, device):
        batch = self.recorder.batch
        return 5_000 + self.recorder.base + self.recorder.slope * batch + self.recorder.quad * batch * batch

    def empty_cache(self, device):
        pass

    def is_oom(self, exc):
        return False


def scripted(base: int = 1_000_000, slope: int = 1_000, quad: int = 0) -> tuple[Recorder, ScriptedBackend, AutoNormal]:
    pyro.clear_param_store()
    recorder = Recorder(base, slope, quad)
    guide = AutoNormal(recorder.model)
    guide()
    return recorder, ScriptedBackend(recorder), guide


def test_probe_fits_the_line_through_the_two_largest_batches_plus_margin():
    recorder, backend, guide = scripted()
    fp = probe_footprint(recorder.model, guide, batch_sizes=(4, 16), backend=backend)
    assert fp.per_sample_bytes == pytest.approx(1_000 * (1 + PROBE_MARGIN), abs=1)
    assert fp.fixed_bytes - fp.input_bytes == pytest.approx(1_000_000 * (1 + PROBE_MARGIN), abs=1)
    assert fp.input_bytes == 2 * 3 * 4  # AutoNormal's loc and scale for z [3]
    assert fp.output_per_sample_bytes == 3 * 4
    assert fp.source == "probe on cpu at B=4,16"


def test_probe_climbs_until_a_batch_is_big_enough():
    recorder, backend, guide = scripted(base=0, slope=10 * MB)
    fp = probe_footprint(recorder.model, guide, backend=backend)
    assert fp.source == "probe on cpu at B=64,128"  # 64 x 10 MB is the first past 256 MiB
    assert fp.per_sample_bytes == pytest.approx(10 * MB * (1 + PROBE_MARGIN), rel=1e-6)


def test_probe_is_cached_per_model_guide_shapes_and_device():
    recorder, backend, guide = scripted()
    first = probe_footprint(recorder.model, guide, torch.zeros(2), batch_sizes=(2, 4), backend=backend)
    resets = recorder.resets
    assert probe_footprint(recorder.model, guide, torch.ones(2), batch_sizes=(2, 4), backend=backend) is first
    assert recorder.resets == resets
    other = probe_footprint(recorder.model, guide, torch.zeros(5), batch_sizes=(2, 4), backend=backend)
    assert other is not first and recorder.resets > resets


def test_probe_stops_early_when_everything_clearly_fits():
    recorder, backend, guide = scripted(base=1 * MB, slope=1_000)
    fp = probe_footprint(recorder.model, guide, max_batch_size=1000, max_probe_bytes=10**10, backend=backend)
    # three batches grew linearly; 1000 x (1 MB + 16 kB) / 16 = 63 MB, under a quarter of the 10 GB budget
    assert fp.source == "probe on cpu at B=16, through the origin" and recorder.batch == 16
    assert fp.peak_bytes(1000, inputs_resident=True) >= 1 * MB + 1000 * 1_000
    # under a 15 MB budget the bound never leaves room: the usual climb, not the cached bound
    tight = probe_footprint(recorder.model, guide, max_batch_size=1000, max_probe_bytes=15 * MB, backend=backend)
    assert tight.source == "probe on cpu at B=256,512"


def test_probe_stays_within_max_probe_bytes():
    recorder, backend, guide = scripted(base=0, slope=10 * MB)
    fp = probe_footprint(recorder.model, guide, max_probe_bytes=100 * MB, backend=backend)
    # until three batches show linear growth, the next is foreseen growing with B squared:
    # 16 x 10 MB would fit, but a + c B^2 through B=1, 4 says 520 MB
    assert fp.source == "probe on cpu at B=1,4" and recorder.batch == 4
    one = probe_footprint(recorder.model, guide, max_probe_bytes=15 * MB, batch_sizes=(1, 2), backend=backend)
    assert one.source == "probe on cpu at B=1, through the origin" and recorder.batch == 1
    assert one.per_sample_bytes == pytest.approx(10 * MB * (1 + PROBE_MARGIN), rel=1e-6)


def test_probe_fits_a_parabola_to_super_linear_growth_and_stays_within_the_budget():
    recorder, backend, guide = scripted(base=2 * MB, slope=100_000, quad=40_000)
    fp = probe_footprint(recorder.model, guide, max_batch_size=1000, max_probe_bytes=1 << 30, backend=backend)
    assert fp.source == "probe on cpu at B=4,16,64, quadratic" and fp.measured_batch == 64
    assert max(recorder.batches) == 64, "256 would need 2.6 GB of a 1 GiB budget: not probed"
    for batch in (100, 160, 400):
        truth = 2 * MB + 100_000 * batch + 40_000 * batch * batch
        assert 1.0 <= fp.peak_bytes(batch, inputs_resident=True) / truth <= 1 + PROBE_MARGIN + 1e-6
    assert fp.max_batch(1 << 30, inputs_resident=True) == 154


class OomAbove(ScriptedBackend):
    """Raises the CPU allocator's error for batches above ``limit``."""

    def __init__(self, recorder: Recorder, limit: int) -> None:
        super().__init__(recorder)
        self.limit = limit

    def peak_bytes(self, device):
        if self.recorder.batch > self.limit:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
        return super().peak_bytes(device)

    def is_oom(self, exc):
        return "DefaultCPUAllocator" in str(exc)


def test_probe_stops_climbing_at_an_out_of_memory_error():
    recorder, _, guide = scripted(base=0, slope=1 * MB)
    fp = probe_footprint(recorder.model, guide, backend=OomAbove(recorder, 16))
    assert fp.source == "probe on cpu at B=4,16"
    with pytest.raises(RuntimeError, match="DefaultCPUAllocator"):  # not even the first batch
        probe_footprint(recorder.model, guide, batch_sizes=(2, 3), backend=OomAbove(recorder, 1))


def test_probe_with_posterior_samples_stays_within_them():
    recorder, backend, _ = scripted()
    posterior = {"z": torch.randn(10, 3)}
    fp = probe_footprint(recorder.model, None, posterior_samples=posterior, backend=backend)
    assert fp.source == "probe on cpu at B=4,8"


def test_probe_never_runs_a_batch_above_max_batch_size():
    recorder, backend, guide = scripted()
    fp = probe_footprint(recorder.model, guide, max_batch_size=20, backend=backend)
    assert fp.source == "probe on cpu at B=4,16" and recorder.batch == 16
    fp = probe_footprint(recorder.model, guide, max_batch_size=3, backend=backend)
    assert fp.source == "probe on cpu at B=1,3"


@pytest.mark.parametrize("bad", [(4,), (4, 4), (0, 2), "12", 3, (2, 2.5)])
def test_probe_rejects_bad_batch_sizes(bad):
    recorder, backend, guide = scripted()
    with pytest.raises(ValueError, match="batch_sizes"):
        probe_footprint(recorder.model, guide, batch_sizes=bad, backend=backend)
    with pytest.raises(ValueError, match="max_batch_size"):
        probe_footprint(recorder.model, guide, max_batch_size=1, backend=backend)


def test_probe_needs_a_guide_or_posterior_samples():
    recorder, backend, _ = scripted()
    with pytest.raises(ValueError, match="guide or posterior_samples"):
        probe_footprint(recorder.model, None, backend=backend)


def test_saturation_grows_with_the_threads_that_draw_the_observation_site():
    one = technical_footprint(512, 512, 2, with_obs=True).saturation_batch
    four = technical_footprint(512, 512, 2, with_obs=True, threads=4)
    assert four.saturation_batch == 4 * one == 32 and "4 draw threads" in four.source
    assert technical_footprint(2000, 2000, 2, threads=4).saturation_batch is None
    with pytest.raises(ValueError, match="threads"):
        technical_footprint(2000, 2000, 2, threads=0)

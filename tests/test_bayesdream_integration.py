"""bayesdream_routing on fakes that reproduce bayesDREAM's Predictive patterns
(tests/bayesdream_fakes.py): one planned technical call instead of its batches, the same keys,
shapes and dtypes as unrouted, observed sites as one shared copy, the object's device
following the batches, everything restored, and the trans stage under a real memory cap."""

from __future__ import annotations

import json
import sys
import types

import tests.runner_fakes

import pyro
import pytest
import torch

from bayesDREAM_ext.fit import fit_technical
from bayesDREAM_ext.routing import RULE, ObjectDevice, bayesdream_routing, one_planned_call
from tests.support.child import cgroup_unavailable_reason, run_child
from tests.bayesdream_fakes import make_object
from tests.runner_fakes import FakeGpu, fake_gpu

QUIET = dict(progress=False, seed=0)
PYRO_PREDICTIVE = pyro.infer.Predictive


def fitted_object():
    """A fake object after a (short) technical fit, as a user's script has it before fit_cis."""
    obj = make_object()
    fit_technical(obj, niters=5, nsamples=8, **QUIET)
    return obj


def signature(samples: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {name: (tuple(value.shape), value.dtype, value.device.type) for name, value in samples.items()}


def test_technical_batches_become_one_planned_call():
    obj = make_object()
    plain = obj.fit_technical(nsamples=25)
    assert obj._technical_fitter.predictive_calls == [(10, False), (10, False), (5, False)]
    obj._technical_fitter.predictive_calls.clear()
    with bayesdream_routing(obj, **QUIET):
        routed = obj.fit_technical(nsamples=25)
    assert obj._technical_fitter.predictive_calls == [(25, True)]
    assert signature(routed) == signature(plain)
    assert RULE not in vars(obj._technical_fitter) and obj._technical_fitter.rule == (10, False)


@pytest.mark.parametrize("stage", ["cis", "trans"])
def test_routed_stages_return_the_unrouted_keys_shapes_and_dtypes(stage):
    obj = fitted_object()
    run = getattr(obj, f"fit_{stage}")
    plain = run(nsamples=30)
    with bayesdream_routing(obj, **QUIET):
        routed = run(nsamples=30)
    assert signature(routed) == signature(plain)
    assert pyro.infer.Predictive is PYRO_PREDICTIVE


def test_the_cis_minibatch_path_runs_routed_though_its_model_cannot_be_vectorised():
    obj = fitted_object()
    with pytest.raises(RuntimeError, match="expand"):
        obj.fit_cis(nsamples=10, minibatch_size=4)
    with bayesdream_routing(obj, **QUIET):
        samples = obj.fit_cis(nsamples=10, minibatch_size=4)
    assert samples["log2_x_eff_g"].shape == (12, 5)


def test_observed_sites_come_back_as_one_shared_copy():
    obj = fitted_object()
    with bayesdream_routing(obj, **QUIET):
        cis = obj.fit_cis(nsamples=40)
        trans = obj.fit_trans(nsamples=40)
    counts = torch.tensor(obj.get_modality("gene").counts.T, dtype=torch.float32)
    assert trans["y_obs"].stride(0) == 0 and torch.equal(trans["y_obs"][17], counts)
    assert cis["x_obs"].stride(0) == 0 and cis["x_obs"].shape == (40, 120)


class NumberedCpu(FakeGpu):
    """A fake "cuda:0" whose torch device is ``cpu:0``: a device of its own name that runs."""

    def torch_device(self, device: str) -> torch.device:
        return torch.device("cpu", 0)


def test_the_object_device_follows_the_batches_and_their_fall_back_to_the_host(monkeypatch):
    obj = fitted_object()
    obj.out_of_memory_on = torch.device("cpu", 0)
    monkeypatch.setattr(tests.runner_fakes, "FakeGpu", NumberedCpu)
    with fake_gpu():
        with bayesdream_routing(obj, device="cuda:0", minibatch_size=4, **QUIET):
            samples = obj.fit_trans(nsamples=12)
    seen = obj._trans_fitter.devices_seen
    on_gpu = [i for i, device in enumerate(seen) if device == torch.device("cpu", 0)]
    assert on_gpu and set(seen[on_gpu[-1] + 1 :]) == {torch.device("cpu")} and len(seen) > on_gpu[-1] + 1
    assert samples["slope"].shape == (12, 1, 29) and obj.device == torch.device("cpu")


def test_everything_is_restored_when_a_stage_fails():
    obj = fitted_object()
    obj.device = torch.device("cpu", 0)
    with pytest.raises(ZeroDivisionError):
        with bayesdream_routing(obj, **QUIET):
            obj.device = torch.device("cpu")
            1 / 0
    assert pyro.infer.Predictive is PYRO_PREDICTIVE
    assert RULE not in vars(obj._technical_fitter) and obj.device == torch.device("cpu", 0)


def test_the_device_hook_moves_the_object_and_calls_the_users_hook():
    obj = make_object()
    seen = []
    hook = ObjectDevice(obj, seen.append)
    for device in ("cuda:1", "cuda:1", "cpu"):
        hook(torch.device(device))
    assert obj.device == torch.device("cpu") and hook.moves == [torch.device("cuda:1"), torch.device("cpu")]
    assert seen == [torch.device("cuda:1")] * 2 + [torch.device("cpu")]


def test_the_replacement_rule_asks_for_one_vectorised_call():
    assert one_planned_call(N=10, T=5, C=2, nsamples=1000, minibatch_size=50) == (None, True)


def test_an_object_without_the_batch_rule_is_refused_before_anything_changes():
    obj = make_object()
    del obj._technical_fitter
    with pytest.raises(RuntimeError, match="no _technical_fitter._estimate_predictive_memory_and_set_minibatch"):
        with bayesdream_routing(obj):
            pass
    assert pyro.infer.Predictive is PYRO_PREDICTIVE


@pytest.fixture
def installed_bayesdream(monkeypatch):
    """A stand-in for an installed bayesDREAM: its technical module and TechnicalFitter class."""
    fitter = type("TechnicalFitter", (), {})
    module = types.ModuleType("bayesDREAM.fitting.technical")
    module.TechnicalFitter = fitter
    for name in ("bayesDREAM", "bayesDREAM.fitting"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "bayesDREAM.fitting.technical", module)
    return fitter


def test_an_installed_bayesdream_without_the_batch_rule_is_refused(installed_bayesdream):
    with pytest.raises(RuntimeError, match="installed bayesDREAM has no TechnicalFitter"):
        with bayesdream_routing():
            pass


def test_without_an_object_the_class_rule_is_replaced_and_put_back(installed_bayesdream):
    def own_rule(self, N, T, C, nsamples, minibatch_size=None, distribution="negbinom"):
        return 10, False

    setattr(installed_bayesdream, RULE, own_rule)
    with bayesdream_routing():
        assert installed_bayesdream()._estimate_predictive_memory_and_set_minibatch(1, 2, 2, 100) == (None, True)
    assert vars(installed_bayesdream)[RULE] is own_rule


@pytest.mark.slow
def test_trans_completes_under_a_cap_where_unrouted_is_killed():
    reason = cgroup_unavailable_reason()
    if reason:
        pytest.skip(reason)
    spec = dict(N=400, T=200, S=600, stage="trans")
    outcomes = {}
    for routed in (False, True):
        child = run_child([sys.executable, "-m", "bench.w10_bayesdream", json.dumps({**spec, "routed": routed})],
                          cap_bytes=768 << 20, cap_method="cgroup", timeout=300)
        outcomes[routed] = child
    assert outcomes[False].killed, outcomes[False].stderr[-2000:]
    assert outcomes[True].ok, outcomes[True].stderr[-2000:]
    assert '"y_obs": [600, 400, 199]' in outcomes[True].stdout

from collections import OrderedDict, namedtuple

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal

from devicemem.placement import parameters_on, to_device

Pair = namedtuple("Pair", "a b")


def test_to_device_moves_every_nested_tensor_and_keeps_structure():
    x, y, z = torch.ones(2), torch.zeros(3), torch.arange(4)
    args = ({"x": x, "rest": [y, Pair(z, "label")]}, 3, None, OrderedDict(w=x))
    moved = to_device(args, "meta")
    assert type(moved) is tuple and type(moved[3]) is OrderedDict
    assert moved[0]["x"].device.type == "meta"
    assert moved[0]["rest"][0].device.type == "meta"
    assert isinstance(moved[0]["rest"][1], Pair)
    assert moved[0]["rest"][1].a.device.type == "meta" and moved[0]["rest"][1].b == "label"
    assert moved[0]["rest"][1].a.dtype == torch.int64
    assert moved[1:3] == (3, None) and moved[3]["w"].device.type == "meta"
    assert x.device.type == "cpu" and args[0]["rest"][0] is y


def test_to_device_shares_tensors_already_there():
    x = torch.ones(2)
    assert to_device([x], "cpu")[0] is x


def _model():
    with pyro.plate("p", 3):
        pyro.sample("z", dist.Normal(0.0, 1.0))


@pytest.fixture
def fitted_guide():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(_model)
    guide()
    yield guide
    pyro.clear_param_store()


class RecordingMover:
    """Stands in for a device: the 'moved' copy is shifted by 1000 so reads of it show."""

    def __init__(self, fail_after=None):
        self.devices = []
        self.fail_after = fail_after

    def __call__(self, tensor, device):
        if self.fail_after is not None and len(self.devices) == self.fail_after:
            raise torch.OutOfMemoryError("fake: no room on the device")
        self.devices.append(device)
        return tensor + 1000.0


def _snapshot(guide):
    return {name: (p, p.data_ptr(), p.detach().clone()) for name, p in guide.named_parameters()}


def _assert_restored(guide, before):
    after = dict(guide.named_parameters())
    assert after.keys() == before.keys()
    for name, (param, ptr, values) in before.items():
        assert after[name] is param
        assert param.data_ptr() == ptr
        assert torch.equal(param.detach(), values)
        assert param.device.type == "cpu" and param.requires_grad


def test_parameters_on_moves_guide_and_param_store_then_restores(fitted_guide):
    before = _snapshot(fitted_guide)
    store_params = dict(pyro.get_param_store().named_parameters())
    assert store_params, "the fitted guide registers its parameters in the param store"
    mover = RecordingMover()
    with parameters_on("cuda:1", fitted_guide, mover=mover):
        assert mover.devices == [torch.device("cuda:1")] * len(before)
        for name, (param, ptr, values) in before.items():
            assert param.data_ptr() != ptr
            assert torch.equal(param.detach(), values + 1000.0)
        for param in pyro.get_param_store().values():
            assert param.min() > 500.0
        assert fitted_guide.median()["z"].min() > 900.0
    _assert_restored(fitted_guide, before)
    assert {k: id(v) for k, v in pyro.get_param_store().named_parameters()} == {
        k: id(v) for k, v in store_params.items()
    }
    assert fitted_guide.median()["z"].abs().max() < 10.0


def test_parameters_on_restores_when_an_exception_escapes(fitted_guide):
    before = _snapshot(fitted_guide)
    with pytest.raises(KeyError, match="boom"):
        with parameters_on("cuda:0", fitted_guide, mover=RecordingMover()):
            raise KeyError("boom")
    _assert_restored(fitted_guide, before)


def test_parameters_on_restores_what_moved_when_a_move_fails(fitted_guide):
    before = _snapshot(fitted_guide)
    mover = RecordingMover(fail_after=1)
    with pytest.raises(torch.OutOfMemoryError):
        with parameters_on("cuda:0", fitted_guide, mover=mover):
            pytest.fail("the block must not run when a move fails")
    assert len(mover.devices) == 1
    _assert_restored(fitted_guide, before)


def test_parameters_on_moves_function_guide_params():
    pyro.clear_param_store()
    pyro.param("loc", torch.zeros(3))
    pyro.param("scale", torch.ones(3), constraint=dist.constraints.positive)

    def guide():
        return pyro.sample("z", dist.Normal(pyro.param("loc"), 1.0).to_event(1))

    raw = dict(pyro.get_param_store().named_parameters())
    with parameters_on("cuda:0", guide, mover=RecordingMover()):
        assert guide().min() > 900.0
        assert torch.equal(raw["scale"].detach(), torch.full((3,), 1000.0))
    assert torch.equal(pyro.param("loc").detach(), torch.zeros(3))
    assert torch.equal(pyro.param("scale").detach(), torch.ones(3))
    assert {k: id(v) for k, v in pyro.get_param_store().named_parameters()} == {
        k: id(v) for k, v in raw.items()
    }
    pyro.clear_param_store()


def test_parameters_on_same_device_touches_nothing(fitted_guide):
    ptrs = {name: p.data_ptr() for name, p in fitted_guide.named_parameters()}
    with parameters_on("cpu", fitted_guide):
        assert {name: p.data_ptr() for name, p in fitted_guide.named_parameters()} == ptrs

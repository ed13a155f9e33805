"""devicemem.routing across threads, for names imported before it, and how it reports."""

import logging
import sys
import threading
import types

import pyro
import pyro.distributions as dist
import pyro.infer
import pytest
import torch

import devicemem
from devicemem.predictive import Predictive

# In a tuple: rebind=True rebinds every module attribute that is Pyro's class, this module's too.
PYRO = (pyro.infer.Predictive,)


def model():
    with pyro.plate("plate", 3):
        return pyro.sample("y", dist.Normal(torch.zeros(3), 1.0))


def in_thread(target):
    """Run ``target`` in a new thread; return its result (or raise its exception)."""
    box = {}

    def run():
        try:
            box["value"] = target()
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_one_threads_exit_does_not_unroute_anothers_block():
    a_entered, b_entered, a_left, b_done = (threading.Event() for _ in range(4))
    seen = {}

    def thread_a():
        with devicemem.routing():
            a_entered.set()
            b_entered.wait(30)
            pyro.infer.Predictive(model, num_samples=2)
        a_left.set()
        b_done.wait(30)

    def thread_b():
        a_entered.wait(30)
        with devicemem.routing(seed=5):
            b_entered.set()
            a_left.wait(30)
            built = pyro.infer.Predictive(model, num_samples=2)
            seen["b"] = type(built), built.draw_options.seed if isinstance(built, Predictive) else None
            seen["unrouted thread"] = type(in_thread(lambda: pyro.infer.Predictive(model, num_samples=2)))
        b_done.set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert issubclass(seen["b"][0], Predictive) and seen["b"][1] == 5, "B is still inside its block when A leaves"
    assert seen["unrouted thread"] is PYRO[0], "a thread with no route of its own gets Pyro's class"
    assert pyro.infer.Predictive is PYRO[0] and pyro.infer.predictive.Predictive is PYRO[0]


@pytest.fixture
def client_module():
    """A module that ran ``from pyro.infer import Predictive`` before any routing."""
    module = types.ModuleType("routing_client")
    module.Predictive = pyro.infer.Predictive
    sys.modules[module.__name__] = module
    yield module
    del sys.modules[module.__name__]


def test_rebind_reaches_names_bound_before_routing_and_restores_them(client_module, caplog):
    with caplog.at_level(logging.WARNING, logger="devicemem.routes"):
        with devicemem.routing():
            assert type(client_module.Predictive(model, num_samples=2)) is PYRO[0], "not rebound by default"
        assert "routed no pyro.infer.Predictive" in caplog.text and "rebind=True" in caplog.text
        caplog.clear()
        with devicemem.routing(rebind=True, seed=1):
            built = client_module.Predictive(model, num_samples=2)
            assert isinstance(built, Predictive) and built.draw_options.seed == 1
            assert isinstance(built, client_module.Predictive), "isinstance against the routed name holds"
            assert type(in_thread(lambda: client_module.Predictive(model, num_samples=2))) is PYRO[0]
            unrouted = Predictive(model, num_samples=2, progress=False)
            assert unrouted()["y"].shape == (2, 3), "devicemem's own Predictive still works while rebound"
        assert caplog.text == ""
    assert client_module.Predictive is PYRO[0]
    assert pyro.infer.Predictive is PYRO[0]


def test_routed_calls_show_no_progress_bar_unless_asked(capsys):
    with devicemem.routing():
        samples = pyro.infer.Predictive(model, num_samples=4)()
    assert samples["y"].shape == (4, 3)
    assert "Predictive" not in capsys.readouterr().err, "Pyro prints nothing"
    with devicemem.routing(progress=True):
        pyro.infer.Predictive(model, num_samples=4)()
    assert "Predictive" in capsys.readouterr().err

"""devicemem.Predictive under torch's transforms does what pyro.infer.Predictive does, or
raises a ValueError naming the transform: never a crash.

The transforms run in a child process (tests/transform_child.py), so a segfault fails the
test instead of ending the suite. The segfaults this guards against: under ``torch.jit.trace``
a torch op that raises abandons the trace (the thread's tracing state becomes null) even when
the exception is caught; devicemem's ``parallel=None`` check caught the shape error of a model
that does not vectorise and carried on, and the tracer then read the null state when it
recorded the outputs. Under ``torch.func.grad`` ``Tensor.to`` of a tensor already on the device
returns a functorch wrapper instead of the tensor, so ``parameters_on`` swapped the param
store's parameters' ``.data`` for wrappers, which functorch's stack check then crashed on.
"""

import functools
import json
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoDiagonalNormal

import devicemem
from devicemem.execute.transformed import active_transform

ROOT = Path(__file__).resolve().parents[1]
GUIDES = (
    "AutoNormal", "AutoDelta", "AutoDiagonalNormal", "AutoMultivariateNormal", "AutoLowRankMultivariateNormal",
    "AutoLaplaceApproximation", "AutoStructured",
)
# (model, guides, transforms): one child each; its lines say which case a crash cut short.
CASES = [
    ("regression", GUIDES, ("trace", "functionalize")),
    ("function", ("AutoNormal", "AutoDiagonalNormal"), ("trace", "functionalize", "grad", "jvp", "vmap")),
]


@pytest.mark.parametrize("kind,guides,transforms", CASES, ids=[kind for kind, _, _ in CASES])
def test_predictive_under_transforms_matches_pyro(kind, guides, transforms):
    child = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "transform_child.py"), kind, ",".join(guides), *transforms],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )
    assert child.returncode == 0, f"rc {child.returncode}:\n{child.stdout[-2000:]}\n{child.stderr[-3000:]}"
    lines = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
    seen = {(line["guide"], line["transform"], line["class"]): line for line in lines}
    for guide in guides:
        for transform in transforms:
            pyro_line, ours = seen[guide, transform, "pyro"], seen[guide, transform, "devicemem"]
            assert ours.get("result") == pyro_line.get("result"), (guide, transform, ours, pyro_line)
            assert ours.get("error") == pyro_line.get("error"), (guide, transform, ours, pyro_line)


def _model(x):
    a = pyro.sample("a", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("plate", x.shape[0]):
        return pyro.sample("obs", dist.Normal((x * a.unsqueeze(-2)).sum(-1), 1.0))


@pytest.mark.parametrize("option,value", [("seed", 0), ("reduce", {"obs": "mean"})])
def test_options_pyro_cannot_honour_raise_naming_the_transform(option, value):
    x = torch.randn(3, 2)
    guide = AutoDiagonalNormal(_model)
    guide(x)
    predictive = devicemem.Predictive(_model, guide=guide, num_samples=4, progress=False, **{option: value})
    call = torch.func.functionalize(functools.partial(torch.func.functional_call, predictive))
    with pytest.raises(ValueError, match=f"under torch.func.functionalize .*{option}"):
        call(dict(predictive.named_parameters()), (x,))
    pyro.clear_param_store()


def test_active_transform_names_each_transform():
    seen = []

    def probe(x):
        seen.append(active_transform())
        return x * 2

    x = torch.ones(3)
    probe(x)
    torch.jit.trace(probe, (x,), check_trace=False)
    torch.func.functionalize(probe)(x)
    torch.func.grad(lambda v: probe(v).sum())(x)
    torch.func.jvp(probe, (x,), (x,))
    torch.func.vmap(probe)(x)
    assert seen == [
        None, "torch.jit.trace", "torch.func.functionalize", "torch.func.grad (or vjp)", "torch.func.jvp",
        "torch.func.vmap",
    ]

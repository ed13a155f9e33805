"""Child process for the torch-transform tests: runs one model with each autoguide under each
transform with ``pyro.infer.Predictive`` and with ``devicemem.Predictive`` and prints one JSON
line per (guide, transform, class): what came out (names and shapes) or the error's type. A
crash (the segfault this guards against) ends the process with the lines so far.

    python tests/transform_child.py <regression|function> <AutoGuide,AutoGuide,...> <transform>...

regression: Pyro's own autoguide test model (tests/infer/test_autoguide.py test_predictive, a
PyroModule with PyroSample weights; it does not vectorise under a sample plate); function: a
function model that vectorises, so devicemem's planner probes it.
"""

import functools
import io
import json
import sys
import warnings

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import autoguide
from pyro.nn import PyroModule, PyroSample

import devicemem

N, D = 3, 2


class RandomLinear(torch.nn.Linear, PyroModule):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        self.weight = PyroSample(dist.Normal(0.0, 1.0).expand([out_features, in_features]).to_event(2))
        self.bias = PyroSample(dist.Normal(0.0, 10.0).expand([out_features]).to_event(1))


class LinearRegression(PyroModule):
    def __init__(self) -> None:
        super().__init__()
        self.linear = RandomLinear(D, 1)

    def forward(self, x, y=None):
        mean = self.linear(x).squeeze(-1)
        sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
        with pyro.plate("plate", N):
            return pyro.sample("obs", dist.Normal(mean, sigma), obs=y)


def function_model(x, y=None):
    a = pyro.sample("a", dist.Normal(torch.zeros(D), 1.0).to_event(1))
    with pyro.plate("plate", N):
        return pyro.sample("obs", dist.Normal((x * a.unsqueeze(-2)).sum(-1), 1.0), obs=y)


def _shapes(value):
    if isinstance(value, dict):
        return {name: _shapes(v) for name, v in sorted(value.items())}
    if isinstance(value, (tuple, list)):
        return [_shapes(v) for v in value]
    return list(value.shape)


def _trace(predictive, x):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace_module(predictive, {"call": (x,)})
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer).call(x)


def _functionalize(predictive, x):
    call = torch.func.functionalize(functools.partial(torch.func.functional_call, predictive))
    return call(dict(predictive.named_parameters()), (x,))


def _grad(predictive, x):
    def mean(params):
        return torch.func.functional_call(predictive, params, (x,))["obs"].mean()

    return torch.func.grad(mean)(dict(predictive.named_parameters()))


def _jvp(predictive, x):
    params = dict(predictive.named_parameters())
    call = torch.func.functionalize(functools.partial(torch.func.functional_call, predictive))
    tangents = {name: torch.ones_like(value) for name, value in params.items()}
    return torch.func.jvp(lambda p: call(p, (x,))["obs"].mean(0), (params,), (tangents,))


def _vmap(predictive, x):
    return torch.func.vmap(lambda xi: predictive(xi)["obs"], randomness="different")(x.expand(4, N, D))


TRANSFORMS = {"trace": _trace, "functionalize": _functionalize, "grad": _grad, "jvp": _jvp, "vmap": _vmap}


def main() -> None:
    kind, guides, *transforms = sys.argv[1:]
    for guide_name in guides.split(","):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        _run(kind, guide_name, transforms)


def _run(kind: str, guide_name: str, transforms: list[str]) -> None:
    x, y = torch.randn(N, D), torch.randn(N)
    model = LinearRegression() if kind == "regression" else function_model
    guide = getattr(autoguide, guide_name)(model)
    guide(x, y=y)
    for transform in transforms:
        for name, make in (
            ("pyro", lambda: pyro.infer.Predictive(model, guide=guide, num_samples=10)),
            ("devicemem", lambda: devicemem.Predictive(model, guide=guide, num_samples=10, progress=False)),
        ):
            try:
                line = {"result": _shapes(TRANSFORMS[transform](make(), x))}
            except Exception as exc:
                line = {"error": type(exc).__name__, "message": str(exc)[:300]}
            print(json.dumps({"guide": guide_name, "transform": transform, "class": name, **line}), flush=True)


if __name__ == "__main__":
    main()

"""A Predictive call under a torch transform: Pyro's own code, or a clear error.

Under ``torch.jit.trace`` and the ``torch.func`` transforms (functionalize, grad/vjp, jvp,
vmap) devicemem's executors cannot run: the planner and the ``parallel=None`` check catch
exceptions from torch ops, and an op that raises under ``torch.jit.trace`` abandons the trace
(the tracer then reads a dropped state: a segmentation fault); parameters are moved with
``.data`` swaps and ``Tensor.to``, which a functorch transform answers with wrapped tensors;
storages are measured (functional tensors have no data pointer) and draws run on worker
threads. So a call there runs ``pyro.infer.Predictive`` on the same model, guide, posterior,
``num_samples``, ``return_sites`` and ``parallel`` (None as Pyro's default, False), and traces
and transforms as Pyro's does.
"""

from __future__ import annotations

from typing import Any

import pyro.infer.predictive
import torch
from torch import Tensor

from devicemem.execute.request import Request

# Pyro's class, bound before any devicemem.routing() can replace the module attribute.
PYRO_PREDICTIVE = pyro.infer.predictive.Predictive
# functorch's transforms by the interpreter that runs them.
_FUNCTORCH_TRANSFORMS = {
    "Functionalize": "torch.func.functionalize", "Grad": "torch.func.grad (or vjp)", "Jvp": "torch.func.jvp",
    "Vmap": "torch.func.vmap",
}


def active_transform() -> str | None:
    """The name of the torch transform running this code: ``torch.jit.trace``, a ``torch.func``
    transform (read from functorch's interpreter stack, as torch has no public predicate for
    them), else None."""
    if torch.jit.is_tracing():
        return "torch.jit.trace"
    interpreter = torch._C._functorch.peek_interpreter_stack()
    if interpreter is not None:
        return _FUNCTORCH_TRANSFORMS.get(interpreter.key().name, f"torch.func ({interpreter.key().name})")
    return None


def run(request: Request, transform: str, args: tuple, kwargs: dict) -> dict[str, Tensor]:
    """Pyro's Predictive on ``request`` under ``transform``; ValueError naming the transform
    and the options Pyro's code cannot honour (``out``, ``reduce``, ``resume``, ``seed``,
    sharding). Device, memory caps, threads and the progress bar do not apply there."""
    refused = [
        name for name, given in (
            ("out", request.output.out is not None), ("reduce", bool(request.output.reduce)),
            ("resume", request.output.resume), ("seed", request.draw.seed is not None),
            ("sharding (device list, 'all' or backend)", request.memory.sharding is not None),
        ) if given
    ]
    if refused:
        raise ValueError(
            f"devicemem.Predictive under {transform} runs pyro.infer.Predictive's own code, which cannot honour "
            f"{', '.join(refused)}; call it outside {transform}, or leave these options out"
        )
    predictive: Any = PYRO_PREDICTIVE(
        request.model, posterior_samples=dict(request.posterior_samples) or None, guide=request.guide,
        num_samples=request.num_samples, return_sites=request.return_sites, parallel=bool(request.draw.parallel),
    )
    return predictive(*args, **kwargs)

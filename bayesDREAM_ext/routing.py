"""Route bayesDREAM's own Predictive calls through devicemem, unchanged user scripts around it
(moved here from ``devicemem.integrations.bayesdream``, which forwards to it for one release).

bayesDREAM (statisticalbiotechnology/bayesDREAM) spells every call ``pyro.infer.Predictive(...)``
at call time, so :func:`devicemem.routing` reaches all of them: its technical step's
caller-made batches, its cis model (which only runs unvectorised, called with no
``parallel``) and its trans model (whose memory grows as [B, B, N, T] under a sample plate).
On top of that, :func:`bayesdream_routing`

- replaces the technical step's own batch rule (``TechnicalFitter.`` :data:`RULE`) so that
  ``fit_technical`` makes one call of all its samples, which devicemem batches by measurement;
- keeps the object's ``device`` on the device each batch runs on (its models build tensors on
  ``model.__self__.model.device``), moving with a fall-back to the host, and puts it back as
  it was when the context ends.

bayesDREAM need not be installed to import this module.
"""

from __future__ import annotations

import importlib
import logging
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator

import torch

from devicemem.routes import routing

logger = logging.getLogger("devicemem.bayesdream.routing")

RULE = "_estimate_predictive_memory_and_set_minibatch"
FITTER = "_technical_fitter"
TECHNICAL_MODULE = "bayesDREAM.fitting.technical"


def one_planned_call(
    N: int, T: int, C: int, nsamples: int, minibatch_size: int | None = None, distribution: str = "negbinom",
    safety_factor: float | None = None,
) -> tuple[None, bool]:
    """bayesDREAM's batch rule while routed: no minibatch, vectorised, so that its
    ``fit_technical`` hands all ``nsamples`` to one (devicemem) Predictive call."""
    given = f" (its minibatch_size={minibatch_size} is not used: pass minibatch_size= to bayesdream_routing to fix batches)" if minibatch_size else ""
    logger.info(
        "[MEMORY] bayesDREAM fit_technical: one Predictive call of %d samples (N=%d, T=%d, C=%d), batched by "
        "devicemem, instead of its own batch rule%s", nsamples, N, T, C, given,
    )
    return None, True


class ObjectDevice:
    """``on_device`` hook: sets ``model_obj.device`` to each device batches are about to run on
    (then calls ``then``, a hook of the caller's, if any)."""

    def __init__(self, model_obj: Any, then: Callable[[torch.device], None] | None = None) -> None:
        self.model_obj = model_obj
        self.then = then
        self.moves: list[torch.device] = []

    def __call__(self, device: torch.device) -> None:
        device = torch.device(device)
        if self.model_obj.device != device:
            logger.info("[MEMORY] bayesDREAM object's device %s -> %s: the next batches run there", self.model_obj.device, device)
            self.model_obj.device = device
            self.moves.append(device)
        if self.then is not None:
            self.then(device)


@contextmanager
def _replaced(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.name = value`` for the duration, then exactly what was there before (an
    instance attribute removed again, so that the class's method shows through)."""
    had_own = name in vars(owner)
    before = vars(owner).get(name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if had_own:
            setattr(owner, name, before)
        else:
            delattr(owner, name)


def _rule_owner(model_obj: Any) -> tuple[Any, Any] | None:
    """(where to put the replacement rule, the replacement): on the object's technical fitter,
    or on bayesDREAM's TechnicalFitter class; None when bayesDREAM is not installed."""
    if model_obj is not None:
        fitter = getattr(model_obj, FITTER, None)
        if fitter is None or not callable(getattr(fitter, RULE, None)):
            raise RuntimeError(
                f"bayesdream_routing: model_obj has no {FITTER}.{RULE}(); this bayesDREAM version is not one "
                "devicemem knows (checked against commit 8dd6414), so its technical batch rule cannot be replaced"
            )
        return fitter, one_planned_call
    try:
        module = importlib.import_module(TECHNICAL_MODULE)
    except ModuleNotFoundError:
        logger.info("bayesdream_routing: bayesDREAM is not installed; only pyro.infer.Predictive is routed")
        return None
    fitter_class = getattr(module, "TechnicalFitter", None)
    if fitter_class is None or not callable(getattr(fitter_class, RULE, None)):
        raise RuntimeError(
            f"bayesdream_routing: the installed bayesDREAM has no TechnicalFitter.{RULE}(); this version is not "
            "one devicemem knows (checked against commit 8dd6414), so its technical batch rule cannot be replaced"
        )
    return fitter_class, staticmethod(one_planned_call)


@contextmanager
def bayesdream_routing(model_obj: Any = None, **predictive_options: Any) -> Iterator[None]:
    """Route every ``pyro.infer.Predictive`` that bayesDREAM builds through devicemem.

    ``predictive_options`` go to every devicemem Predictive (``device``, ``max_memory``,
    ``minibatch_size``, ``seed``, ``progress``, ...) and win over bayesDREAM's own arguments;
    ``parallel`` defaults to None (vectorise where the model allows it, else one sample at a
    time), so that its cis minibatch path, which asks for ``parallel=True`` on a model that
    cannot be vectorised, runs. With ``model_obj`` (the bayesDREAM
    object) its ``device`` follows the batches, so ``device`` defaults to "auto"; without it
    the batches stay where devicemem is told, by default the host, where bayesDREAM's
    technical step runs Predictive. The technical batch rule is replaced on ``model_obj``'s
    fitter, or on bayesDREAM's TechnicalFitter class; RuntimeError, before anything is
    changed, if that bayesDREAM has no such rule. Everything is restored on exit, error or not.
    """
    owner = _rule_owner(model_obj)
    options = dict(predictive_options)
    with ExitStack() as stack:
        if owner is not None:
            stack.enter_context(_replaced(owner[0], RULE, owner[1]))
        if model_obj is not None:
            stack.enter_context(_replaced(model_obj, "device", model_obj.device))
            options["on_device"] = ObjectDevice(model_obj, options.get("on_device"))
        else:
            options.setdefault("device", "cpu")
        options.setdefault("parallel", None)
        stack.enter_context(routing(**options))
        yield

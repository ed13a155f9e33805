"""How a Pyro model observes an exact likelihood: one ``pyro.factor`` site outside the data plates.

The exact likelihoods return the total over all cells and features: a scalar, or one total per
element of the parameters' batch dims. Placed inside the cell and feature plates, Pyro would
broadcast that total to [N, T] (an error under validation, N x T copies of it without), so
the site sits outside them, where its ``log_prob_sum`` is the total itself. Trace_ELBO and
TraceMeanField_ELBO add an observed site's ``log_prob_sum`` to the ELBO as they do for the
dense ``y_obs``, ``poutine.scale`` scales it, and the latent sites, their priors and the guide
are untouched, so the loss and its gradients are the dense model's. Inside batch plates that
hold no data (Predictive's vectorised samples, vectorised ELBO particles) the totals carry
one value per batch element and are placed at those plates' dims. The site keeps its name
(``y_obs``) but holds no data: posterior-predictive draws of ``y_obs`` run the model with the
dense distribution (``counts=None``), as before.
"""

from __future__ import annotations

import pyro
from pyro.poutine.runtime import get_plates
from torch import Tensor


def observe_total(name: str, log_likelihood: Tensor) -> None:
    """Add ``log_likelihood`` (a total over the data from a ``*Stats.log_prob``, one per
    element of each enclosing batch plate) to the model as the observed site ``name``.

    Raises where its shape is not one total per enclosing plate element, as in a cell or
    feature plate, where Pyro would count a total once per cell or feature.
    """
    frames = sorted(get_plates(), key=lambda frame: frame.dim)
    sizes = tuple(frame.size for frame in frames)
    if tuple(log_likelihood.shape) != sizes:
        plates = {frame.name: frame.size for frame in frames}
        raise ValueError(
            f"site {name!r}: an exact likelihood is one total over all cells and features (one per element of "
            f"the enclosing plates {plates}), got shape {list(log_likelihood.shape)}; observe it outside the data plates"
        )
    if frames:
        shape = [1] * -frames[0].dim
        for frame in frames:
            shape[frame.dim] = frame.size
        log_likelihood = log_likelihood.reshape(shape)
    pyro.factor(name, log_likelihood)

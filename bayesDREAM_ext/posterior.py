"""bayesDREAM's shapes for the drawn samples: what Predictive returns, made into what
bayesDREAM's own ``fit_technical`` stores.

Pyro pads per-feature sites only as deep as the model nests plates (less with one group), a
single group has no effect site at all, and the excluded features were never fitted:
:func:`assemble` pads every site to its full depth, adds the empty effect sites and the full-C
effect tensors (``alpha_y_mult``, baseline row 1; ``alpha_y_add``, baseline row 0) and scatters
every feature-wise site back over all T features, excluded ones holding their site's fill value.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bayesDREAM_ext.data import TechnicalData
from bayesDREAM_ext.model import CATEGORY_SITES, SITE_FILL

EFFECT_SITES = ("log2_alpha_y", "alpha_y_mul", "delta_y_add")
CATEGORY_EFFECT_SITES = ("alpha_logits_y", "alpha_logits_y_centered")


# Sites' dimensions as Pyro returns them when the model nests plates to its full depth; with
# a single group there is no group plate, Pyro pads less, and these restore the same shapes.
SITE_DIMS = {"beta_o": 3, "o_y": 3, "mu_ntc": 3, "sigma_y": 3, "probs_baseline_raw": 5, "probs_baseline": 5}


def _pad(value: Tensor, ndim: int) -> Tensor:
    """``value`` with singleton dims after the sample dim up to ``ndim`` dims."""
    return value.reshape(value.shape[:1] + (1,) * (ndim - value.dim()) + value.shape[1:])


def _complete(samples: dict[str, Tensor], data: TechnicalData) -> dict[str, Tensor]:
    """bayesDREAM's shapes for every group count: pad per-feature sites, add the empty effect
    sites of a single group, and the full-C effect tensors."""
    samples = {name: _pad(value, SITE_DIMS[name]) if name in SITE_DIMS else value for name, value in samples.items()}
    n = next(iter(samples.values())).shape[0]
    tail = (data.n_features, data.n_categories) if data.distribution == "multinomial" else (data.n_features,)
    names = CATEGORY_EFFECT_SITES if data.distribution == "multinomial" else EFFECT_SITES
    for name in names:
        samples.setdefault(name, torch.zeros((n, 0) + tail))
    if data.distribution == "multinomial":
        effect = samples["alpha_logits_y_centered"]
        samples["alpha_y_add"] = torch.cat([torch.zeros((n, 1) + tail), effect], dim=1)
        return samples
    samples["alpha_y_mult"] = torch.cat([torch.ones((n, 1) + tail), samples["alpha_y_mul"]], dim=1)
    samples["alpha_y_add"] = torch.cat([torch.zeros((n, 1) + tail), samples["delta_y_add"]], dim=1)
    return samples


def _scatter(samples: dict[str, Tensor], data: TechnicalData) -> dict[str, Tensor]:
    """Every feature-wise site over all T features; excluded ones get the site's fill value."""
    fills = {**SITE_FILL, "alpha_y_mult": 1.0, "alpha_y_add": 0.0}
    keep = torch.from_numpy(data.feature_mask)
    out = {}
    for name, value in samples.items():
        if name not in fills:
            out[name] = value
            continue
        axis = -2 if name in CATEGORY_SITES or (name == "alpha_y_add" and data.distribution == "multinomial") else -1
        shape = list(value.shape)
        shape[axis] = keep.numel()
        full = torch.full(shape, fills[name], dtype=value.dtype)
        index = [slice(None)] * value.dim()
        index[axis] = keep
        full[tuple(index)] = value
        out[name] = full
    return out


def assemble(samples: dict[str, Tensor], data: TechnicalData) -> dict[str, Tensor]:
    """Predictive's ``samples`` in bayesDREAM's shapes, over all T features (see the module)."""
    return _scatter(_complete(samples, data), data)

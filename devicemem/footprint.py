"""Footprint estimators: how many bytes a Predictive batch of B samples needs on a device."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Footprint:
    """Peak memory of one Predictive call as ``fixed_bytes + per_sample_bytes * batch_size``.

    ``fixed_bytes`` covers what exists whatever the batch (data and guide parameters on the
    device, Pyro's unvectorised shape-guessing trace); ``per_sample_bytes`` what one more
    vectorised sample adds. ``source`` says how it was obtained ("analytic", "probe", ...).
    """

    fixed_bytes: int
    per_sample_bytes: int
    source: str

    def peak_bytes(self, batch_size: int) -> int:
        """Predicted peak for a vectorised batch of ``batch_size`` samples."""
        return self.fixed_bytes + self.per_sample_bytes * batch_size

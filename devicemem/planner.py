"""The planner: which device, how many samples per batch, vectorised or sequential, and why."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Plan:
    """A decision for one Predictive run; ``reasons`` are the sentences behind each choice.

    ``predicted_peak_bytes`` is the working memory of one batch on ``device``;
    ``output_bytes`` the host memory the full result [num_samples, ...] takes.
    """

    device: str
    num_samples: int
    batch_size: int
    n_batches: int
    vectorized: bool
    predicted_peak_bytes: int | None
    budget_bytes: int | None
    safety_factor: float
    output_bytes: int | None
    reasons: tuple[str, ...]

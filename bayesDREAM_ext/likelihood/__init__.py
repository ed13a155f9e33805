"""Exact technical likelihoods from statistics of the data, made once.

The technical models' parameters are per feature and per (group, feature); only the
negative binomial's mean also carries a per-cell sum factor. So every likelihood's sum over
cells splits exactly into terms that need far less than the [N, T] matrix:

- :class:`NegBinomialStats` (negbinom): the non-zero counts, their per-feature histogram and
  the cells' sum factors; value and gradient in one fused, blocked, multi-threaded pass
  (:mod:`~bayesDREAM_ext.likelihood.negbinom`), one log per cell and feature plus one per
  non-zero count;
- :class:`NormalStats`, :class:`BinomialStats`, :class:`MultinomialStats`: per-(group, feature)
  sufficient statistics, O(C T) per evaluation; :class:`StudentTStats`: the non-zero values
  plus one weighted zero per (group, feature), O(nnz + C T)
  (:mod:`~bayesDREAM_ext.likelihood.groupwise`).

Each ``*Stats.log_prob`` returns the total log-likelihood that Pyro's dense distribution gives
(float64: equal within the dense evaluation's own rounding), differentiable in the model's
parameters; :func:`observe_total` puts it into a model as the observed site.
Statistics are built from dense tensors / arrays or scipy.sparse matrices without densifying
the sparse ones; ``.nbytes`` says what they hold.
"""

from bayesDREAM_ext.likelihood.groupwise import BinomialStats, MultinomialStats, NormalStats, StudentTStats
from bayesDREAM_ext.likelihood.negbinom import NegBinomialStats
from bayesDREAM_ext.likelihood.site import observe_total

__all__ = ["BinomialStats", "MultinomialStats", "NegBinomialStats", "NormalStats", "StudentTStats", "observe_total"]

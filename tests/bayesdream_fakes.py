"""A fake bayesDREAM object whose fitters reproduce bayesDREAM's patterns (written here from
its public description, not its code), for the write-back and routing tests and bench W10.

Patterns reproduced (as bayesDREAM at commit 8dd6414 calls Predictive):
- the object keeps ``meta`` (cell, target, technical_group_code, sum_factor), ``counts``
  (genes x cells, DataFrame, with the cis gene), a ``gene`` modality without the cis gene and
  a ``cis`` modality with it, ``device``; its fitters reach it as ``self.model``;
- models are bound methods building tensors on ``self.model.device``;
- technical: its own batch rule ``_estimate_predictive_memory_and_set_minibatch`` gives a
  minibatch and ``use_parallel``; one ``pyro.infer.Predictive`` per caller-made batch (a new
  one for a smaller last batch), ``parallel=use_parallel``, filled into CPU buffers;
- cis: ``Predictive(model, guide=AutoNormalMessenger, num_samples=S)`` with no ``parallel``;
  the model does ``mu.expand(G)``, which fails under any sample plate; with ``minibatch_size``,
  one ``parallel=True`` Predictive called ceil(S / minibatch) times (so it overshoots S);
- trans: the same call; under a sample plate ``phi_y.unsqueeze(-2)`` makes the likelihood's
  parameters [B, B, N, T]; the observed ``y_obs`` comes back too.
``fit_cis`` / ``fit_trans`` first read what a technical fit leaves on the object and raise
:class:`MissingTechnicalFit` on anything missing or mis-shaped.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoNormal, AutoNormalMessenger
from torch import Tensor

from bayesDREAM_ext.synthetic import synthetic_technical

CIS_SITES = ("log2_alpha_x", "alpha_x_mul", "delta_x_add", "o_x", "mu_ntc", "alpha_x_mult", "alpha_x", "alpha_x_add")
FLAGS = ("ntc_zero_count", "ntc_zero_std", "ntc_single_category", "ntc_excluded_from_fit", "technical_correction_applied")


class MissingTechnicalFit(AssertionError):
    """What bayesDREAM's fit_cis / fit_trans would trip over: a result missing or mis-shaped."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise MissingTechnicalFit(message)


class FakeModality:
    """A modality as bayesDREAM keeps one: features x cells counts and per-feature metadata."""

    def __init__(self, name: str, counts: pd.DataFrame, distribution: str = "negbinom") -> None:
        self.name = name
        self.distribution = distribution
        self.cells_axis = 1
        self.counts = counts.to_numpy()
        self.feature_names = list(counts.index)
        self.cell_names = list(counts.columns)
        self.feature_meta = pd.DataFrame({"feature": self.feature_names})
        self.denominator = None
        self.alpha_y_prefit_mult: Tensor | None = None
        self.alpha_y_prefit_add: Tensor | None = None
        self.alpha_y_type: str | None = None
        self.posterior_samples_technical: dict[str, Tensor] | None = None

    @property
    def alpha_y_prefit(self) -> Tensor | None:
        return self.alpha_y_prefit_mult if self.distribution == "negbinom" else self.alpha_y_prefit_add

    def is_exon_skipping(self) -> bool:
        return False


class FakeTechnicalFitter:
    """bayesDREAM's technical step: its batch rule, then caller-made Predictive batches."""

    def __init__(self, model: FakeBayesDREAM, rule: tuple[int | None, bool] = (10, False)) -> None:
        self.model = model
        self.rule = rule
        self.predictive_calls: list[tuple[int, Any]] = []
        self.devices_seen: list[torch.device] = []

    def _estimate_predictive_memory_and_set_minibatch(self, N, T, C, nsamples, minibatch_size=None, distribution="negbinom"):
        return self.rule

    def _model_technical(self, N, T, C, groups, y_obs, sum_factors, skip_obs_sampling=False):
        device = self.model.device
        self.devices_seen.append(device)
        features = pyro.plate("features", T, dim=-1)
        with features:
            mu_ntc = pyro.sample("mu_ntc", dist.Gamma(torch.full((), 2.0, device=device), torch.ones((), device=device)))
            o_y = pyro.sample("o_y", dist.Exponential(torch.ones((), device=device)))
            with pyro.plate("c_plate", C - 1, dim=-2):
                log2_alpha_y = pyro.sample("log2_alpha_y", dist.StudentT(3.0, torch.zeros((), device=device), 1.0))
                alpha_y_mul = pyro.deterministic("alpha_y_mul", 2.0**log2_alpha_y)
        if skip_obs_sampling:
            return
        ones = torch.ones(alpha_y_mul.shape[:-2] + (1, T), device=device)
        alpha = torch.cat([ones, alpha_y_mul], dim=-2)[..., groups, :]
        phi = 1.0 / o_y**2
        mu = mu_ntc * alpha * sum_factors[:, None]
        with pyro.plate("cells", N, dim=-2), features:
            pyro.sample("y_obs_ntc", dist.NegativeBinomial(phi, logits=torch.log(mu + 1e-8) - torch.log(phi)), obs=y_obs)

    def fit_technical(self, nsamples: int = 100, minibatch_size: int | None = None, steps: int = 3) -> dict[str, Tensor]:
        meta = self.model.meta
        ntc = (meta["target"] == "ntc").to_numpy()
        y = torch.tensor(self.model.counts.to_numpy()[:, ntc].T, dtype=torch.float32, device=self.model.device)
        N, T = y.shape
        C = int(meta["technical_group_code"].nunique())
        inputs = {
            "N": N, "T": T, "C": C,
            "groups": torch.tensor(meta["technical_group_code"].to_numpy()[ntc], device=self.model.device),
            "y_obs": y,
            "sum_factors": torch.tensor(meta["sum_factor"].to_numpy()[ntc], dtype=torch.float32, device=self.model.device),
        }
        pyro.clear_param_store()
        guide = AutoNormal(self._model_technical)
        svi = pyro.infer.SVI(self._model_technical, guide, pyro.optim.Adam({"lr": 0.01}), pyro.infer.Trace_ELBO())
        for _ in range(steps):
            svi.step(**inputs)
        minibatch_size, use_parallel = self._estimate_predictive_memory_and_set_minibatch(
            N=N, T=T, C=C, nsamples=nsamples, minibatch_size=minibatch_size
        )
        inputs["skip_obs_sampling"] = True
        batch = minibatch_size or nsamples
        predictive = pyro.infer.Predictive(self._model_technical, guide=guide, num_samples=batch, parallel=use_parallel)
        samples: dict[str, Tensor] = {}
        with torch.no_grad():
            for start in range(0, nsamples, batch):
                size = min(batch, nsamples - start)
                if size < batch:
                    predictive = pyro.infer.Predictive(self._model_technical, guide=guide, num_samples=size, parallel=use_parallel)
                self.predictive_calls.append((size, use_parallel))
                for name, value in predictive(**inputs).items():
                    samples.setdefault(name, torch.empty((nsamples,) + value.shape[1:], dtype=value.dtype))
                    samples[name][start : start + size] = value.detach().cpu()
        return samples


class FakeCisFitter:
    """bayesDREAM's cis step: reads the technical fit, then a Predictive with no ``parallel``
    on a model that cannot be vectorised."""

    def __init__(self, model: FakeBayesDREAM) -> None:
        self.model = model
        self.devices_seen: list[torch.device] = []

    def _model_x(self, x_obs, guides, alpha_x, G):
        device = self.model.device
        self.devices_seen.append(device)
        mu = pyro.sample("mu_x", dist.Normal(torch.zeros((), device=device), 1.0))
        with pyro.plate("guides", G, dim=-1):
            log2_x_eff_g = pyro.sample("log2_x_eff_g", dist.Normal(mu.expand(G), 1.0))
        with pyro.plate("cells", x_obs.shape[0], dim=-1):
            pyro.sample("x_obs", dist.Normal(log2_x_eff_g[..., guides] + alpha_x, 1.0), obs=x_obs)

    def fit_cis(self, nsamples: int = 50, minibatch_size: int | None = None) -> dict[str, Tensor]:
        obj = self.model
        meta = obj.meta
        C = int(meta["technical_group_code"].nunique())
        prefit = obj.alpha_x_prefit
        _require(isinstance(prefit, Tensor), f"alpha_x_prefit is {type(prefit).__name__}, not a tensor")
        _require(obj.alpha_x_type == "posterior", f"alpha_x_type is {obj.alpha_x_type!r}")
        _require(prefit.dim() == 2 and prefit.shape[1] == C, f"alpha_x_prefit has shape {tuple(prefit.shape)}, not [S, {C}]")
        _require(bool(torch.isfinite(prefit).all() and (prefit > 0).all()), "alpha_x_prefit is not finite and positive")
        cis = obj.get_modality("cis").posterior_samples_technical or {}
        missing = [name for name in CIS_SITES if name not in cis]
        _require(not missing, f"cis modality posterior_samples_technical lacks {missing}")
        _require(tuple(cis["alpha_x_mult"].shape) == (prefit.shape[0], C, 1), f"alpha_x_mult has shape {tuple(cis['alpha_x_mult'].shape)}")
        groups = torch.tensor(meta["technical_group_code"].to_numpy(), device=obj.device)
        alpha_x = torch.log2(prefit.mean(dim=0)).to(obj.device)[groups]
        guides = torch.tensor(meta["guide_code"].to_numpy(), device=obj.device)
        x_obs = torch.tensor(obj.get_modality("cis").counts[0], dtype=torch.float32, device=obj.device).log1p()
        args = (x_obs, guides, alpha_x, int(guides.max()) + 1)
        guide = AutoNormalMessenger(self._model_x)
        guide(*args)
        if minibatch_size is None:
            return pyro.infer.Predictive(self._model_x, guide=guide, num_samples=nsamples)(*args)
        predictive = pyro.infer.Predictive(self._model_x, guide=guide, num_samples=minibatch_size, parallel=True)
        parts = [predictive(*args) for _ in range(0, nsamples, minibatch_size)]
        return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


class FakeTransFitter:
    """bayesDREAM's trans step: reads the technical fit, then a Predictive with no
    ``parallel`` on a model whose memory grows as [B, B, N, T] under a sample plate."""

    def __init__(self, model: FakeBayesDREAM) -> None:
        self.model = model
        self.devices_seen: list[torch.device] = []

    def _model_y(self, y_obs, x_true, alpha_y):
        device = self.model.device
        self.devices_seen.append(device)
        if device == self.model.out_of_memory_on:
            raise torch.OutOfMemoryError(f"fake: {device} is full")
        N, T = y_obs.shape
        with pyro.plate("features", T, dim=-1):
            phi_y = pyro.sample("phi_y", dist.Gamma(torch.full((), 5.0, device=device), torch.ones((), device=device)))
            slope = pyro.sample("slope", dist.Normal(torch.zeros((), device=device), 1.0))
        with pyro.plate("cells", N, dim=-2), pyro.plate("features_obs", T, dim=-1):
            mu = torch.exp(slope * x_true[:, None]) * alpha_y
            phi = phi_y.unsqueeze(-2)
            pyro.sample("y_obs", dist.NegativeBinomial(phi, logits=torch.log(mu) - torch.log(phi)), obs=y_obs)

    def fit_trans(self, nsamples: int = 50) -> dict[str, Tensor]:
        obj = self.model
        gene = obj.get_modality("gene")
        meta = obj.meta
        C = int(meta["technical_group_code"].nunique())
        prefit = gene.alpha_y_prefit
        shape = (C, len(gene.feature_names))
        _require(isinstance(prefit, Tensor), f"gene alpha_y_prefit is {type(prefit).__name__}, not a tensor")
        _require(gene.alpha_y_type == "posterior", f"gene alpha_y_type is {gene.alpha_y_type!r}")
        _require(prefit.dim() == 3 and tuple(prefit.shape[1:]) == shape, f"gene alpha_y_prefit has shape {tuple(prefit.shape)}, not [S, {C}, {shape[1]}]")
        technical = gene.posterior_samples_technical or {}
        _require(all(technical[name].shape[-1] == shape[1] for name in ("log2_alpha_y", "mu_ntc", "o_y")), "gene posterior_samples_technical still holds the cis gene")
        table = obj.counts_meta
        _require(all(column in table.columns for column in FLAGS) and len(table) == len(obj.counts), "counts_meta lacks the feature flags")
        groups = torch.tensor(meta["technical_group_code"].to_numpy(), device=obj.device)
        alpha_y = torch.nan_to_num(prefit.mean(dim=0), nan=1.0).to(obj.device)[groups]
        y_obs = torch.tensor(gene.counts.T, dtype=torch.float32, device=obj.device)
        x_true = torch.tensor(obj.get_modality("cis").counts[0], dtype=torch.float32, device=obj.device).log1p()
        args = (y_obs, x_true - x_true.mean(), alpha_y)
        guide = AutoNormalMessenger(self._model_y)
        guide(*args)
        return pyro.infer.Predictive(self._model_y, guide=guide, num_samples=nsamples)(*args)


class FakeBayesDREAM:
    """The attributes of a bayesDREAM object that fit_technical reads and writes."""

    def __init__(self, counts: pd.DataFrame, meta: pd.DataFrame, cis_gene: str, device: str = "cpu") -> None:
        self.meta = meta
        self.counts = counts
        self.cis_gene = cis_gene
        self.primary_modality = "gene"
        self.modalities = {
            "gene": FakeModality("gene", counts.drop(index=cis_gene)),
            "cis": FakeModality("cis", counts.loc[[cis_gene]]),
        }
        self.device = torch.device(device)
        self.alpha_x_prefit: Tensor | None = None
        self.alpha_x_type: str | None = None
        self.out_of_memory_on: torch.device | None = None  # the trans model raises OOM there
        self._technical_fitter = FakeTechnicalFitter(self)
        self._cis_fitter = FakeCisFitter(self)
        self._trans_fitter = FakeTransFitter(self)

    def get_modality(self, name: str) -> FakeModality:
        return self.modalities[name]

    def fit_technical(self, **kwargs: Any) -> dict[str, Tensor]:
        return self._technical_fitter.fit_technical(**kwargs)

    def fit_cis(self, **kwargs: Any) -> dict[str, Tensor]:
        return self._cis_fitter.fit_cis(**kwargs)

    def fit_trans(self, **kwargs: Any) -> dict[str, Tensor]:
        return self._trans_fitter.fit_trans(**kwargs)


def make_object(n_cells: int = 120, n_genes: int = 30, n_groups: int = 2, seed: int = 0, cis_position: int = 3) -> FakeBayesDREAM:
    """A fake object: every cell in a technical group, half of them NTC, the rest spread over
    four guides; gene ``cis_position`` is the cis gene; the last gene has no NTC counts."""
    data = synthetic_technical(n_cells, n_genes, n_groups, seed=seed)
    rng = np.random.default_rng(seed)
    counts = data.counts.T.astype(np.int64)
    ntc = rng.permutation(np.arange(n_cells) % 2 == 0)
    for group in range(n_groups):
        ntc[np.flatnonzero(data.groups == group)[:2]] = True
    counts[-1, ntc] = 0
    cells = [f"cell{i}" for i in range(n_cells)]
    genes = [f"gene{i}" for i in range(n_genes)]
    guide_code = np.where(ntc, 0, 1 + rng.integers(0, 4, n_cells))
    meta = pd.DataFrame({
        "cell": cells,
        "target": np.where(ntc, "ntc", "GFI1B"),
        "guide_code": guide_code,
        "technical_group_code": data.groups,
        "sum_factor": data.sum_factors,
    })
    return FakeBayesDREAM(pd.DataFrame(counts, index=genes, columns=cells), meta, cis_gene=genes[cis_position])

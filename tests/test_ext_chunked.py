"""The exact chunked gradient: equal to full-data SVI's for every distribution, ragged last
chunk, minibatches, OOM recovery inside a step, checkpoints that resume bit-identically."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyro
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from bayesDREAM_ext.chunked import CellData, ChunkedELBO
from bayesDREAM_ext.counts import Counts
from bayesDREAM_ext.data import prepare_technical
from bayesDREAM_ext.model import ModelInputs, build_model_inputs
from bayesDREAM_ext.synthetic import synthetic_data
from bayesDREAM_ext.memory import plan_training, technical_latent_size
from bayesDREAM_ext.training import SVIOptions, make_guide, train

DISTRIBUTIONS = ["negbinom", "normal", "studentt", "binomial", "multinomial"]
CPU = torch.device("cpu")
SVI_OPTIONS = dict(lr=1e-3, tolerance=0.0, alpha_ewma=0.05, progress=False, seed=0)


def inputs_for(distribution: str, n_cells: int = 103, n_features: int = 12, n_groups: int = 3) -> ModelInputs:
    data = synthetic_data(distribution, n_cells, n_features, n_groups, seed=1)
    return build_model_inputs(prepare_technical(data.counts, data.groups, distribution=distribution, denominator=data.denominator))


def in_double(inputs: ModelInputs) -> ModelInputs:
    def double(value):
        if isinstance(value, Counts):
            return value.astype(torch.float64)
        return value.double() if torch.is_tensor(value) and value.is_floating_point() else value

    return dataclasses.replace(
        inputs, arguments={k: double(v) for k, v in inputs.arguments.items()},
        init_values={k: double(v) for k, v in inputs.init_values.items()},
    )


def one_step_gradients(inputs: ModelInputs, chunk: int | None, dtype=torch.float32, guide_kind: str = "normal"):
    """Loss and parameter gradients of one step (seed 0): Pyro's full-data ELBO, or chunked."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    latent = technical_latent_size(inputs.kwargs["counts"].shape[1], inputs.kwargs["n_groups"])
    guide = make_guide(inputs, guide_kind, latent, CPU)  # the latent size matters only to AutoIAFNormal (negbinom here)
    elbo = (TraceMeanField_ELBO if guide_kind == "normal" else Trace_ELBO)(max_plate_nesting=inputs.max_plate_nesting)
    if chunk is None:
        loss = elbo.loss_and_grads(inputs.model, guide, **inputs.kwargs)
    else:
        cells = CellData({k: inputs.kwargs[k] for k in inputs.cell_keys}, device=CPU, storage=CPU, compact=True, dtype=dtype)
        loss = ChunkedELBO(elbo, cells, chunk).loss_and_grads(inputs.model, guide, **{**inputs.kwargs, **{k: None for k in inputs.cell_keys}})
    return loss, {name: p.grad.clone() for name, p in guide.named_parameters()}


# Gradients of float64 runs that sum the same terms in another order (chunks of cells) agree to
# float64's 2.2e-16 times the cancellation in the negative binomial's dispersion gradient (terms
# ~1e4 x larger than the result) times ~100 cells: ~2e-10, whatever the CPU's summation order.
FLOAT64_GRADIENT_RTOL = 1e-9


@pytest.mark.parametrize("chunk", [10, 7])  # 103 cells: 10 chunks of 10 and one of 3; 14 of 7 and one of 5
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_one_chunked_step_has_the_full_data_gradient(distribution, chunk):
    """In float64, so that the comparison sees the algebra, not float32 cancellation."""
    inputs = in_double(inputs_for(distribution))
    full_loss, full = one_step_gradients(inputs, None)
    chunk_loss, chunked = one_step_gradients(inputs, chunk, torch.float64)
    assert chunk_loss == pytest.approx(full_loss, rel=1e-10)
    assert full.keys() == chunked.keys() and len(full) >= 4
    for name in full:
        torch.testing.assert_close(chunked[name], full[name], rtol=FLOAT64_GRADIENT_RTOL, atol=1e-12, msg=name)
        assert full[name].abs().max() > 0, name


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_float64_inputs_keep_every_latent_and_guide_parameter_in_float64(distribution):
    """The float64 comparison above is float64 throughout: no prior built from a constant in
    torch's default dtype (float32) drags a latent site, and with it its guide parameters
    and their gradients, into float32."""
    inputs = in_double(inputs_for(distribution))
    trace = prune_subsample_sites(poutine.trace(inputs.model).get_trace(**inputs.kwargs))
    latent = {name: site["value"].dtype for name, site in trace.iter_stochastic_nodes()}
    assert set(latent.values()) == {torch.float64}, latent
    pyro.clear_param_store()
    guide = make_guide(inputs, "normal", 0, CPU)
    guide(**inputs.kwargs)
    parameters = {name: p.dtype for name, p in guide.named_parameters()}
    assert set(parameters.values()) == {torch.float64}, parameters


def test_one_chunked_step_of_an_iaf_guide_has_the_full_data_gradient():
    torch.set_default_dtype(torch.float64)  # AutoIAFNormal's weights follow the default dtype
    try:
        inputs = in_double(inputs_for("negbinom", n_features=5))
        full_loss, full = one_step_gradients(inputs, None, guide_kind="iaf")
        chunk_loss, chunked = one_step_gradients(inputs, 10, torch.float64, guide_kind="iaf")
    finally:
        torch.set_default_dtype(torch.float32)
    assert chunk_loss == pytest.approx(full_loss, rel=1e-10) and len(full) >= 4
    for name in full:
        torch.testing.assert_close(chunked[name], full[name], rtol=FLOAT64_GRADIENT_RTOL, atol=1e-12, msg=name)


def cpu_plan(inputs: ModelInputs, distribution: str, chunk: int | None = None, minibatch: int | None = None):
    counts = inputs.kwargs["counts"]
    return plan_training(
        counts.shape[0], counts.shape[1], inputs.kwargs["n_groups"], counts.shape[2] if counts.dim() == 3 else 1,
        distribution=distribution, device="cpu", safety_factor=0.8, chunk_cells=chunk, minibatch=minibatch,
    )


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_twenty_chunked_steps_follow_the_full_data_losses(distribution):
    inputs = inputs_for(distribution)
    full = train(inputs, cpu_plan(inputs, distribution), SVIOptions(niters=20, **SVI_OPTIONS))
    plan = cpu_plan(inputs, distribution, chunk=25)
    assert (plan.chunk_cells, plan.chunks_per_step) == (25, 5)  # ragged: 4 x 25 + 3
    chunked = train(inputs, plan, SVIOptions(niters=20, **SVI_OPTIONS))
    assert full.plan.chunk_cells is None and chunked.plan.chunk_cells == 25
    np.testing.assert_allclose(chunked.losses, full.losses, rtol=1e-4)
    assert chunked.learning_rates == full.learning_rates


def test_minibatches_scale_the_likelihood_by_n_over_b():
    inputs = inputs_for("negbinom")
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = make_guide(inputs, "normal", 0, CPU)
    elbo = TraceMeanField_ELBO(max_plate_nesting=2)
    exact = elbo.loss(inputs.model, guide, **inputs.kwargs)
    cells = CellData({k: inputs.kwargs[k] for k in inputs.cell_keys}, device=CPU, storage=CPU, compact=False)
    stochastic = ChunkedELBO(elbo, cells, 7, minibatch=20)
    kwargs = {**inputs.kwargs, **{k: None for k in inputs.cell_keys}}
    estimates = [stochastic.loss(inputs.model, guide, **kwargs) for _ in range(40)]
    assert stochastic.chunks_per_step() == 3
    assert np.std(estimates) > 0  # a different random subset every step
    assert np.mean(estimates) == pytest.approx(exact, rel=0.05)  # unbiased up to the guide's own noise


def test_svi_minibatch_trains_and_learns():
    inputs = inputs_for("negbinom")
    plan = cpu_plan(inputs, "negbinom", minibatch=40)
    assert plan.minibatch == 40 and plan.chunk_cells == 40
    result = train(inputs, plan, SVIOptions(niters=60, **SVI_OPTIONS))
    assert sum(result.losses[-10:]) < sum(result.losses[:10])


def test_an_out_of_memory_chunk_is_redone_smaller_without_losing_the_step():
    inputs = inputs_for("negbinom")
    reference = train(inputs, cpu_plan(inputs, "negbinom", chunk=13), SVIOptions(niters=5, **SVI_OPTIONS))
    calls = []

    def runs_out_on_big_chunks(*args, **kwargs):
        if kwargs.get("observe", True) and kwargs["counts"].shape[0] > 13:
            calls.append(kwargs["counts"].shape[0])
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes (fake)")
        return inputs.model(*args, **kwargs)

    failing = dataclasses.replace(inputs, model=runs_out_on_big_chunks)
    result = train(failing, cpu_plan(inputs, "negbinom", chunk=52), SVIOptions(niters=5, **SVI_OPTIONS))
    assert calls == [52, 26] and result.plan.chunk_cells == 13
    assert "ran out of memory" in result.plan.reasons[-1] and "chunks of 13" in result.plan.reasons[-1]
    np.testing.assert_allclose(result.losses, reference.losses, rtol=1e-5)


@pytest.mark.parametrize("chunk", [None, 30])
def test_a_run_killed_mid_training_resumes_bit_identically(tmp_path, chunk):
    inputs = inputs_for("negbinom")
    plan = cpu_plan(inputs, "negbinom", chunk=chunk)
    straight = train(inputs, plan, SVIOptions(niters=20, **SVI_OPTIONS))
    steps = []

    def killed_in_step_12(*args, **kwargs):
        if kwargs.get("observe", True) is False or chunk is None:
            steps.append(1)
        if len(steps) > 12:
            raise KeyboardInterrupt("killed")
        return inputs.model(*args, **kwargs)

    path = tmp_path / "svi.pt"
    with pytest.raises(KeyboardInterrupt):
        train(dataclasses.replace(inputs, model=killed_in_step_12), plan, SVIOptions(niters=20, checkpoint=path, checkpoint_every=5, **SVI_OPTIONS))
    assert torch.load(path, weights_only=True)["step"] == 10 and not (tmp_path / "svi.pt.partial").exists()
    resumed = train(inputs, plan, SVIOptions(niters=20, resume=path, **{**SVI_OPTIONS, "seed": 123}))
    assert resumed.losses == straight.losses and resumed.learning_rates == straight.learning_rates
    for name, value in straight.guide.state_dict().items():
        assert torch.equal(resumed.guide.state_dict()[name], value), name


def test_resume_rejects_a_checkpoint_of_another_fit(tmp_path):
    inputs = inputs_for("negbinom")
    path = tmp_path / "svi.pt"
    train(inputs, cpu_plan(inputs, "negbinom"), SVIOptions(niters=2, checkpoint=path, **SVI_OPTIONS))
    other = inputs_for("negbinom", n_cells=60)
    with pytest.raises(ValueError, match="resume: .* was written for"):
        train(other, cpu_plan(other, "negbinom"), SVIOptions(niters=2, resume=path, **SVI_OPTIONS))
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="resume: cannot read"):
        train(other, cpu_plan(other, "negbinom"), SVIOptions(niters=2, resume=tmp_path / "junk.pt", **SVI_OPTIONS))


def test_compact_dtype_is_the_smallest_exact_one():
    def compact_dtype(values):
        return Counts(values).compact_dtype

    assert compact_dtype(torch.tensor([0.0, 255.0])) == torch.uint8
    assert compact_dtype(torch.tensor([0.0, 256.0])) == torch.int16
    assert compact_dtype(torch.tensor([0.0, 40000.0])) == torch.int32
    assert compact_dtype(torch.tensor([0.5, 1.0])) == torch.float32
    assert compact_dtype(torch.tensor([-1.0, 1.0])) == torch.float32


@pytest.mark.slow
def test_a_fit_predicted_at_twice_the_cap_trains_in_chunks_inside_it(tmp_path):
    """A real memory cgroup (RLIMIT_AS where none can be made) of 550 MiB around a fresh
    child; the full-data step of 4000 x 4000 is predicted at 1.17 GB, more than twice that.
    (The child's peak RSS also counts shared-library pages the cgroup does not charge, so
    the cap's verdict is that it was not killed.)"""
    import json
    import sys
    from pathlib import Path

    from bayesDREAM_ext.synthetic import synthetic_technical
    from bayesDREAM_ext.memory import training_footprint
    from tests.support.child import run_child

    n_cells, n_features, cap = 4000, 4000, 550 * 2**20
    assert training_footprint(n_cells, n_features, 2) > 2 * cap
    data = synthetic_technical(n_cells, n_features, 2, seed=0)
    np.savez(tmp_path / "data.npz", counts=data.counts.astype(np.uint16), groups=data.groups, sum_factors=data.sum_factors, truth=data.log2_alpha_true)
    del data
    root = Path(__file__).resolve().parents[1]
    child = run_child([sys.executable, str(root / "tests" / "ext_fit_child.py"), str(tmp_path / "data.npz"), "2"],
                      cap_bytes=cap, env={"PYTHONPATH": str(root)}, timeout=600)
    assert child.ok, (child.killed, child.stderr[-2000:])
    found = json.loads(child.stdout.strip().splitlines()[-1])
    assert found["chunk_cells"] < n_cells and found["chunks_per_step"] >= 2 and found["steps"] == 2
    assert found["predicted"] <= found["budget"] and found["measured"] <= found["budget"]
    assert found["shapes"]["log2_alpha_y"] == [20, 1, n_features] and found["shapes"]["mu_ntc"] == [20, 1, n_features]
    assert found["r"] > 0.9


@pytest.mark.parametrize("distribution", ["negbinom", "normal"])
def test_sparse_input_stays_sparse_and_trains_to_the_same_losses(distribution):
    from scipy import sparse

    from bayesDREAM_ext.fit import fit_technical

    data = synthetic_data(distribution, 90, 15, 2, seed=3)
    counts = np.where(np.random.default_rng(0).random(data.counts.shape) < 0.5, 0, data.counts).astype(np.float32)
    prepared = prepare_technical(sparse.csr_matrix(counts), data.groups, distribution=distribution)
    assert prepared.counts.sparse and sparse.issparse(prepared.counts.values)
    dense_prepared = prepare_technical(counts, data.groups, distribution=distribution)
    np.testing.assert_array_equal(prepared.counts.array(), dense_prepared.counts.array())
    options = dict(distribution=distribution, device="cpu", niters=8, nsamples=4, seed=0, progress=False)
    for chunk in (None, 20):
        dense = fit_technical(counts, data.groups, svi_chunk=chunk, **options)
        from_sparse = fit_technical(sparse.csr_matrix(counts), data.groups, svi_chunk=chunk, **options)
        assert from_sparse.losses == dense.losses and from_sparse.svi_plan.chunk_cells == chunk
        torch.testing.assert_close(from_sparse.posterior_samples["mu_ntc"], dense.posterior_samples["mu_ntc"], equal_nan=True)


def test_fit_technical_checkpoints_and_resumes(tmp_path):
    from bayesDREAM_ext.fit import fit_technical

    data = synthetic_data("negbinom", 80, 10, 2, seed=2)
    options = dict(device="cpu", niters=9, nsamples=4, seed=0, progress=False, svi_chunk=30)
    straight = fit_technical(data.counts, data.groups, **options)
    path = tmp_path / "svi.pt"
    fit_technical(data.counts, data.groups, checkpoint=path, checkpoint_every=4, **{**options, "niters": 9})
    assert torch.load(path, weights_only=True)["step"] == 9
    resumed = fit_technical(data.counts, data.groups, resume=path, **options)  # nothing left to run: the saved losses
    assert resumed.losses == straight.losses
    with pytest.raises(ValueError, match="resume: no such checkpoint file"):
        fit_technical(data.counts, data.groups, resume=tmp_path / "missing.pt", **options)

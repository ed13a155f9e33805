"""Out-of-memory recovery: bisect, keep the size that worked, fall back to the host; exact
results; guide parameters restored whatever escapes."""

import logging

import pytest
import torch

from bayesDREAM_ext.model import technical_model
from devicemem import placement
from devicemem.execute import local
from devicemem.predictive import Predictive
from tests.runner_fakes import CPU_OOM, Faulty, expected_from_report, fake_gpu, make_plan


def _assert_exact(model, guide, runner, result, seed, args, num_samples):
    rows = [(row.start, row.size) for row in runner.report]
    starts = [start for start, _ in rows]
    assert starts == sorted(starts) and sum(size for _, size in rows) == num_samples
    assert all(a + n == b for (a, n), (b, _) in zip(rows, rows[1:])), "no sample skipped or repeated"
    expected = expected_from_report(model, guide, runner.report, seed, args)
    for name in expected:
        assert result[name].shape[0] == num_samples
        assert torch.equal(result[name], expected[name]), name


@pytest.mark.parametrize(
    "device, error",
    [
        ("cpu", lambda: RuntimeError(CPU_OOM)),
        ("cuda:0", lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")),
    ],
    ids=["cpu-allocator", "torch-OutOfMemoryError"],
)
def test_oom_at_batch_k_halves_and_keeps_the_size_that_worked(problem, device, error, caplog):
    args, guide = problem
    faulty = Faulty(technical_model, error, fail_calls=(3,))
    with fake_gpu(watch=faulty) as gpu, caplog.at_level(logging.WARNING, logger="devicemem"):
        runner = Predictive(faulty, guide=guide, parallel=True, num_samples=30, seed=8, plan=make_plan(30, 8, device), progress=False)
        result = runner(*args)
    assert faulty.failed == [8]
    assert [(row.start, row.size, row.retries) for row in runner.report] == [
        (0, 8, 0), (8, 8, 0), (16, 4, 1), (20, 4, 0), (24, 4, 0), (28, 2, 0)
    ]
    assert {row.device for row in runner.report} == {device}
    assert "[MEMORY] out of memory on %s with a batch of 8 samples (from sample 16); retrying with 4" % device in caplog.text
    if device != "cpu":
        assert gpu.emptied_after_release == [True], "memory is freed after the except block lets go"
    _assert_exact(technical_model, guide, runner, result, 8, args, 30)


def test_bisects_down_to_what_the_gpu_holds(problem):
    args, guide = problem
    with fake_gpu() as gpu:
        faulty = gpu.watch = Faulty(technical_model, lambda: torch.OutOfMemoryError("fake"),
                                    too_big=lambda size: gpu.active and size > 3)
        runner = Predictive(faulty, guide=guide, parallel=True, num_samples=13, seed=2, plan=make_plan(13, 16, "cuda:0"),
                            progress=False)
        result = runner(*args)
    assert faulty.failed == [13, 6]
    assert [(row.size, row.retries, row.device) for row in runner.report] == [
        (3, 2, "cuda:0"), (3, 0, "cuda:0"), (3, 0, "cuda:0"), (3, 0, "cuda:0"), (1, 0, "cuda:0")
    ]
    assert gpu.emptied_after_release == [True, True]
    _assert_exact(technical_model, guide, runner, result, 2, args, 13)


def test_falls_back_to_the_host_when_the_gpu_cannot_hold_one_sample(problem, caplog):
    args, guide = problem
    with fake_gpu() as gpu, caplog.at_level(logging.WARNING, logger="devicemem"):
        faulty = gpu.watch = Faulty(technical_model, lambda: torch.OutOfMemoryError("fake"),
                                    too_big=lambda size: gpu.active)
        runner = Predictive(faulty, guide=guide, parallel=True, num_samples=10, seed=3, plan=make_plan(10, 4, "cuda:0"),
                            progress=False)
        result = runner(*args)
    assert faulty.failed == [4, 2, 1]
    assert runner.report[0].device == "cpu" and runner.report[0].retries == 3
    assert {row.device for row in runner.report} == {"cpu"}
    assert "[MEMORY] cuda:0 cannot hold one sample; moving the remaining 10 samples (from 0) to cpu" in caplog.text
    assert gpu.emptied_after_release == [True, True, True]
    _assert_exact(technical_model, guide, runner, result, 3, args, 10)


def test_host_oom_at_one_sample_ends_in_a_memory_error_with_advice(problem):
    args, guide = problem
    faulty = Faulty(technical_model, lambda: RuntimeError(CPU_OOM), too_big=lambda size: True)
    runner = Predictive(faulty, guide=guide, parallel=True, num_samples=4, plan=make_plan(4, 2), progress=False)
    with pytest.raises(MemoryError, match=r"out of host memory drawing one sample \(sample 0 of 4\).*out=DIR") as oom:
        runner(*args)
    assert "DefaultCPUAllocator" in str(oom.value.__cause__)
    assert faulty.failed == [2, 1]


def test_memory_error_in_the_two_sample_vectorisation_check_draws_one_sample_at_a_time(problem, caplog):
    args, guide = problem
    faulty = Faulty(technical_model, MemoryError, fail_calls=(1,))  # the first vectorised run: parallel=None's check
    with caplog.at_level(logging.INFO, logger="devicemem"):
        runner = Predictive(faulty, guide=guide, num_samples=6, seed=4, progress=False)
        result = runner(*args)
    assert faulty.failed == [2]
    assert (runner.plan.batch_size, runner.plan.vectorized) == (1, False) and sum(r.size for r in runner.report) == 6
    assert "parallel=None: two vectorised samples ran out of memory (MemoryError)" in caplog.text
    assert result["y_obs"].shape[0] == 6 and bool(torch.all(result["o_y"] > 0))


def test_memory_error_in_the_first_probe_batch_plans_one_sample_at_a_time(problem, caplog):
    args, guide = problem
    faulty = Faulty(technical_model, MemoryError, fail_calls=(1,))  # parallel=True: the probe's first batch
    with caplog.at_level(logging.WARNING, logger="devicemem"):
        runner = Predictive(faulty, guide=guide, parallel=True, num_samples=6, seed=4, progress=False)
        result = runner(*args)
    assert faulty.failed == [1] and set(faulty.sizes[1:]) == {1}, "after the probe, plates of one sample"
    assert (runner.plan.batch_size, runner.plan.n_batches, runner.plan.vectorized) == (1, 6, False)
    assert "ran out of memory in the probe's first batch (MemoryError); drawing one sample at a time" in caplog.text
    _assert_exact(technical_model, guide, runner, result, 4, args, 6)


def test_memory_error_in_every_vectorised_draw_ends_in_a_memory_error_with_advice(problem):
    args, guide = problem
    faulty = Faulty(technical_model, MemoryError, too_big=lambda size: True)
    runner = Predictive(faulty, guide=guide, parallel=True, num_samples=4, progress=False)
    with pytest.raises(MemoryError, match=r"out of host memory drawing one sample \(sample 0 of 4\).*out=DIR"):
        runner(*args)
    assert faulty.failed == [1, 1], "the probe's first batch, then one sample of the smaller plan"


def test_other_errors_are_not_retried(problem):
    args, guide = problem
    faulty = Faulty(technical_model, lambda: ValueError("a bug in the model"), fail_calls=(2,))
    runner = Predictive(faulty, guide=guide, parallel=True, num_samples=9, plan=make_plan(9, 3), progress=False)
    with pytest.raises(ValueError, match="a bug in the model"):
        runner(*args)
    assert faulty.failed == [3] and len(runner.report) == 1


def test_guide_parameters_restored_after_an_escaping_exception(problem, monkeypatch):
    args, guide = problem
    before = {name: (p, p.data_ptr(), p.detach().clone()) for name, p in guide.named_parameters()}
    moves = []

    def mover(tensor, device):
        moves.append(device)
        return tensor.clone()

    monkeypatch.setattr(local, "parameters_on", lambda device, g: placement.parameters_on(device, g, mover=mover))
    seen = []

    def model(*model_args):
        seen.append({name: p.data_ptr() for name, p in guide.named_parameters()})
        if len(seen) > 3:
            raise KeyError("escapes mid-run")
        return technical_model(*model_args)

    with fake_gpu():
        runner = Predictive(model, guide=guide, parallel=True, num_samples=9, plan=make_plan(9, 3, "cuda:0"), progress=False)
        with pytest.raises(KeyError, match="escapes mid-run"):
            runner(*args)
    assert moves == [torch.device("cpu")] * len(before), "the guide's parameters went to the fake GPU's device"
    assert all(ptrs[name] != before[name][1] for ptrs in seen[1:] for name in before), "the model ran on the moved copies"
    for name, param in guide.named_parameters():
        original, ptr, values = before[name]
        assert param is original and param.data_ptr() == ptr and torch.equal(param.detach(), values)

"""Bad input fails with a clear ValueError before any sampling."""

import os

import pytest
import torch

from bayesDREAM_ext.model import technical_model
from devicemem.predictive import Predictive
from tests.runner_fakes import CPU_OOM, Faulty, make_plan


@pytest.mark.parametrize("num_samples", [0, -3, 2.5, True])
def test_num_samples_must_be_a_positive_integer(problem, num_samples):
    _, guide = problem
    with pytest.raises(ValueError, match="num_samples: expected an integer >= 1"):
        Predictive(technical_model, guide=guide, num_samples=num_samples)


def test_num_samples_or_posterior_samples_are_needed_as_in_pyro(problem):
    _, guide = problem
    with pytest.raises(ValueError, match="Either posterior_samples or num_samples must be specified"):
        Predictive(technical_model, guide=guide)
    with pytest.raises(ValueError, match="No sample sites in posterior samples to infer `num_samples`"):
        Predictive(technical_model, posterior_samples={})


def test_guide_and_posterior_samples_exclude_each_other(problem):
    _, guide = problem
    with pytest.raises(ValueError, match="`posterior_samples` cannot be provided with the `guide` argument"):
        Predictive(technical_model, guide=guide, posterior_samples={"beta_o": torch.ones(3)})


def test_posterior_samples_need_one_leading_dim():
    with pytest.raises(ValueError, match=r"leading dims differ: \{'beta_o': 3, 'o_y': 4\}"):
        Predictive(technical_model, posterior_samples={"beta_o": torch.ones(3), "o_y": torch.ones(4, 5)})
    with pytest.raises(ValueError, match=r"posterior_samples\['beta_o'\]: expected a tensor"):
        Predictive(technical_model, posterior_samples={"beta_o": 1.0})


@pytest.mark.parametrize(
    "reduce, message",
    [
        ({"y_obs": ("mean", "median")}, r"reduce\['y_obs'\]: unknown statistic\(s\) \['median'\]"),
        ({"y_obs": ()}, r"reduce\['y_obs'\]: unknown statistic"),
        (["y_obs"], "reduce: expected a dict"),
    ],
)
def test_reduce_statistics_are_checked_at_construction(problem, reduce, message):
    _, guide = problem
    with pytest.raises(ValueError, match=message):
        Predictive(technical_model, guide=guide, num_samples=3, reduce=reduce)


def test_out_must_be_writable(problem, tmp_path):
    _, guide = problem
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    with pytest.raises(ValueError, match="out: cannot write numpy memmaps into"):
        Predictive(technical_model, guide=guide, num_samples=3, out=blocked / "results")
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="out: cannot write numpy memmaps into"):
            Predictive(technical_model, guide=guide, num_samples=3, out=locked)


def test_plan_excludes_planner_arguments(problem):
    _, guide = problem
    with pytest.raises(ValueError, match="plan replaces the planner"):
        Predictive(technical_model, guide=guide, num_samples=4, plan=make_plan(4, 2), minibatch_size=2)
    with pytest.raises(ValueError, match="plan is for 4 samples but num_samples is 5"):
        Predictive(technical_model, guide=guide, num_samples=5, plan=make_plan(4, 2))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"reduce": {"nope": "mean"}}, r"reduce: site\(s\) \['nope'\] are not among the returned sites"),
        ({"return_sites": ["beta_o"], "reduce": {"y_obs": "var"}}, r"reduce: site\(s\) \['y_obs'\]"),
    ],
)
def test_unknown_sites_fail_before_sampling(problem, options, message):
    args, guide = problem
    faulty = Faulty(technical_model, lambda: AssertionError("sampled"))
    runner = Predictive(faulty, guide=guide, parallel=True, num_samples=4, plan=make_plan(4, 2), progress=False, **options)
    with pytest.raises(ValueError, match=message):
        runner(*args)
    assert faulty.sizes == [] and runner.report == []


def test_results_larger_than_host_memory_fail_before_sampling_without_out(problem):
    args, guide = problem
    faulty = Faulty(technical_model, lambda: RuntimeError(CPU_OOM))
    runner = Predictive(faulty, guide=guide, parallel=True, num_samples=2000, plan=make_plan(2000, 100), progress=False,
                        max_memory={"cpu": "2MB"})
    with pytest.raises(ValueError, match=r"results need 4\.62 MB of host memory \(.*y_obs 3\.84 MB.*only 2\.00 MB"
                                         r" is usable; pass out=DIR"):
        runner(*args)
    assert faulty.sizes == []


@pytest.mark.parametrize("threads", [0, -2, 1.5, True])
def test_threads_must_be_a_positive_integer(problem, threads):
    _, guide = problem
    with pytest.raises(ValueError, match="threads: expected an int"):
        Predictive(technical_model, guide=guide, num_samples=3, threads=threads)

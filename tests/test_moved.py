"""Names that moved from devicemem to bayesDREAM_ext keep working at their old place for one
release, each with a DeprecationWarning naming its new home (devicemem.integrations.moved)."""

from __future__ import annotations

import importlib

import pytest

from devicemem.integrations.moved import MOVED

ALIASES = sorted((module, name) for module, name in MOVED if module != "devicemem.cli")


@pytest.mark.parametrize("module, name", ALIASES, ids=[f"{m}.{n}" for m, n in ALIASES])
def test_an_old_name_warns_and_is_the_new_object(module, name):
    new_module, _, new_name = MOVED[(module, name)].partition(":")
    with pytest.warns(DeprecationWarning, match=f"{module}.{name} moved to {new_module}.{new_name}"):
        old = getattr(importlib.import_module(module), name)
    assert old is getattr(importlib.import_module(new_module), new_name)


def test_the_old_top_level_plan_still_plans():
    import devicemem

    with pytest.warns(DeprecationWarning):
        plan = devicemem.plan_technical(3000, 4000, 2, 1000, max_memory="cpu=2GB")
    assert (plan.device, plan.n_batches, plan.vectorized) == ("cpu", 1, True)


def test_a_name_that_never_existed_is_still_an_attribute_error():
    import devicemem
    import devicemem.planner

    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        devicemem.no_such_name  # noqa: B018
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        devicemem.planner.no_such_name  # noqa: B018


def test_devicemem_plan_runs_bayesdream_ext_plan_predictive_and_says_so(capsys):
    from devicemem.cli import main

    with pytest.warns(DeprecationWarning):
        code = main(["plan", "--json", "--max-memory", "cpu=2GB", "--cells", "300", "--features", "400",
                     "--groups", "2", "--samples", "100"])
    captured = capsys.readouterr()
    assert code == 0 and '"batch_size": 100' in captured.out
    assert "devicemem plan is deprecated: it moved to bayesDREAM_ext.cli:plan_predictive_main" in captured.err

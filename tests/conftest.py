"""Fixtures shared by the runner's test modules."""

import pyro
import pytest

from tests.runner_fakes import technical_problem


@pytest.fixture
def problem():
    """(posterior-predictive args, an AutoNormal guide) of the small technical problem; the
    param store is cleared afterwards."""
    args, guide = technical_problem()
    yield args, guide
    pyro.clear_param_store()

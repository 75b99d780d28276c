"""The ``mode`` fixture of the fast-path tests: every run mode of tests/ops/run_modes.py (a test
narrows it with ``@pytest.mark.parametrize("mode", run_modes.TRITON_MODES, indirect=True)``)."""

import pytest

from tests.ops import run_modes


@pytest.fixture(params=run_modes.ALL_MODES)
def mode(request) -> run_modes.RunMode:
    return run_modes.RunMode(request.param).prepare()

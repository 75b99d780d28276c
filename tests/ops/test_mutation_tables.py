"""The recorded mutation campaigns stay runnable: every edit they list still finds its line, once,
in the current code (a kernel change that moves a line must update the campaign, or its re-run
would report "not applicable" instead of killed / survived)."""

from __future__ import annotations

import pytest

from tests.ops import cuda_mutations, triton_mutations
from tests.ops.mutants import ROOT

_EDITS = [(f"triton-{n}", m) for n, m in enumerate(triton_mutations.MUTATIONS, 1)]
_EDITS += [(f"cuda-{n}", m) for n, m in sorted(cuda_mutations.MUTATIONS.items())]


@pytest.mark.parametrize("label, mutation", _EDITS, ids=[label for label, _ in _EDITS])
def test_every_recorded_mutation_still_applies(label, mutation):
    path, old, new, what = mutation
    assert old != new, f"{label} ({what}) changes nothing"
    count = (ROOT / path).read_text().count(old)
    assert count == 1, f"{label} ({what}): its line occurs {count} times in {path}"

"""Behaviour kept across the model-seam refactor: the reference runs of tests/reference/ rerun identically.

The reference JSON was written by the commit before the refactor (see tests/reference/seam_reference.py).
On the CPU model and torch version that wrote it, metrics and every trained tensor must be bit-identical;
elsewhere kernels may round differently, so metrics are compared to 1e-4 and weights are not compared.
"""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "reference"))
import seam_reference  # noqa: E402

REFERENCE = json.loads((Path(__file__).parent / "reference" / "seam_reference.json").read_text())


@pytest.fixture(scope="module")
def current_runs():
    return seam_reference.run_all(ids=sorted({key.split("|")[0] for key in REFERENCE["runs"]}))


def _close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) or (math.isnan(a) and math.isnan(b))
    return a == b


@pytest.mark.parametrize("key", sorted(REFERENCE["runs"]))
def test_reference_run_unchanged(current_runs, key):
    ref, now = REFERENCE["runs"][key], current_runs[key]
    if seam_reference.machine() == REFERENCE["machine"]:
        assert now["metrics"] == ref["metrics"], f"{key}: metrics differ from the pre-refactor reference"
        assert now["weights"] == ref["weights"], f"{key}: trained weights differ from the pre-refactor reference"
    else:
        assert _close(now["metrics"], ref["metrics"]), f"{key}: metrics differ beyond rounding"
        assert now["weights"].keys() == ref["weights"].keys()

"""estimate agrees with simulate within 3% on peak allocated (issue 3)."""

import pytest

from vramplan.simulate.accuracy import MATRIX_CI, TOLERANCE, compare, full_matrix


def _id(case):
    return ",".join(f"{k}={v}" for k, v in case.items())


@pytest.mark.parametrize("case", MATRIX_CI, ids=_id)
def test_estimate_matches_simulate(case):
    result = compare(case)
    assert abs(result.error) <= TOLERANCE, (
        f"estimate {result.estimated:,} vs simulate {result.simulated:,} ({100 * result.error:+.2f}%)")


@pytest.mark.slow
@pytest.mark.parametrize("case", full_matrix(), ids=_id)
def test_full_matrix(case):
    result = compare(case)
    assert abs(result.error) <= TOLERANCE

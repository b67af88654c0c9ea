"""The estimate against the CUDA profiles stored in the repository (profiles/h200, measured on an
NVIDIA H200 by scripts/gpu_campaign.sh): the issue's targets hold, on every change.

The measurements are fixed data; a change to the estimator that moves a prediction away from
what the GPU measured fails here. The context figure was taken from these same profiles (their
median), so device used is partly in-sample; peak allocated and reserved are not fitted to them.
"""

from pathlib import Path

import pytest

from vramplan.profile.validate import Metric, validate

PROFILES = Path(__file__).resolve().parents[2] / "profiles"


@pytest.fixture(scope="module")
def result():
    return validate(PROFILES, simulate=False)


def row(result, metric):
    return next(r for r in result.rows_for("cuda") if r.source == "estimate" and r.metric is metric)


def test_the_store_holds_the_campaign_and_nothing_is_wrong_with_it(result):
    assert result.problems == []
    cuda = [c for c in result.cases if c.device == "cuda"]
    assert len(cuda) >= 34
    models = {c.profile.spec["model"] for c in cuda}
    methods = {c.profile.spec["method"] for c in cuda}
    assert models == {"sd15", "sdxl"} and len(methods) == 7


def test_peak_allocated_within_2_percent_median_and_5_percent_max(result):
    allocated = row(result, Metric.PEAK_ALLOCATED)
    assert allocated.median_abs_error <= 0.02 and allocated.max_abs_error <= 0.05
    # what the campaign showed after the workspaces and whole blocks were counted: every case
    # within half a percent
    assert allocated.max_abs_error <= 0.005


def test_device_used_within_5_percent_and_reserved_within_2(result):
    used = row(result, Metric.DEVICE_USED)
    assert used.median_abs_error <= 0.05 and used.within_5 == 1.0
    # the allocator replay with the driver's segment placement (estimate/allocator.py): every
    # case within 2% (SDXL full fine-tuning at batch 8 was 9.4% over with rising addresses)
    reserved = row(result, Metric.PEAK_RESERVED)
    assert reserved.max_abs_error <= 0.02


def test_every_fit_verdict_agrees(result):
    verdict = next(v for v in result.verdicts if v.device == "cuda" and v.source == "estimate")
    assert verdict.agree == verdict.count >= 34

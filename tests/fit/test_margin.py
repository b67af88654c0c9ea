"""fit's safety margin: the measured error band of the card fitted, else the default."""

import shutil
from pathlib import Path

import pytest

import vramplan.profile.validate as validate_module
from vramplan.fit.margin import DEFAULT_MARGIN, safety_margin
from vramplan.profile.validate import Metric, validate

STORE = Path(__file__).resolve().parents[2] / "profiles"


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("VRAMPLAN_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "profiles"
    (root / "h200").mkdir(parents=True)
    for name in ("sd15-lora-r16-fp16-b1-512-488bb8ff.json", "sdxl-full-bf16-b8-1024-b49866f4.json"):
        shutil.copy(STORE / "h200" / name, root / "h200" / name)
    return root


def test_the_cards_profiles_give_the_band(store, monkeypatch):
    margin = safety_margin(roots=[store], card="h200")
    rows = validate(store, simulate=False).summary
    band = next(r.max_abs_error for r in rows if r.source == "estimate" and r.metric is Metric.DEVICE_USED)
    assert margin.fraction == band and 0 <= band < DEFAULT_MARGIN
    assert "2 CUDA profile(s)" in margin.source
    # cached: the second time validate is not run
    monkeypatch.setattr(validate_module, "validate", lambda *a, **k: pytest.fail("validated again"))
    assert safety_margin(roots=[store], card="h200").fraction == band


def test_a_profile_without_device_used_does_not_count(store):
    """`vramplan train`'s profiles have no NVML sample: they add no device-used case."""
    before = safety_margin(roots=[store], card="h200").fraction
    name = "sd15-lora-r16-fp16-nf4-b1-512-f5edbeb4.json"
    shutil.copy(STORE / "h200" / name, store / "h200" / name)
    margin = safety_margin(roots=[store], card="h200")
    assert margin.fraction == before and "2 CUDA profile(s)" in margin.source


def test_other_cards_and_sizes_get_the_default(store):
    for card in ("rtx4090", "8GB", None, "cpu"):
        margin = safety_margin(roots=[store], card=card)
        assert margin.fraction == DEFAULT_MARGIN and "no CUDA profiles of this card" in margin.source


def test_the_flag_wins(store):
    assert safety_margin(0.1, roots=[store], card="h200").fraction == 0.1

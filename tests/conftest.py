"""Fixtures every test folder shares."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def vramplan_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("vramplan-cache")


@pytest.fixture(autouse=True)
def _vramplan_cache(vramplan_cache, monkeypatch):
    # local pipelines' inventories and recorded graphs are cached here, never in ~/.cache
    monkeypatch.setenv("VRAMPLAN_CACHE", str(vramplan_cache))


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """examples/make_tiny_pipeline.py's output, made once per test session: OUT/model, OUT/images."""
    out = tmp_path_factory.mktemp("tiny") / "t"
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_tiny_pipeline.py"), str(out)],
                   check=True, capture_output=True)
    return out

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """examples/make_tiny_pipeline.py's output: OUT/model and OUT/images."""
    out = tmp_path_factory.mktemp("tiny")
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_tiny_pipeline.py"), str(out / "t")],
                   check=True, capture_output=True)
    return out / "t"


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("VRAMPLAN_CACHE", str(tmp_path_factory.getbasetemp() / "vramplan-cache"))

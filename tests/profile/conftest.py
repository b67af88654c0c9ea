"""Fixtures for the measured tier: the tiny pipeline, and one CPU profile of it made through the CLI.

The CPU profile runs the real step in a child process (MALLOC_MMAP_THRESHOLD_ must be set when a
process starts), about 15 s on two cores, so it is made once per session and shared.
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROFILE_ARGS = ["--method", "lora", "--rank", "4", "--resolution", "64"]


@pytest.fixture(scope="session")
def cache_dir(vramplan_cache) -> Path:
    # tests/conftest.py points VRAMPLAN_CACHE here for every test
    return vramplan_cache





@pytest.fixture(scope="session")
def cpu_store(tiny_pipeline, cache_dir, tmp_path_factory):
    """A profile store holding one CPU profile of the tiny pipeline, written by `vramplan profile`.
    Returns (store folder, the command's exit code, its stdout)."""
    from vramplan.cli import main

    store = tmp_path_factory.mktemp("store") / "profiles"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VRAMPLAN_CACHE", str(cache_dir))
        capture = _Capture()
        with capture:
            code = main(["profile", "--device", "cpu", "--model", str(tiny_pipeline / "model"),
                         *PROFILE_ARGS, "--steps", "2", "--out", str(store)])
    return store, code, capture.text


@pytest.fixture(scope="session")
def validated(cpu_store, tmp_path_factory, cache_dir):
    """`vramplan validate` of the CPU store, once, with every export: (exit code, files, stdout)."""
    from vramplan.cli import main

    store, _, _ = cpu_store
    out = tmp_path_factory.mktemp("validate")
    files = {"csv": out / "accuracy.csv", "json": out / "accuracy.json", "chart": out / "accuracy.png"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VRAMPLAN_CACHE", str(cache_dir))
        mp.setenv("COLUMNS", "100")
        capture = _Capture()
        with capture:
            code = main(["validate", "--profiles", str(store), "--csv", str(files["csv"]),
                         "--json", str(files["json"]), "--chart", str(files["chart"])])
    return code, files, capture.text


class _Capture:
    """stdout of an in-process CLI call (capsys is function-scoped; this fixture is not)."""

    def __enter__(self):
        import io

        self._old, self._buffer = sys.stdout, io.StringIO()
        sys.stdout = self._buffer
        return self

    def __exit__(self, *exc):
        sys.stdout = self._old
        self.text = self._buffer.getvalue()

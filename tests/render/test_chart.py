"""The PNG/SVG chart: files written whole, in the format the name asks for."""

import subprocess
import sys

import pytest

from vramplan.errors import UsageError
from vramplan.estimate.result import Estimate
from vramplan.footprint import Category, ComponentParams, Footprint
from vramplan.render.chart import write_grid_chart
from vramplan.spec import build_spec
from vramplan.units import GB

W, A = Category.FROZEN_WEIGHTS, Category.ACTIVATIONS


def make_estimate(categories, **options):
    options.setdefault("gpu", "16GB")
    used = sum(categories.values())
    footprint = Footprint(categories=categories, peak_allocated_bytes=used,
                          peak_reserved_bytes=used, device_used_bytes=used)
    return Estimate(spec=build_spec(options), parameters={"unet": ComponentParams(10, 1)},
                    footprint=footprint)


FITS = make_estimate({W: 2_130_000_000, A: 5_300_000_000, Category.CUDA_CONTEXT: 500_000_000})
OVER = make_estimate({W: 10 * GB, A: 8_500_000_000}, method="full")


def test_png(tmp_path):
    path = write_grid_chart(FITS, tmp_path / "grid.png")
    assert path == tmp_path / "grid.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]     # no temporary file left


def test_svg_shows_the_verdict(tmp_path):
    path = write_grid_chart(OVER, tmp_path / "grid.SVG")
    text = path.read_text()
    assert "<svg" in text and len(text) > 1000


def test_compare_side_by_side(tmp_path):
    path = write_grid_chart([("LoRA", FITS), ("full", OVER), FITS], tmp_path / "compare.png")
    assert path.stat().st_size > 1000


def test_no_gpu(tmp_path):
    estimate = make_estimate({A: 3_500_000_000}, gpu=None)
    assert write_grid_chart(estimate, tmp_path / "grid.svg").stat().st_size > 0


@pytest.mark.parametrize("name", ["grid.jpg", "grid", "grid.pdf"])
def test_other_extensions_are_refused(tmp_path, name):
    with pytest.raises(UsageError, match="png or .svg"):
        write_grid_chart(FITS, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_is_replaced_whole(tmp_path):
    path = tmp_path / "grid.png"
    path.write_bytes(b"old")
    write_grid_chart(FITS, path)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_importing_render_loads_neither_matplotlib_pandas_nor_torch():
    code = ("import sys, vramplan.render; "
            "print(sorted({'matplotlib', 'pandas', 'torch'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

"""DataFrames for export: one row per estimate, exact bytes, and CSV that reads back the same."""

import pandas as pd

from vramplan.estimate.result import Estimate
from vramplan.footprint import Category, ComponentParams, Footprint
from vramplan.render.frames import estimates_frame, footprints_frame, write_csv
from vramplan.spec import build_spec
from vramplan.units import GB

W, A = Category.FROZEN_WEIGHTS, Category.ACTIVATIONS


def make_estimate(categories, **options):
    options.setdefault("gpu", "16GB")
    used = sum(categories.values())
    footprint = Footprint(categories=categories, peak_allocated_bytes=used - 1,
                          peak_reserved_bytes=used - 2, device_used_bytes=used)
    return Estimate(spec=build_spec(options), parameters={"unet": ComponentParams(10, 1)},
                    footprint=footprint)


SMALL = make_estimate({W: 2 * GB, A: 3 * GB}, rank=4)
BIG = make_estimate({W: 2 * GB, A: 15 * GB}, rank=64, batch_size=2)


def test_one_row_per_estimate_with_the_varied_fields():
    frame = estimates_frame([SMALL, BIG])
    assert len(frame) == 2
    assert list(frame.columns[:5]) == ["rank", "alpha", "batch_size", "gpu", "gpu_memory_bytes"]
    assert "model" not in frame.columns                      # the same in both
    assert frame["rank"].tolist() == [4, 64]
    assert frame["activations_bytes"].tolist() == [3 * GB, 15 * GB]
    assert frame["ema_bytes"].tolist() == [0, 0]             # every category has a column
    assert frame["device_used_bytes"].tolist() == [5 * GB, 17 * GB]
    assert frame["peak_allocated_bytes"].tolist() == [5 * GB - 1, 17 * GB - 1]
    assert frame["fits"].tolist() == [True, False]
    assert frame["headroom_bytes"].tolist() == [11 * GB, -1 * GB]


def test_labels_and_all_fields():
    frame = estimates_frame([("small", SMALL)], spec_fields="all")
    assert frame.columns[0] == "label" and frame["label"].tolist() == ["small"]
    assert {"model", "method", "precision", "resolution"} <= set(frame.columns)
    assert frame["resolution"].tolist() == ["512x512"]


def test_csv_round_trips(tmp_path):
    frame = estimates_frame([("small", SMALL), ("big", BIG)])
    path = write_csv(frame, tmp_path / "out" / "compare.csv")
    pd.testing.assert_frame_equal(pd.read_csv(path), frame)
    assert [p.name for p in path.parent.iterdir()] == ["compare.csv"]


def test_footprints_frame(tmp_path):
    frame = footprints_frame({"estimate": SMALL.footprint, "profile": BIG.footprint})
    assert frame["label"].tolist() == ["estimate", "profile"]
    assert frame["activations_bytes"].tolist() == [3 * GB, 15 * GB]
    path = write_csv(frame, tmp_path / "validate.csv")
    back = pd.read_csv(path, keep_default_na=False)
    assert back["device_used_bytes"].tolist() == [5 * GB, 17 * GB]

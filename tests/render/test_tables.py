"""The rich views: what the terminal shows for one estimate and for a comparison."""

import io

from rich.console import Console

from vramplan.estimate.result import Estimate
from vramplan.footprint import Category, ComponentParams, Footprint
from vramplan.render.compare import CompareView, titled
from vramplan.render.tables import (
    category_table, difference_title, render_estimate, spec_rows, title_fields, totals_table,
    varied_fields, verdict_text,
)
from vramplan.spec import build_spec
from vramplan.units import GB

W, A, X = Category.FROZEN_WEIGHTS, Category.ACTIVATIONS, Category.CUDA_CONTEXT
LORA = {W: 2_130_000_000, Category.TRAINABLE_WEIGHTS: 12_750_000, A: 5_300_000_000,
        X: 500_000_000}


def make_estimate(categories=LORA, notes=(), **options):
    options.setdefault("gpu", "16GB")
    used = sum(categories.values())
    footprint = Footprint(categories=categories, peak_allocated_bytes=used - categories.get(X, 0),
                          peak_reserved_bytes=used - categories.get(X, 0) + 1_000_000,
                          device_used_bytes=used, peak_phase="backward")
    return Estimate(spec=build_spec(options), parameters={"unet": ComponentParams(10, 1)},
                    footprint=footprint, notes=notes)


def text_of(renderable=None, estimate=None, width=120) -> str:
    console = Console(record=True, width=width, file=io.StringIO(), color_system=None)
    if estimate is not None:
        render_estimate(estimate, console)
    else:
        console.print(renderable)
    return console.export_text()


def test_render_estimate_shows_spec_grid_legend_totals_verdict_and_notes():
    estimate = make_estimate(notes=("CUDA context assumed 500 MB",), rank=32,
                             gradient_checkpointing=True)
    out = text_of(estimate=estimate)
    for expected in ("Stable Diffusion 1.5 (sd15)", "lora rank 32, alpha 32, attn", "fp16 mixed",
                     "gradient checkpointing", "512×512", "16GB card (16.00 GB)",
                     W.label, A.label, X.label, "device used", "peak allocated", "peak reserved",
                     "torch.cuda.max_memory_allocated()", "CUDA context assumed 500 MB"):
        assert expected in out, expected
    # 2.14 GB of weights, 5.3 of activations, 0.5 of context: drawn to the half square.
    assert " 0 WW WW WA AA AA AA AA AX" in out
    assert " 8 .. .. .. .. .. .. .. .." in out
    assert "✓ fits on 16GB card: 7.94 GB of 16.00 GB (50%), 8.06 GB headroom" in out


def test_verdict_when_it_does_not_fit():
    estimate = make_estimate({W: 10 * GB, A: 8_500_000_000})
    out = text_of(estimate=estimate)
    assert "✗ does NOT fit on 16GB card: needs 18.50 GB of 16.00 GB (116%), 2.50 GB short" in out
    assert "over capacity" in out


def test_verdict_without_a_gpu_and_in_gib():
    assert "give --gpu" in verdict_text(make_estimate(gpu=None)).plain
    estimate = make_estimate(gpu="rtx4090")
    assert verdict_text(estimate).plain == (
        "✓ fits on NVIDIA GeForce RTX 4090 24 GB: "
        "7.40 GiB of 23.99 GiB (31%), 16.59 GiB headroom")


def test_render_estimate_writes_only_to_its_console(capsys):
    render_estimate(make_estimate(), Console(file=io.StringIO(), width=100))
    assert capsys.readouterr().out == ""


def test_category_table_and_totals():
    estimate = make_estimate()
    out = text_of(category_table(estimate.footprint, "GB", 16 * GB, colour=False))
    assert "Parameter, frozen" in out and "2.13" in out and "26.8%" in out
    assert "device used" in out and "7.94" in out and "free" in out and "8.06" in out
    out = text_of(totals_table(estimate.footprint, "GB"))
    assert "peak allocated   7.44 GB" in out and "peak phase" in out


def test_spec_rows_name_each_method():
    rows = dict(spec_rows(build_spec({"method": "dreambooth", "ema": True, "batch_size": 2})))
    assert rows["method"] == "dreambooth (full, prior preservation)"
    assert rows["batch"] == "2 (+2 class = 4 images)"
    assert rows["tricks"] == "EMA" and rows["gpu"] == "none given"
    rows = dict(spec_rows(build_spec({"method": "textual-inversion", "num_vectors": 4})))
    assert rows["method"] == "textual-inversion, 4 vectors"


def test_titles_say_what_differs():
    specs = [build_spec({"rank": 4}), build_spec({"rank": 64, "batch_size": 2})]
    assert varied_fields(specs) == ["rank", "alpha", "batch_size"]
    assert title_fields(specs) == ["rank", "batch_size"]     # alpha follows rank: not chosen
    assert difference_title(specs[1], title_fields(specs)) == "rank 64 · batch 2"


def test_compare_view_shows_every_grid_and_one_table():
    small = make_estimate(rank=4)
    big = make_estimate({W: 10 * GB, A: 8_500_000_000}, rank=64, gradient_checkpointing=True)
    assert [t for t, _ in titled([small, big])] == ["rank 4 · no checkpointing",
                                                     "rank 64 · checkpointing"]
    out = text_of(CompareView([small, big]), width=120)
    for expected in ("rank 4 · no checkpointing", "rank 64 · checkpointing",
                     "✓ fits, 8.06 GB free", "✗ does NOT fit, 2.50 GB short", "1 square = 1 GB",
                     W.label, "over capacity", "headroom (GB)", "+8.06", "-2.50", "does NOT fit"):
        assert expected in out, expected
    # The two grids stand side by side: one line holds the first row of both.
    assert any(line.count(" 0 ") == 2 for line in out.splitlines())

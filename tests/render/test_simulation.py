"""The simulate views and the timeline chart, on a hand-built `Simulation`: a few records whose
live bytes are easy to add up by hand, so the numbers the tables show are exact."""

import io
import subprocess
import sys
from dataclasses import replace

import pytest
from rich.console import Console

from vramplan.errors import UsageError
from vramplan.estimate.result import Estimate
from vramplan.footprint import Category, ComponentParams, Footprint
from vramplan.render.simulation import (
    as_estimate, comparison_json, comparison_rows, human_bytes, phase_peaks_json, phase_rows,
    relative_error, render_simulation, short_module, top_layers_table,
)
from vramplan.render.timeline_chart import (
    envelope_indices, live_by_category, phase_spans, timeline_figure, write_timeline_chart,
)
from vramplan.simulate.run import Simulation
from vramplan.spec import build_spec
from vramplan.timeline import Record, analyse, composition_at

MB = 10**6
W, T, I, A, TMP, G, O = (Category.FROZEN_WEIGHTS, Category.TRAINABLE_WEIGHTS, Category.INPUTS,
                         Category.ACTIVATIONS, Category.TEMPORARIES, Category.GRADIENTS,
                         Category.OPTIMIZER_STATES)
LONG = "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"   # 67 characters
MID = "unet.mid_block.resnets.0.norm1"
UP = "unet.up_blocks.3.resnets.0.conv1"

# Each event is one allocation or free; a phase starts after the event its mark names, as the
# tracker marks it, and no record touches a mark. "encode" is entered twice, as the tracker does.
PHASES = [("load", 0), ("encode", 3), ("encode", 4), ("forward", 6), ("backward", 10),
          ("optimizer", 17), ("step 2 forward", 20)]
RECORDS = [
    Record(1000 * MB, 1, None, W, "load"),
    Record(10 * MB, 2, None, T, "load"),
    Record(1 * MB, 5, 19, I, "encode"),
    Record(300 * MB, 7, 15, A, "forward", LONG, "mm", True),
    Record(200 * MB, 8, 13, A, "forward", MID, "native_group_norm", True),
    Record(100 * MB, 9, 16, A, "forward", UP, "convolution", True),
    Record(50 * MB, 11, 12, TMP, "backward", "", "mm"),         # the peak: 1661 MB at event 11
    Record(10 * MB, 14, 23, G, "backward"),
    Record(20 * MB, 18, None, O, "optimizer"),
    Record(300 * MB, 21, 22, A, "step 2 forward", LONG, "mm", True),
]
TOP_LAYERS = [(LONG, 300 * MB), (MID, 200 * MB), (UP, 100 * MB)]
CONTEXT = 400 * MB


def make_simulation(gpu="16GB", records=RECORDS, phases=PHASES, top_layers=TOP_LAYERS):
    analysis = analyse(records, phases)
    categories = dict(analysis.composition)
    categories[Category.CUDA_CONTEXT] = CONTEXT
    footprint = Footprint(categories=categories, peak_allocated_bytes=analysis.peak_bytes,
                          peak_reserved_bytes=analysis.peak_bytes,
                          device_used_bytes=analysis.peak_bytes + CONTEXT,
                          peak_phase=analysis.peak_phase, source="simulate")
    return Simulation(spec=build_spec({"gpu": gpu} if gpu else {}), footprint=footprint,
                      analysis=analysis, records=list(records), phases=list(phases),
                      parameters={"unet": ComponentParams(10, 1)}, top_layers=list(top_layers),
                      seconds=3.21, notes=("CUDA context assumed",))


SIM = make_simulation()


def text_of(simulation, estimate=None, width=120) -> str:
    console = Console(record=True, width=width, file=io.StringIO(), color_system=None)
    render_simulation(simulation, console, estimate)
    return console.export_text()


def line_with(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(start))


# -- the phases ----------------------------------------------------------------------------------

def test_the_hand_built_trace_peaks_where_expected():
    assert SIM.analysis.peak_bytes == 1661 * MB
    assert SIM.footprint.peak_phase == "backward"


def test_phase_rows_merge_a_phase_entered_twice():
    rows = phase_rows(SIM)
    assert [r.phase for r in rows] == ["load", "encode", "forward", "backward", "optimizer",
                                       "step 2 forward"]
    assert [r.peak_bytes for r in rows] == [n * MB for n in (1010, 1011, 1611, 1661, 1041, 1340)]
    assert [r.dominant for r in rows] == [W] * 6


def test_phase_peaks_json():
    assert phase_peaks_json(SIM)[3] == {"phase": "backward", "peak_bytes": 1661 * MB,
                                        "dominant": "frozen_weights"}


def test_phase_table_shows_each_peak_what_filled_it_and_marks_the_peak():
    out = text_of(SIM)
    assert "peak allocated by phase" in out
    # 16GB card: the unit is GB. At the backward peak: 1000 of 1661 MB weights, 600 saved.
    backward = line_with(out, "backward")
    assert "backward ◀" in backward and "1.66" in backward
    assert "Parameter, frozen 60% · Activation (saved) 36%" in backward
    forward = line_with(out, "forward")
    assert "1.61" in forward and "Parameter, frozen 62% · Activation (saved) 37%" in forward
    # Under 1% the second category is left out: 10 MB trainable of 1010 at load.
    load = line_with(out, "load")
    assert "Parameter, frozen 99%" in load and "trainable" not in load
    # The second step is a section of its own: a blank line before it.
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("step 2 forward"))
    assert lines[at - 1].strip() == "" and lines[at - 2].startswith("optimizer")


def test_phase_bars_are_drawn_to_the_scale_of_the_peak():
    out = text_of(SIM)
    # 24 characters at the peak: 1661 MB = 14 W + 2 A... the bar holds only category letters.
    backward_bar = line_with(out, "backward").split()[3]
    load_bar = line_with(out, "load").split()[2]
    assert len(backward_bar) == 24 and set(backward_bar) <= set("WTIAtGO")
    assert len(load_bar) == round(24 * 1010 / 1661) and set(load_bar) == {"W"}


def test_phase_table_keeps_to_80_columns():
    out = text_of(SIM, width=80)
    assert max(len(line.rstrip()) for line in out.splitlines()) <= 80
    assert "Parameter, frozen 60% · Activation (saved) 36%" in line_with(out, "backward")


# -- the layers ----------------------------------------------------------------------------------

def test_top_layers_table_shortens_paths_alike_and_gives_shares_of_one_step():
    out = text_of(SIM)
    assert "top layers by saved activation bytes" in out
    # One path is over 48 characters, so all are shortened the same way.
    # Shares are of the 600 MB the first step saved (the second step's 300 MB left out).
    assert "1  unet.down.0.attn.0.block.0.ff.net.0.proj  300.00  50.0%" in out
    assert "2  unet.mid.resnet.0.norm1                   200.00  33.3%" in out
    assert "3  unet.up.3.resnet.0.conv1                  100.00  16.7%" in out
    assert "share: of the 600.00 MB autograd saved in one step" in out


def test_top_layers_in_mib_when_the_card_is_in_gib():
    sim = make_simulation(gpu="rtx4090")
    console = Console(record=True, width=100, file=io.StringIO(), color_system=None)
    console.print(top_layers_table(sim))
    out = console.export_text()
    assert "MiB" in out and f"{300 * MB / 2**20:.2f}" in out


def test_no_saved_activations():
    sim = make_simulation(records=RECORDS[:3], top_layers=[])
    assert "no saved activations" in text_of(sim)


@pytest.mark.parametrize("path, expected", [
    ("", "(outside any module)"),
    ("unet.conv_in", "unet.conv_in"),
    (LONG, "unet.down.0.attn.0.block.0.ff.net.0.proj"),
    ("transformer.single_transformer_blocks.37.attn.to_q",
     "transformer.single.37.attn.to_q"),
])
def test_short_module(path, expected):
    assert short_module(path) == expected


def test_short_module_elides_the_middle_of_what_is_still_too_long():
    path = "unet." + ".".join(f"part{i}" for i in range(20)) + ".proj"
    shown = short_module(path, 30)
    assert len(shown) <= 30 and shown.startswith("unet.….") and shown.endswith(".part19.proj")


# -- the whole view ------------------------------------------------------------------------------

def test_the_estimate_view_comes_first():
    out = text_of(SIM)
    for expected in ("vramplan simulate", "Stable Diffusion 1.5 (sd15)", "16GB card",
                     W.label, A.label, "device used", "peak allocated", "torch.cuda",
                     "✓ fits on 16GB card", "CUDA context assumed",
                     "traced 2 training steps on fake tensors in 3.2 s: 10 allocations"):
        assert expected in out, expected
    assert out.index("peak allocated by phase") < out.index("top layers") < out.index("notes")


def test_as_estimate_keeps_footprint_spec_and_notes():
    estimate = as_estimate(SIM)
    assert estimate.footprint is SIM.footprint and estimate.gpu is SIM.spec.gpu
    assert estimate.notes == SIM.notes and estimate.fits is True


# -- estimate against simulate ---------------------------------------------------------------------

def make_estimate(sim, **changes):
    categories = dict(sim.footprint.categories)
    categories.update(changes)
    allocated = sum(v for c, v in categories.items() if c.in_allocator)
    footprint = Footprint(categories=categories, peak_allocated_bytes=allocated,
                          peak_reserved_bytes=allocated,
                          device_used_bytes=sum(categories.values()))
    return Estimate(spec=sim.spec, parameters=sim.parameters, footprint=footprint)


def test_relative_error():
    assert relative_error(102, 100) == pytest.approx(0.02)
    assert relative_error(95, 100) == pytest.approx(-0.05)
    assert relative_error(5, 0) is None


def test_comparison_rows_and_json():
    # Activations 5% short of the simulation's 600 MB; an EMA only the estimate has.
    estimate = make_estimate(SIM, **{A: 570 * MB, Category.EMA: 5 * MB})
    rows = {name: (e, s) for _, name, e, s in comparison_rows(estimate, SIM)}
    assert rows["activations"] == (570 * MB, 600 * MB)
    assert rows["ema"] == (5 * MB, 0)
    assert rows["peak_allocated_bytes"] == (1636 * MB, 1661 * MB)
    data = comparison_json(estimate, SIM)
    assert data["categories"]["activations"]["relative_error"] == pytest.approx(-0.05)
    assert data["categories"]["ema"]["relative_error"] is None
    assert data["totals"]["peak_allocated_bytes"] == {
        "estimate_bytes": 1636 * MB, "simulate_bytes": 1661 * MB,
        "relative_error": round(-25 / 1661, 6)}
    assert data["tolerance"] == 0.03


def test_comparison_table_marks_errors_beyond_three_percent():
    estimate = make_estimate(SIM, **{A: 570 * MB, W: 1020 * MB})
    out = text_of(SIM, estimate)
    assert "estimate vs simulate" in out
    assert line_with(out, A.label).split()[-2:] == ["-5.00%", "!"]
    assert line_with(out, W.label).rstrip().endswith("+2.00%")       # within 3%: unmarked
    total = [line for line in out.splitlines() if line.startswith("peak allocated")][-1]
    assert "1.65 GB" in total and "1.66 GB" in total and "-0.60%" in total
    assert "error: (estimate - simulate) / simulate, ! beyond 3%" in out


def test_human_bytes():
    assert human_bytes(2_290_000_000, "GB") == "2.29 GB"
    assert human_bytes(3 * 2**20, "GiB") == "3.00 MiB"
    assert human_bytes(1024, "GiB") == "1.00 KiB"
    assert human_bytes(-128 * 1024, "GiB", signed=True) == "-128.00 KiB"
    assert human_bytes(5 * MB, "GB", signed=True) == "+5.00 MB"


# -- the timeline chart ----------------------------------------------------------------------------

def test_live_by_category_is_a_sweep_over_the_records():
    categories, live = live_by_category(RECORDS)
    assert categories == [c for c in Category if c in {W, T, I, A, TMP, G, O}]   # layout order
    assert live.shape == (7, 24)
    for event in range(24):
        expected = composition_at(RECORDS, event)
        assert {c: int(v[event]) for c, v in zip(categories, live) if v[event]} == \
            {c: n for c, n in expected.items() if n}
    assert int(live.sum(axis=0).max()) == 1661 * MB


def test_live_by_category_is_fast_for_a_big_step():
    import random
    import time

    rng = random.Random(0)
    records = []
    for i in range(60_000):
        start = 2 * i + 1
        records.append(Record(rng.randrange(512, 10**8, 512), start,
                              None if i % 50 == 0 else start + rng.randrange(1, 5000),
                              list(Category)[i % 12]))
    began = time.perf_counter()
    categories, live = live_by_category(records)
    picked = envelope_indices(live.sum(axis=0))
    assert time.perf_counter() - began < 5        # about 0.1 s; generous for a busy CI
    assert len(picked) <= 4002


def test_envelope_keeps_every_spike():
    import numpy as np

    total = np.zeros(100_000, dtype=np.int64)
    total[12_345] = 7       # one high spike
    total[54_321] = -3      # one low one
    picked = envelope_indices(total, 1000)
    assert 12_345 in picked and 54_321 in picked
    assert picked[0] == 0 and picked[-1] == 99_999 and len(picked) <= 1002
    assert list(picked) == sorted(set(picked))
    assert list(envelope_indices(total[:50], 1000)) == list(range(50))


def test_phase_spans_merge_repeats():
    assert phase_spans(PHASES, 23) == [("load", 0, 3), ("encode", 3, 6), ("forward", 6, 10),
                                       ("backward", 10, 17), ("optimizer", 17, 20),
                                       ("step 2 forward", 20, 23)]


def _texts(fig) -> list[str]:
    return [t.get_text() for t in fig.texts] + \
        [t.get_text() for ax in fig.axes for t in ax.texts]


def test_timeline_figure_labels_phases_steps_peak_and_title():
    fig = timeline_figure(make_simulation(gpu="2GB"))
    texts = _texts(fig)
    for expected in ("Stable Diffusion 1.5 · lora r16 · fp16", "model load", "encode",
                     "forward", "backward", "optimizer", "step 1", "step 2",
                     "peak 1.66 GB  ·  backward", "2GB card: 2.00 GB"):
        assert expected in texts, expected
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    # Top of the stack first, each with its bytes at the peak ("–" when none then).
    assert legend[0] == f"{TMP.label}  50.00 MB" and legend[-1] == f"{W.label}  1.00 GB"
    assert f"{A.label}  600.00 MB" in legend and f"{O.label}  –" in legend


def test_timeline_breaks_the_axis_under_a_tall_slab_of_weights():
    fig = timeline_figure(SIM)
    assert len(fig.axes) == 2               # the main panel and the short one from zero
    main, low = fig.axes
    assert low.get_ylim()[0] == 0 and main.get_ylim()[0] == pytest.approx(low.get_ylim()[1])
    assert 0.5 < main.get_ylim()[0] < 1.0   # GB, under the 1.01 GB floor
    assert any("far above the chart" in t for t in _texts(fig))   # 16GB card, 1.66 GB used


def test_timeline_without_a_break_when_little_stays():
    records = [Record(100 * MB, 1, None, W, "load"),
               Record(900 * MB, 3, 6, A, "forward", "unet", "mm", True)]
    sim = make_simulation(gpu=None, records=records, phases=[("load", 0), ("forward", 2)],
                          top_layers=[("unet", 900 * MB)])
    fig = timeline_figure(sim)
    assert len(fig.axes) == 1 and fig.axes[0].get_ylim()[0] == 0


def test_timeline_png(tmp_path):
    path = write_timeline_chart(SIM, tmp_path / "timeline.png")
    assert path == tmp_path / "timeline.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["timeline.png"]     # no temporary file left


def test_timeline_svg(tmp_path):
    path = write_timeline_chart(replace(SIM, spec=build_spec({})), tmp_path / "timeline.SVG")
    text = path.read_text()
    assert "<svg" in text and len(text) > 10_000


@pytest.mark.parametrize("name", ["timeline.jpg", "timeline", "timeline.pdf"])
def test_timeline_other_extensions_are_refused(tmp_path, name):
    with pytest.raises(UsageError, match="png or .svg"):
        write_timeline_chart(SIM, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_an_empty_trace_still_draws(tmp_path):
    sim = make_simulation(records=[], phases=[], top_layers=[])
    assert write_timeline_chart(sim, tmp_path / "empty.png").stat().st_size > 0


def test_the_simulate_views_import_neither_torch_nor_matplotlib():
    code = ("import sys, vramplan.render.simulation, vramplan.render.timeline_chart; "
            "print(sorted({'matplotlib', 'torch'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

"""`vramplan simulate`: the CLI around the fake-tensor tier.

Most tests replace `vramplan.simulate.run.simulate` with `fake_simulate` below (a hand-built
trace, no torch step), so they test the command and not the tracer; one runs the real simulation
of a small SD 1.5 LoRA step (about 10 s) and checks the JSON contract end to end.
"""

import json

import pytest

import vramplan.simulate.run
from vramplan.cli import COMMANDS, main
from vramplan.footprint import Category, ComponentParams, Footprint
from vramplan.simulate.run import Simulation
from vramplan.timeline import Record, analyse

CONTRACT_KEYS = {"spec", "parameters", "categories", "peak_allocated_bytes", "peak_reserved_bytes",
                 "device_used_bytes", "gpu", "fits", "headroom_bytes"}
SIMULATE_KEYS = CONTRACT_KEYS | {"source", "top_layers", "seconds", "phase_peaks"}
MB = 10**6
STAGES = ("building the model on the meta device", "step 1 of 2", "step 2 of 2")


def fake_simulation(spec) -> Simulation:
    """Weights, an input, two saved activations and a temporary; the peak in the backward."""
    phases = [("load", 0), ("encode", 2), ("forward", 4), ("backward", 7), ("optimizer", 11)]
    records = [Record(2000 * MB, 1, None, Category.FROZEN_WEIGHTS, "load"),
               Record(1 * MB, 3, 10, Category.INPUTS, "encode"),
               Record(300 * MB, 5, 9, Category.ACTIVATIONS, "forward", "unet.down_blocks.0",
                      "mm", True),
               Record(100 * MB, 6, 10, Category.ACTIVATIONS, "forward", "unet.mid_block",
                      "mm", True),
               Record(50 * MB, 8, 9, Category.TEMPORARIES, "backward")]
    analysis = analyse(records, phases)
    categories = dict(analysis.composition)
    categories[Category.CUDA_CONTEXT] = 400 * MB
    footprint = Footprint(categories=categories, peak_allocated_bytes=analysis.peak_bytes,
                          peak_reserved_bytes=analysis.peak_bytes,
                          device_used_bytes=analysis.peak_bytes + 400 * MB,
                          peak_phase=analysis.peak_phase, source="simulate")
    return Simulation(spec=spec, footprint=footprint, analysis=analysis, records=records,
                      phases=phases, parameters={"unet": ComponentParams(10, 1)},
                      top_layers=[("unet.down_blocks.0", 300 * MB), ("unet.mid_block", 100 * MB)],
                      seconds=1.5, notes=("made up by tests/cli/test_simulate_cli.py",))


@pytest.fixture
def fake_sim(monkeypatch):
    """Replace the simulation with `fake_simulation`; the list collects the specs it saw."""
    seen = []

    def simulate(spec, progress=None):
        seen.append(spec)
        for stage in STAGES:
            if progress is not None:
                progress(stage)
        return fake_simulation(spec)

    monkeypatch.setattr(vramplan.simulate.run, "simulate", simulate)
    return seen


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- the real simulation, once -------------------------------------------------------------------

def test_real_simulate_json(capsys):
    code, out, err = run(capsys, "simulate", "--json", "--method", "lora", "--rank", "4",
                         "--resolution", "256")
    assert code == 0, err
    data = json.loads(out)                         # stdout is one JSON object and nothing else
    assert SIMULATE_KEYS <= set(data)
    assert data["source"] == "simulate"
    assert data["peak_allocated_bytes"] > 0
    assert data["peak_reserved_bytes"] >= data["peak_allocated_bytes"]
    assert data["spec"]["method"] == "lora" and data["spec"]["rank"] == 4
    phases = [p["phase"] for p in data["phase_peaks"]]
    assert phases[:1] == ["load"] and {"forward", "backward", "optimizer",
                                       "step 2 forward"} <= set(phases)
    assert len(phases) == len(set(phases))         # a phase entered twice is one row
    # phase peaks are the tensors'; the total adds the allocator's whole-block slack
    slack = data["categories"]["block_slack"]
    assert max(p["peak_bytes"] for p in data["phase_peaks"]) == data["peak_allocated_bytes"] - slack
    assert data["top_layers"][0]["module"].startswith("unet.")
    assert data["top_layers"][0]["saved_bytes"] > 0
    assert "step 1 of 2" not in err                # no progress under --json


# -- the command, on a hand-built trace ----------------------------------------------------------

def test_json_has_the_contract_phase_peaks_and_no_progress(capsys, fake_sim):
    code, out, err = run(capsys, "simulate", "--json", "--gpu", "16GB")
    assert code == 0, err
    data = json.loads(out)
    assert SIMULATE_KEYS <= set(data) and data["source"] == "simulate"
    assert data["peak_allocated_bytes"] == 2451 * MB and data["fits"] is True
    assert data["phase_peaks"][3] == {"phase": "backward", "peak_bytes": 2451 * MB,
                                      "dominant": "frozen_weights"}
    assert data["top_layers"] == [{"module": "unet.down_blocks.0", "saved_bytes": 300 * MB},
                                  {"module": "unet.mid_block", "saved_bytes": 100 * MB}]
    assert "compare_estimate" not in data
    assert not any(stage in err for stage in STAGES)


def test_terminal_answer_with_progress_on_stderr(capsys, fake_sim):
    code, out, err = run(capsys, "simulate", "--method", "lora", "--rank", "8", "--gpu", "16GB")
    assert code == 0, err
    for expected in ("vramplan simulate", "lora rank 8", "peak allocated by phase", "backward ◀",
                     "top layers by saved activation bytes", "unet.down_blocks.0",
                     "fits on 16GB card", "made up by tests/cli/test_simulate_cli.py"):
        assert expected in out, expected
    # Each stage simulate() reports is a line on stderr, ticked when done; none on stdout.
    for stage in ("importing torch, diffusers and peft",) + STAGES:
        assert stage in err and stage not in out
    assert err.count("✓") == 4
    assert fake_sim[0].rank == 8


def test_compare_estimate(capsys, fake_sim, fake):
    code, out, err = run(capsys, "simulate", "--compare-estimate", "--gpu", "16GB")
    assert code == 0, err
    assert "estimate vs simulate" in out and "peak allocated" in out
    assert len(fake) == 1 and fake[0] == fake_sim[0]       # the same spec, estimated once
    code, out, _ = run(capsys, "simulate", "--compare-estimate", "--json")
    data = json.loads(out)["compare_estimate"]
    totals = data["totals"]["peak_allocated_bytes"]
    assert totals["simulate_bytes"] == 2451 * MB
    assert totals["relative_error"] == pytest.approx(
        (totals["estimate_bytes"] - totals["simulate_bytes"]) / totals["simulate_bytes"],
        abs=1e-6)
    assert data["categories"]["activations"]["simulate_bytes"] == 400 * MB


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".svg", b"<?xml")])
def test_timeline_and_chart_are_written(capsys, fake_sim, tmp_path, suffix, magic):
    timeline, chart = tmp_path / f"timeline{suffix}", tmp_path / f"grid{suffix}"
    code, out, err = run(capsys, "simulate", "--json", "--timeline", str(timeline),
                         "--chart", str(chart))
    assert code == 0, err
    assert timeline.read_bytes()[:len(magic)] == magic
    assert chart.read_bytes()[:len(magic)] == magic
    json.loads(out)                                         # stdout stays pure JSON
    assert f"timeline written to {timeline}" in err and f"chart written to {chart}" in err


def test_plan_and_overrides(capsys, fake_sim, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"spec": {"model": "sd15", "method": "lora", "rank": 32}}))
    code, _, err = run(capsys, "simulate", "--json", "--plan", str(plan), "--batch-size", "2")
    assert code == 0, err
    assert fake_sim[0].rank == 32 and fake_sim[0].batch_size == 2


# -- bad input: one line, exit 2, nothing simulated ----------------------------------------------

@pytest.mark.parametrize("argv, problem", [
    (["--timeline", "{tmp}/timeline.gif"], "--timeline: '{tmp}/timeline.gif' must end in .png or "
                                           ".svg"),
    (["--timeline", "{tmp}/timeline"], "--timeline: '{tmp}/timeline' must end in .png or .svg"),
    (["--chart", "{tmp}/grid.jpg", "--timeline", "{tmp}/t.png"], "--chart: '{tmp}/grid.jpg' must "
                                                                 "end in .png or .svg"),
    (["--method", "full", "--base-quant", "nf4"], "--base-quant nf4 needs --method lora"),
    (["--rank", "0"], "--rank: 0 is too small"),
    (["--compare-estimate", "yes"], "unrecognized arguments: yes"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, fake_sim, tmp_path, argv, problem):
    code, out, err = run(capsys, "simulate", *(a.format(tmp=tmp_path) for a in argv))
    problem = problem.format(tmp=tmp_path)
    assert code == 2
    assert out == "" and err.count("\n") == 1 and err.startswith("vramplan: error: ")
    assert problem in err
    assert fake_sim == []
    assert list(tmp_path.iterdir()) == []


def test_help_lists_the_simulate_flags(capsys):
    assert "simulate" in COMMANDS
    code, out, _ = run(capsys, "simulate", "--help")
    assert code == 0
    for flag in ("--timeline", "--compare-estimate", "--json", "--chart", "--plan", "--rank"):
        assert flag in out
    assert "examples:" in out and "vramplan simulate --method full --precision fp16 " \
                                  "--timeline timeline.png" in out

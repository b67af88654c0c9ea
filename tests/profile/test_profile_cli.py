"""`vramplan profile` and `vramplan validate` end to end on the CPU: the tiny pipeline is measured
(real tensors, the simulate tracker, RSS), stored, and validated against estimate and simulate."""

import json
from pathlib import Path

import pytest
import torch

from vramplan.cli import COMMANDS, main
from vramplan.profile.store import load_profiles

PROFILE_ARGS = ["--method", "lora", "--rank", "4", "--resolution", "64"]


def test_both_commands_are_registered():
    assert {"profile", "validate"} <= set(COMMANDS)


def test_profile_on_the_cpu_writes_a_profile(cpu_store, tiny_pipeline):
    store, code, out = cpu_store
    assert code == 0
    stored, problems = load_profiles(store)
    assert problems == [] and len(stored) == 1
    path, profile = stored[0].path, stored[0].profile
    assert path.parent.name == "cpu" and path.name.startswith("model-lora-r4-fp16-b1-64-")
    assert f"profile written to {path}" in out.replace("\n", "")
    assert profile.device == "cpu" and profile.fits and profile.steps == 2
    assert profile.spec["model"] == str(tiny_pipeline / "model") and profile.spec["rank"] == 4
    names = [p.phase for p in profile.phases]
    assert names[0] == "load" and "step 2 optimizer" in names
    # the weights are live from the load on, the step adds to them
    assert 0 < profile.load_allocated_bytes < profile.peak_allocated_bytes
    assert profile.peak_allocated_bytes % 512 == 0                 # CUDA's 512-byte blocks
    assert profile.rss_baseline_bytes > 0 and profile.rss_growth_bytes >= 0
    # measured in a child started with the malloc setting, so no note says otherwise
    assert not any("MALLOC_MMAP_THRESHOLD_" in note for note in profile.notes)
    assert profile.environment["versions"]["torch"] == torch.__version__


def test_profile_refuses_to_overwrite(cpu_store, tiny_pipeline, capsys):
    store, _, _ = cpu_store
    code = main(["profile", "--device", "cpu", "--model", str(tiny_pipeline / "model"), *PROFILE_ARGS,
                 "--out", str(store)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("vramplan: error: ") and "exists: --force" in err


def test_validate_shows_the_cpu_profile_and_its_errors(validated):
    code, files, out = validated
    assert code == 0
    assert "model-lora-r4-fp16-b1-64" in out and "cpu" in out
    assert "measured" in out and "estimate" in out and "simulate" in out and "accuracy" in out
    data = json.loads(files["json"].read_text())
    (case,) = data["cases"]
    assert case["device"] == "cpu" and case["fits_measured"] is True
    # the tracker's peak on real tensors: simulate traces the same step on fake ones (equal but
    # for the CPU loss kernel's storage), estimate replays recorded graphs (within a few %)
    assert abs(case["peak_allocated_simulate_error"]) < 0.01
    assert abs(case["peak_allocated_estimate_error"]) < 0.03
    # the RSS growth of a 3 MiB model is the libraries' own, not comparable: no error
    assert case["rss_growth_measured_bytes"] > 0 and case["rss_growth_estimate_error"] is None
    summary = {(row["device"], row["source"], row["metric"]): row for row in data["summary"]}
    assert set(summary) == {("cpu", "estimate", "peak_allocated"), ("cpu", "simulate", "peak_allocated")}
    assert all(row["cases"] == 1 for row in summary.values())
    assert data["problems"] == []


def test_validate_writes_csv_json_and_chart(validated):
    import pandas as pd

    code, files, out = validated
    frame = pd.read_csv(files["csv"])
    assert len(frame) == 1 and frame.loc[0, "device"] == "cpu"
    assert {"peak_allocated_measured_bytes", "peak_allocated_estimate_error",
            "peak_allocated_simulate_error", "device_used_measured_bytes", "spec_method"} <= set(frame.columns)
    assert files["chart"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for path in files.values():
        assert str(path) in out.replace("\n", "")


def test_validate_json_to_stdout_is_pure_json(cpu_store, capsys):
    store, _, _ = cpu_store
    assert main(["validate", "--profiles", str(store), "--no-simulate", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [row["source"] for row in data["summary"]] == ["estimate"]


def test_validate_names_and_skips_a_bad_file(cpu_store, tmp_path, capsys):
    import shutil

    store, _, _ = cpu_store
    copy = tmp_path / "profiles"
    shutil.copytree(store, copy)
    (copy / "cpu" / "broken.json").write_text("{not json")
    (copy / "h100").mkdir()
    (copy / "h100" / "other.json").write_text(json.dumps({"schema": "someone else's"}))
    assert main(["validate", "--profiles", str(copy), "--no-simulate", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["cases"]) == 1
    assert len(data["problems"]) == 2
    assert any("broken.json" in p and "not valid JSON" in p for p in data["problems"])
    assert any("other.json" in p and "not a vramplan profile" in p for p in data["problems"])


def test_validate_reports_a_profile_it_cannot_predict(cpu_store, tmp_path, capsys):
    store, _, _ = cpu_store
    stored, _ = load_profiles(store)
    data = stored[0].profile.to_json()
    data["spec"]["model"] = str(tmp_path / "gone")       # the local model was deleted since
    (tmp_path / "p" / "cpu").mkdir(parents=True)
    (tmp_path / "p" / "cpu" / "gone.json").write_text(json.dumps(data))
    assert main(["validate", "--profiles", str(tmp_path / "p"), "--no-simulate"]) == 0
    out = capsys.readouterr().out
    assert "no prediction" in out and "cannot rebuild its spec" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda_is_one_line(tmp_path, capsys):
    code = main(["profile", "--method", "lora", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("vramplan: error: --device cuda: this machine has no CUDA device")
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_cuda_campaign_without_cuda_is_one_line(tmp_path, capsys):
    matrix = Path(__file__).resolve().parents[2] / "examples" / "matrix-quick.toml"
    code = main(["profile", "--matrix", str(matrix), "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no CUDA device" in err


@pytest.mark.parametrize("argv, message", [
    (["profile", "--device", "tpu"], "--device: 'tpu' is not cuda or cpu"),
    (["profile", "--device", "cpu", "--steps", "1"], "--steps: 1 is too small"),
    (["profile", "--matrix", "m.toml", "--method", "lora"], "--matrix takes every spec from its file"),
    (["profile", "--device", "cpu", "--budget", "60"], "--budget applies to --matrix"),
    (["profile", "--device", "cpu", "--check-first"], "--check-first applies to --matrix"),
    (["profile", "--device", "cpu", "--matrix", "missing.toml"], "does not exist"),
    (["validate", "--profiles", "no/such/folder"], "is not a folder"),
    (["validate", "--chart", "accuracy.gif"], "must end in .png or .svg"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err

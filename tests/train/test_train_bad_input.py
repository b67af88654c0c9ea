"""Every bad input of `vramplan train` ends as one line on stderr and exit code 2, before any
training; unreadable images are skipped with a warning and counted."""

import json

import pytest
from rich.console import Console

from vramplan.cli import main
from vramplan.spec import build_spec
from vramplan.train import train


@pytest.fixture
def plan(tiny, kit, tmp_path):
    return kit.plan(tmp_path / "plan.json", kit.spec(tiny[0], method="lora", rank=4))


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, err.strip().splitlines()[-1] if err.strip() else ""


def base_args(plan, model, data, output):
    return ["train", "--plan", plan, "--model", model, "--data", data, "--output", output, "--steps", 1,
            "--quiet"]


def test_missing_data_folder(capsys, tiny, plan, tmp_path):
    code, line = run(capsys, *base_args(plan, tiny[0], tmp_path / "nope", tmp_path / "out"))
    assert code == 2 and "--data" in line and "does not exist" in line


def test_empty_data_folder(capsys, tiny, plan, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    code, line = run(capsys, *base_args(plan, tiny[0], empty, tmp_path / "out"))
    assert code == 2 and "holds no images" in line


def test_no_readable_image(capsys, tiny, plan, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    (broken / "b.jpg").write_bytes(b"\xff\xd8 truncated")
    code, line = run(capsys, *base_args(plan, tiny[0], broken, tmp_path / "out"))
    assert code == 2 and "none of the 2 image file(s)" in line


def test_unreadable_images_are_skipped_and_counted(tiny, kit, tmp_path):
    model, images = tiny
    data = kit.copy_images(images, tmp_path / "data")
    (data / "corrupt.png").write_bytes(b"\x89PNG broken")
    console = Console(record=True, width=200)
    result = train(kit.spec(model, method="lora", rank=4), kit.options(model, data, tmp_path / "out", steps=1),
                   console)
    text = console.export_text()
    assert result.steps == 1 and result.skipped_images == 1
    assert "skipped unreadable image" in text and "corrupt.png" in text
    assert "1 of 5 images" in text


def test_plan_for_another_model(capsys, tiny, tmp_path):
    plan = tmp_path / "sd15.json"
    plan.write_text(json.dumps(build_spec({"model": "sd15", "method": "lora"}).to_json()))
    code, line = run(capsys, *base_args(plan, tiny[0], tiny[1], tmp_path / "out"))
    assert code == 2 and "the plan is for Stable Diffusion 1.5" in line


@pytest.mark.parametrize("what", ["missing", "not-a-pipeline", "single-file"])
def test_model_that_is_not_a_pipeline_folder(capsys, tiny, plan, tmp_path, what):
    model = {"missing": tmp_path / "nope", "not-a-pipeline": tiny[1],
             "single-file": tmp_path / "model.safetensors"}[what]
    if what == "single-file":
        model.write_bytes(b"\0" * 16)
    code, line = run(capsys, *base_args(plan, model, tiny[1], tmp_path / "out"))
    assert code == 2 and line.startswith("vramplan: error: --model")


def test_output_holding_a_run(capsys, tiny, kit, plan, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "vramplan-run.json").write_text(json.dumps({"format": 1, "plan": json.loads(plan.read_text())}))
    code, line = run(capsys, *base_args(plan, tiny[0], tiny[1], out))
    assert code == 2 and "already holds a run" in line and "--resume" in line
    code, line = run(capsys, *base_args(plan, tiny[0], tiny[1], out), "--resume", "--overwrite")
    assert code == 2 and "give one of them" in line
    other = kit.plan(tmp_path / "other.json", kit.spec(tiny[0], method="lora", rank=8))
    code, line = run(capsys, *base_args(other, tiny[0], tiny[1], out), "--resume")
    assert code == 2 and "different plan" in line


def test_overwrite_starts_again(capsys, tiny, plan, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "vramplan-run.json").write_text(json.dumps({"format": 1, "plan": {}}))
    (out / "checkpoint-5").mkdir()
    code, _ = run(capsys, *base_args(plan, tiny[0], tiny[1], out), "--overwrite")
    assert code == 0
    assert not (out / "checkpoint-5").exists() and (out / "pytorch_lora_weights.safetensors").exists()


def test_output_with_other_files(capsys, tiny, plan, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"mine")
    for extra in ([], ["--overwrite"]):
        code, line = run(capsys, *base_args(plan, tiny[0], tiny[1], out), *extra)
        assert code == 2 and "holds no vramplan run" in line
    assert (out / "holiday.jpg").exists()


def test_resume_without_a_run(capsys, tiny, plan, tmp_path):
    code, line = run(capsys, *base_args(plan, tiny[0], tiny[1], tmp_path / "out"), "--resume")
    assert code == 2 and "no vramplan run to continue" in line


def test_dreambooth_needs_class_images(capsys, tiny, kit, tmp_path):
    plan = kit.plan(tmp_path / "db.json", kit.spec(tiny[0], method="dreambooth"))
    code, line = run(capsys, *base_args(plan, tiny[0], tiny[1], tmp_path / "out"))
    assert code == 2 and "--class-data" in line
    code, line = run(capsys, *base_args(plan, tiny[0], tiny[1], tmp_path / "out"), "--class-data", tiny[1])
    assert code == 2 and "--class-prompt" in line


def test_textual_inversion_prompt_needs_the_token(capsys, tiny, kit, tmp_path):
    plan = kit.plan(tmp_path / "ti.json", kit.spec(tiny[0], method="textual-inversion"))
    code, line = run(capsys, *base_args(plan, tiny[0], tiny[1], tmp_path / "out"),
                     "--instance-prompt", "a photo of my toy")
    assert code == 2 and "placeholder token '<sks>'" in line


@pytest.mark.parametrize("flag,value,words", [("--steps", 0, "--steps"),
                                              ("--checkpoint-every", -1, "--checkpoint-every"),
                                              ("--learning-rate", -1, "--learning-rate")])
def test_bad_numbers(capsys, tiny, plan, tmp_path, flag, value, words):
    code, line = run(capsys, *base_args(plan, tiny[0], tiny[1], tmp_path / "out"), flag, value)
    assert code == 2 and words in line


def test_missing_plan_file(capsys, tiny, tmp_path):
    code, line = run(capsys, *base_args(tmp_path / "none.json", tiny[0], tiny[1], tmp_path / "out"))
    assert code == 2 and "--plan" in line

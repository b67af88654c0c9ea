"""`vramplan train` with a plan for several GPUs: the process the user started checks the inputs,
writes the plan's launch files and runs `accelerate launch ... -m vramplan train ... --launched`
(subprocess mocked here); a process accelerate started trains as one rank instead of launching
again. The real two-process run (DDP on gloo, on the CPU) is in test_train_ranks.py."""

import json
import sys
from pathlib import Path

import pytest
import yaml

from vramplan.cli import build_parser, main
from vramplan.train.launch import (LAUNCHED_FLAG, child_arguments, is_rank, launch_command, needs_launch,
                                   under_accelerate)


class Recorder:
    """Stands in for subprocess.run: keeps the command and what the launch files held."""

    def __init__(self, returncode=0):
        self.returncode = returncode
        self.calls = []

    def __call__(self, cmd, env=None, **kwargs):
        config = Path(cmd[cmd.index("--config_file") + 1])
        plan = Path(cmd[cmd.index("--plan") + 1])
        files = {p.name: p.read_text() for p in config.parent.iterdir()}
        self.calls.append({"cmd": cmd, "env": env, "folder": config.parent, "files": files,
                           "plan": json.loads(plan.read_text())})

        class Completed:
            returncode = self.returncode

        return Completed()


@pytest.fixture
def recorder(monkeypatch):
    import vramplan.train.launch as launch

    rec = Recorder()
    monkeypatch.setattr(launch.subprocess, "run", rec)
    for name in launch.LAUNCH_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    return rec


def plan_file(kit, tiny, tmp_path, name="plan.json", **options):
    model, _ = tiny
    spec = kit.spec(model, method="lora", rank=4, **options)
    return kit.plan(tmp_path / name, spec), spec


def train_argv(plan, tiny, output, *extra):
    model, images = tiny
    return ["train", "--plan", str(plan), "--model", str(model), "--data", str(images), "--output", str(output),
            "--steps", "2", "--device", "cpu", *extra]


def test_launched_environment_is_recognised():
    assert not under_accelerate({})
    assert not under_accelerate({"ACCELERATE_LOG_LEVEL": "info", "HOME": "/root"})
    for name in ("LOCAL_RANK", "WORLD_SIZE", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_DEEPSPEED"):
        assert under_accelerate({name: "1"})
    from vramplan.spec import build_spec

    several, one = build_spec({"gpus": "2x24GB"}), build_spec({"gpu": "24GB"})
    assert needs_launch(several, environ={}) and not needs_launch(one, environ={})
    assert not needs_launch(several, launched=True, environ={})
    assert not needs_launch(several, environ={"WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert is_rank(several, environ={"WORLD_SIZE": "2"}) and is_rank(several, launched=True, environ={})
    # a one-GPU plan under `accelerate launch` with one process trains as before
    assert not is_rank(one, environ={"ACCELERATE_MIXED_PRECISION": "no", "WORLD_SIZE": "1"})
    assert is_rank(one, environ={"WORLD_SIZE": "2"})


def test_child_arguments_are_the_same_run(tmp_path):
    from vramplan.cli import _train_options
    from vramplan.train import TrainOptions

    options = TrainOptions(model_path=tmp_path / "m", data=tmp_path / "d", output=tmp_path / "o", steps=7,
                           instance_prompt="a photo of sks", class_data=tmp_path / "c", class_prompt="a photo",
                           initializer_token="toy", learning_rate=3e-5, seed=4, checkpoint_every=3,
                           keep_checkpoints=1, resume=True, save_format="kohya", device="cpu", progress=False)
    argv = child_arguments(tmp_path / "plan.json", options)
    assert argv[0] == "train" and argv[-1] == LAUNCHED_FLAG
    args = build_parser().parse_args(argv)
    assert args.launched and args.plan == tmp_path / "plan.json"
    assert _train_options(args) == options


def test_launch_writes_the_plans_config_and_runs_accelerate(kit, tiny, tmp_path, recorder, capsys):
    plan, spec = plan_file(kit, tiny, tmp_path, gpus="2x24GB")
    code = main(train_argv(plan, tiny, tmp_path / "run", "--learning-rate", "0.01", "--quiet"))
    assert code == 0 and len(recorder.calls) == 1
    call = recorder.calls[0]
    cmd = call["cmd"]
    assert cmd[:5] == [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                       str(call["folder"] / "accelerate.yaml")]
    assert cmd[5] == "--main_process_port" and int(cmd[6]) > 0
    assert cmd[7:10] == ["-m", "vramplan", "train"] and cmd[-1] == "--launched"
    # the children get the same arguments (absolute paths) and the plan as it was
    child = build_parser().parse_args(cmd[9:])
    model, images = tiny
    assert (child.model_path, child.data, child.output) == (model.absolute(), images.absolute(),
                                                           (tmp_path / "run").absolute())
    assert child.steps == 2 and child.learning_rate == 0.01 and child.device == "cpu" and child.quiet
    assert call["plan"] == spec.to_json()
    config = yaml.safe_load(call["files"]["accelerate.yaml"])
    assert config["num_processes"] == 2 and config["distributed_type"] == "MULTI_GPU"
    assert "deepspeed.json" not in call["files"]
    assert not call["folder"].exists()                       # removed once accelerate returned
    assert not (tmp_path / "run").exists()                   # the children make it
    assert "2 processes" in capsys.readouterr().err


def test_launch_of_a_zero_plan_writes_the_deepspeed_json(kit, tiny, tmp_path, recorder, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # a machine with 4 GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    plan, spec = plan_file(kit, tiny, tmp_path, gpus="4x24GB", strategy="zero2", offload="optimizer")
    argv = train_argv(plan, tiny, tmp_path / "run")
    argv[argv.index("--device") + 1] = "cuda"
    assert main(argv) == 0
    call = recorder.calls[0]
    config = yaml.safe_load(call["files"]["accelerate.yaml"])
    assert config["distributed_type"] == "DEEPSPEED" and config["num_processes"] == 4
    assert config["deepspeed_config"]["deepspeed_config_file"] == str((call["folder"] / "deepspeed.json").resolve())
    ds = json.loads(call["files"]["deepspeed.json"])
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_batch_size"] == 4


def test_accelerates_exit_status_is_trains(kit, tiny, tmp_path, recorder):
    recorder.returncode = 1
    plan, _ = plan_file(kit, tiny, tmp_path, gpus="2x24GB")
    assert main(train_argv(plan, tiny, tmp_path / "run")) == 1


@pytest.mark.parametrize("case", ["no data", "resume fsdp", "too few gpus", "taken output", "fsdp on cpu",
                                  "zero3 on cpu"])
def test_bad_input_fails_before_anything_starts(kit, tiny, tmp_path, recorder, capsys, case):
    model, images = tiny
    strategy = {"resume fsdp": "fsdp", "fsdp on cpu": "fsdp", "zero3 on cpu": "zero3"}.get(case)
    options = {"gpus": "2x24GB", **({"strategy": strategy} if strategy else {})}
    plan, _ = plan_file(kit, tiny, tmp_path, **options)
    output = tmp_path / "run"
    argv = train_argv(plan, tiny, output)
    if case == "no data":
        argv[argv.index("--data") + 1] = str(tmp_path / "nowhere")
    elif case == "resume fsdp":
        argv.append("--resume")
    elif case == "too few gpus":
        argv[argv.index("--device") + 1] = "cuda"
    elif case.endswith("on cpu"):
        pass   # --device cpu
    else:
        output.mkdir()
        (output / "something").write_text("x")
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("vramplan: error:") and len(err.strip().splitlines()) == 1, err
    assert not recorder.calls


def test_fit_then_train_launches_the_chosen_plan(kit, tiny, tmp_path, recorder):
    model, images = tiny
    code = main(["fit", "--model", str(model), "--method", "lora", "--rank", "4", "--resolution", "64",
                 "--gpus", "2x8GB", "--train", "--model-path", str(model), "--data", str(images),
                 "--output", str(tmp_path / "run"), "--steps", "1", "--quiet", "--device", "cpu", "--json"])
    assert code == 0 and len(recorder.calls) == 1
    plan = recorder.calls[0]["plan"]
    assert plan["num_gpus"] == 2 and plan["strategy"] == "ddp" and plan["rank"] == 4


def test_a_launched_child_with_the_wrong_process_count_says_so(kit, tiny, tmp_path, recorder, capsys):
    plan, _ = plan_file(kit, tiny, tmp_path, gpus="2x24GB")
    code = main(train_argv(plan, tiny, tmp_path / "run", LAUNCHED_FLAG))
    err = capsys.readouterr().err
    assert code == 2 and "the plan is for 2 GPU(s) but accelerate started 1 process(es)" in err
    assert not recorder.calls


def test_launch_command_shape(tmp_path):
    from vramplan.train import TrainOptions

    options = TrainOptions(model_path=Path("m"), data=Path("d"), output=Path("o"))
    cmd = launch_command(tmp_path / "accelerate.yaml", tmp_path / "plan.json", options, python="python3")
    assert cmd[:5] == ["python3", "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "accelerate.yaml")]
    assert "--main_process_port" not in cmd and cmd[-1] == LAUNCHED_FLAG

"""Several GPUs: `vramplan train` with a plan for N > 1 GPUs starts N processes with accelerate.

    vramplan train --plan plan.json --model ./my-sdxl --data ./photos --output ./run

on a plan with `num_gpus` > 1 checks every input here, in the one process the user started
(a typo fails in a second, exit 2, before any process starts), then writes into a temporary
folder the plan (plan.json) and its launch files -- accelerate.yaml and, for zero1/2/3,
deepspeed.json, by `vramplan.distributed.configs`, the writer `fit --emit accelerate` and
`estimate --emit-launch` use -- and runs

    accelerate launch --config_file <folder>/accelerate.yaml --main_process_port <free port> \\
        -m vramplan train --plan <folder>/plan.json <the same arguments> --launched

(`accelerate launch` as this Python's module, `python -m accelerate.commands.launch`, so the
children run in the same environment). The exit status is accelerate's; the folder is removed
when it returns. `--launched` tells each child it is one rank of the job already, so it trains
(vramplan.train.ranks) instead of launching again.

A process started by `accelerate launch` (or torchrun) itself -- `accelerate launch -m vramplan
train ...` typed by the user, with their own config -- is recognised by the environment the
launchers set (`under_accelerate`) and trains as a rank too.

`--device cpu` (or `auto` on a machine without CUDA) starts the same N processes on the CPU: the
plan's config is used unchanged (torchrun starts N processes; accelerate picks the gloo backend
without CUDA), which is how the tests run a two-rank DDP job without a GPU. accelerate's own
`--cpu` flag is not used: with it, `accelerate launch` starts one process unless MPI is set up.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from vramplan.errors import UsageError
from vramplan.spec import TrainingSpec
from vramplan.train.inputs import TrainOptions

LAUNCHED_FLAG = "--launched"
# What `accelerate launch` (every launcher: simple, multi-GPU, DeepSpeed) and torchrun put in the
# environment of the processes they start. A user's own ACCELERATE_LOG_LEVEL or
# ACCELERATE_CONFIG-style settings are not among them, so they do not make a process a rank.
LAUNCH_ENVIRONMENT = ("LOCAL_RANK", "WORLD_SIZE", "RANK", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU",
                      "ACCELERATE_DYNAMO_BACKEND", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")


def under_accelerate(environ=None) -> bool:
    """Was this process started by `accelerate launch` or torchrun?"""
    env = os.environ if environ is None else environ
    return any(name in env for name in LAUNCH_ENVIRONMENT)


def world_size(environ=None) -> int:
    env = os.environ if environ is None else environ
    try:
        return max(int(env.get("WORLD_SIZE", "1") or 1), 1)
    except ValueError:
        return 1


def is_rank(spec: TrainingSpec, launched: bool = False, environ=None) -> bool:
    """Train as one rank of a job (accelerate's Accelerator prepares the models)?"""
    return launched or (under_accelerate(environ) and (spec.num_gpus > 1 or world_size(environ) > 1))


def needs_launch(spec: TrainingSpec, launched: bool = False, environ=None) -> bool:
    """A several-GPU plan, in a process nobody launched: start the job."""
    return spec.num_gpus > 1 and not launched and not under_accelerate(environ)


def child_arguments(plan: Path, options: TrainOptions) -> list[str]:
    """`train`'s arguments for the children: the same run, the plan from `plan`, and --launched."""
    args = ["train", "--plan", str(plan), "--model", str(options.model_path), "--data", str(options.data),
            "--output", str(options.output), "--steps", str(options.steps), "--seed", str(options.seed),
            "--checkpoint-every", str(options.checkpoint_every),
            "--keep-checkpoints", str(options.keep_checkpoints), "--save-format", options.save_format,
            "--device", options.device, "--placeholder-token", options.placeholder_token]
    for flag, value in (("--instance-prompt", options.instance_prompt), ("--class-data", options.class_data),
                        ("--class-prompt", options.class_prompt),
                        ("--initializer-token", options.initializer_token)):
        if value is not None:
            args += [flag, str(value)]
    if options.learning_rate is not None:
        args += ["--learning-rate", repr(float(options.learning_rate))]
    for flag, on in (("--resume", options.resume), ("--overwrite", options.overwrite),
                     ("--quiet", not options.progress)):
        if on:
            args.append(flag)
    return args + [LAUNCHED_FLAG]


def launch_command(config: Path, plan: Path, options: TrainOptions, port: int | None = None,
                   python: str | None = None) -> list[str]:
    """The `accelerate launch` command line (as a module of this Python)."""
    cmd = [python or sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    if port is not None:
        cmd += ["--main_process_port", str(port)]
    return cmd + ["-m", "vramplan"] + child_arguments(plan, options)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _absolute(options: TrainOptions) -> TrainOptions:
    """Paths the children read, made absolute (they start in this folder, but a path in a
    printed command line should mean the same anywhere)."""
    import dataclasses

    def absolute(path):
        return None if path is None else Path(path).absolute()

    return dataclasses.replace(options, model_path=absolute(options.model_path), data=absolute(options.data),
                               output=absolute(options.output), class_data=absolute(options.class_data))


def refuse_resume(spec: TrainingSpec, options: TrainOptions) -> None:
    """--resume needs checkpoints, which sharded runs do not write yet (vramplan.train.ranks)."""
    if options.resume and spec.strategy is not None and spec.strategy.value != "ddp":
        raise UsageError(f"--resume: runs under {spec.strategy.value} write no checkpoints yet (their optimizer "
                         f"states are sharded over the ranks); only ddp runs resume")


def check_devices(spec: TrainingSpec, options: TrainOptions) -> str:
    """"cuda" or "cpu" for the children; refuses a machine with fewer GPUs than the plan, and a
    sharded plan on the CPU: without CUDA accelerate runs an FSDP or DeepSpeed config as plain
    MULTI_CPU processes (measured: its state reports MULTI_CPU), so the plan would not be the run."""
    if options.device == "cpu":
        return _cpu(spec, "--device cpu")
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0 and options.device == "auto":
        return _cpu(spec, "no CUDA GPU here")
    if count < spec.num_gpus:
        raise UsageError(f"the plan is for {spec.num_gpus} GPUs but this machine has {count}: make a plan "
                         f"for what it has (vramplan fit --gpus {max(count, 1)}x...), or --device cpu to "
                         f"run the {spec.num_gpus} processes on the CPU")
    return "cuda"


def _cpu(spec: TrainingSpec, why: str) -> str:
    strategy = spec.strategy.value if spec.strategy else "ddp"
    if strategy != "ddp":
        raise UsageError(f"{why}: the {spec.num_gpus} processes would run on the CPU, where accelerate runs "
                         f"a {strategy} config as plain data parallel; {strategy} needs CUDA GPUs (on the CPU, "
                         f"make a ddp plan: --strategy ddp)")
    return "cpu"


def launch(spec: TrainingSpec, options: TrainOptions, console=None, run=None,
           environ: dict | None = None) -> int:
    """Check the inputs, write the launch files and run `accelerate launch`; its exit status."""
    from rich.console import Console

    from vramplan.distributed.configs import write_launch_files
    from vramplan.train.inputs import check_data, check_model, check_output

    console = console or Console(stderr=True)
    options.check()
    refuse_resume(spec, options)
    check_model(spec, Path(options.model_path))
    check_data(spec, options)
    check_output(spec, options)
    device = check_devices(spec, options)
    options = _absolute(options)
    with tempfile.TemporaryDirectory(prefix="vramplan-launch-") as folder:
        folder = Path(folder)
        plan = folder / "plan.json"
        plan.write_text(json.dumps(spec.to_json(), indent=2) + "\n")
        files = write_launch_files(spec, folder)
        cmd = launch_command(files[0], plan, options, port=free_port())
        shown = ["accelerate", "launch"] + cmd[3:]
        console.print(f"[bold]{spec.num_gpus} processes[/] ({spec.strategy.value if spec.strategy else 'ddp'}"
                      f"{', on the CPU' if device == 'cpu' else ''}): {shlex.join(shown)}", highlight=False,
                      soft_wrap=True)
        env = dict(os.environ if environ is None else environ)
        completed = (run or subprocess.run)(cmd, env=env)
        return completed.returncode


__all__ = ["LAUNCHED_FLAG", "child_arguments", "is_rank", "launch", "launch_command", "needs_launch",
           "under_accelerate", "world_size"]

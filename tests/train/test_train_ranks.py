"""A real several-process run without a GPU: `vramplan train` on a two-GPU ddp plan with
--device cpu launches two processes with `accelerate launch` (torchrun underneath), each joins
the job through accelerate's Accelerator (gloo, as accelerate picks without CUDA), DDP
all-reduces the gradients, and rank 0 writes. Proof it ran as two ranks: the run file's per-rank
record -- each rank trained on different images, and both ended with the same weights (without
the all-reduce they would differ)."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from vramplan.train.launch import LAUNCH_ENVIRONMENT


def launch(kit, tiny, tmp_path, output, *extra, **plan):
    model, images = tiny
    spec = kit.spec(model, method="lora", rank=4, gpus="2x24GB", **plan)
    path = kit.plan(tmp_path / "plan.json", spec)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENVIRONMENT}
    cmd = [sys.executable, "-m", "vramplan", "train", "--plan", str(path), "--model", str(model),
           "--data", str(images), "--output", str(output), "--device", "cpu", "--learning-rate", "0.01",
           "--quiet", *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def test_two_cpu_processes_train_lora_under_ddp(kit, tiny, tmp_path):
    output = tmp_path / "run"
    done = launch(kit, tiny, tmp_path, output, "--steps", "2", "--checkpoint-every", "1",
                  gradient_accumulation_steps=2)
    assert "2 processes (ddp, on the CPU): accelerate launch --config_file" in done.stderr
    info = json.loads((output / "vramplan-run.json").read_text())
    assert info["status"] == "done" and info["steps_done"] == 2
    assert info["processes"] == 2 and info["strategy"] == "ddp"
    ranks = info["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["device"] == "cpu" for r in ranks)
    # 2 steps x 2 accumulation micro-batches each, from one order: rank 0 and 1 take turns
    assert [r["micro_batches"] for r in ranks] == [4, 4]
    from vramplan.train.data import Sampler, image_files

    order = Sampler(len(image_files(tiny[1], "--data")), 1, 0)
    interleaved = [i for pair in zip(ranks[0]["examples"], ranks[1]["examples"]) for i in pair]
    assert interleaved == [order.indices(m)[0] for m in range(8)]
    assert all(a != b for a, b in zip(ranks[0]["examples"], ranks[1]["examples"]))
    assert ranks[0]["weights_checksum"] == ranks[1]["weights_checksum"]
    # rank 0 wrote a checkpoint and the adapter, nobody else wrote anything
    assert sorted(p.name for p in output.iterdir()) == ["checkpoint-1", "pytorch_lora_weights.safetensors",
                                                        "vramplan-run.json"]
    weights = load_file(str(output / "pytorch_lora_weights.safetensors"))
    assert weights and all("lora" in k for k in weights)
    pipe = kit.load(tiny[0])
    before = kit.generate(pipe)
    pipe.load_lora_weights(str(output))
    assert abs(kit.generate(pipe) - before).max() > 0


@pytest.mark.slow
def test_a_resumed_two_process_run_matches_an_uninterrupted_one(kit, tiny, tmp_path):
    whole = tmp_path / "whole"
    launch(kit, tiny, tmp_path, whole, "--steps", "3")
    parts = tmp_path / "parts"
    launch(kit, tiny, tmp_path, parts, "--steps", "2", "--checkpoint-every", "1")
    # continue from checkpoint-1 to step 3: same data order, same per-rank noise, same states
    launch(kit, tiny, tmp_path, parts, "--steps", "3", "--checkpoint-every", "1", "--resume")
    a = load_file(str(whole / "pytorch_lora_weights.safetensors"))
    b = load_file(str(parts / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-6, key

"""A run killed after a checkpoint and resumed ends where an uninterrupted run ends: the same step
count and the same weights, bit for bit (same seed, data order from the step number, RNG restored)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from vramplan.step.build import BuiltStep
from vramplan.train import train
from vramplan.train.checkpoint import checkpoints


def _weights(folder):
    return load_file(str(folder / "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("settings", [dict(method="lora", rank=4),
                                      dict(method="lora", rank=4, gradient_accumulation_steps=2)],
                         ids=["plain", "accumulation"])
def test_resume_after_a_kill_matches_an_uninterrupted_run(tiny, kit, tmp_path, monkeypatch, settings):
    model, images = tiny
    spec = kit.spec(model, **settings)
    micro = spec.gradient_accumulation_steps

    whole = train(spec, kit.options(model, images, tmp_path / "whole", steps=4, checkpoint_every=2),
                  kit.console())

    killed = tmp_path / "killed"
    original, calls = BuiltStep.run_step, []

    def dies_in_step_three(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 2 * micro:          # steps 1 and 2 done, checkpoint-2 written
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BuiltStep, "run_step", dies_in_step_three)
    with pytest.raises(KeyboardInterrupt):
        train(spec, kit.options(model, images, killed, steps=4, checkpoint_every=2), kit.console())
    monkeypatch.setattr(BuiltStep, "run_step", original)
    assert [step for step, _ in checkpoints(killed)] == [2]
    assert not (killed / "pytorch_lora_weights.safetensors").exists()
    (killed / ".tmp-checkpoint-4-12345").mkdir()      # what a kill during a checkpoint write leaves

    resumed = train(spec, kit.options(model, images, killed, steps=4, checkpoint_every=2, resume=True),
                    kit.console())
    assert resumed.steps == whole.steps == 4
    a, b = _weights(tmp_path / "whole"), _weights(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not (killed / ".tmp-checkpoint-4-12345").exists()
    assert json.loads((killed / "vramplan-run.json").read_text())["status"] == "done"


def test_checkpoints_are_complete_and_pruned(tiny, kit, tmp_path):
    model, images = tiny
    spec = kit.spec(model, method="textual-inversion")
    train(spec, kit.options(model, images, tmp_path, steps=7, checkpoint_every=2, keep_checkpoints=2),
          kit.console())
    found = checkpoints(tmp_path)
    assert [step for step, _ in found] == [4, 6]
    for _, folder in found:
        assert {p.name for p in folder.iterdir()} == {"trainable.safetensors", "optimizer.pt", "rng.pt",
                                                      "state.json"}
        state = json.loads((folder / "state.json").read_text())
        assert state["plan"] == spec.to_json()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]

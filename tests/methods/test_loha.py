"""LoHa: parameter counts against real peft (LoHaConfig), the saved file against a real save."""

import os

import pytest
import torch
from peft import LoHaConfig

from vramplan.methods import get_method
from vramplan.methods.loha import LoHa
from vramplan.spec import LoraTargets, Method

LOHA = get_method(Method.LOHA)


@pytest.mark.parametrize("targets", list(LoraTargets))
@pytest.mark.parametrize("rank", [1, 4, 16])
def test_unet_counts_match_peft(tiny, targets, rank):
    unet = tiny.unet()
    inventory = tiny.walk(unet, "unet")
    spec = tiny.spec(model="sd15", method="loha", rank=rank, lora_targets=targets.value)
    tiny.add(unet, LoHaConfig(r=rank, alpha=rank, target_modules=[m.name for m in LOHA.targets(spec, inventory)]))
    assert LOHA.trainable(spec, {"unet": inventory}) == {"unet": tiny.peft_trainable(unet)}


@pytest.mark.parametrize("rank", [2, 8])
def test_effective_conv2d_and_groups_match_peft(tiny, rank):
    model = torch.nn.Sequential(torch.nn.Conv2d(12, 24, 3, padding=1, groups=3), torch.nn.Conv2d(24, 8, 1),
                                torch.nn.Conv2d(8, 8, (3, 1)), torch.nn.Linear(8, 5))
    inventory = tiny.walk(model, "unet")
    spec = tiny.spec(model="sd15", method="loha", rank=rank, lora_targets="all-linear+conv")
    tiny.add(model, LoHaConfig(r=rank, target_modules=["0", "1", "2", "3"], use_effective_conv2d=True))
    assert LoHa(use_effective_conv2d=True).trainable(spec, {"unet": inventory}) == {"unet": tiny.peft_trainable(model)}
    # 1x1 convs stay flattened even then (peft: `use_effective_conv2d and kernel_size != (1, 1)`)
    assert any(name.endswith("1.hada_w1_a.default") and p.dim() == 2 for name, p in model.named_parameters())


def test_text_encoder_counts_match_peft(tiny):
    te = tiny.clip()
    spec = tiny.spec(model="sd15", method="loha", rank=4, train_text_encoder=True)
    inventories = {"unet": tiny.walk(tiny.unet(), "unet"), "text_encoder": tiny.walk(te, "text_encoder")}
    tiny.add(te, LoHaConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    assert LOHA.trainable(spec, inventories)["text_encoder"] == tiny.peft_trainable(te)


def test_sd15_attn_count():
    from vramplan.models.inventory import load_inventory
    from vramplan.spec import build_spec

    spec = build_spec({"model": "sd15", "method": "loha", "rank": 16})
    # NOTES.md, measured with peft on the meta SD 1.5 UNet: 6,377,472 = 2 x 16 x 199,296
    assert LOHA.trainable(spec, {"unet": load_inventory("sd15", "unet")}) == {"unet": 6_377_472}


def test_file_size_matches_save(tiny, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    unet = tiny.unet()
    inventories = {"unet": tiny.walk(unet, "unet")}
    spec = tiny.spec(model="sd15", method="loha", rank=4, lora_targets="all-linear+conv")
    unet.requires_grad_(False)
    unet.add_adapter(LoHaConfig(r=4, alpha=4, target_modules=[m.name for m in LOHA.targets(spec, inventories["unet"])]))
    layers = {k: v.to(torch.float16) for k, v in get_peft_model_state_dict(unet).items()}
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    assert tiny.saved_keys(path) == {LOHA.saved_key(spec, "unet", t.name)
                                     for t in LOHA.trainable_tensors(spec, inventories)["unet"]}
    assert os.path.getsize(path) == LOHA.adapter_file_bytes(spec, inventories)

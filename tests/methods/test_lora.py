"""LoRA: parameter counts against real peft, saved-file size against real diffusers saves."""

import os

import pytest
import torch
from peft import LoraConfig

from vramplan.errors import UsageError
from vramplan.methods import get_method
from vramplan.methods.lora import lora_module_params, to_diffusers_key
from vramplan.spec import LoraTargets, Method

LORA = get_method(Method.LORA)


@pytest.mark.parametrize("targets", list(LoraTargets))
@pytest.mark.parametrize("rank", [1, 4, 8])
def test_unet_counts_match_peft(tiny, targets, rank):
    unet = tiny.unet()
    inventory = tiny.walk(unet, "unet")
    spec = tiny.spec(model="sd15", method="lora", rank=rank, lora_targets=targets.value)
    names = [m.name for m in LORA.targets(spec, inventory)]
    tiny.add(unet, LoraConfig(r=rank, lora_alpha=rank, target_modules=names))
    assert sorted(tiny.adapted(unet)) == sorted(names)
    assert LORA.trainable(spec, {"unet": inventory}) == {"unet": tiny.peft_trainable(unet)}


@pytest.mark.parametrize("rank", [2, 16])
def test_text_encoders_counted_when_trained(tiny, rank):
    unet, te1, te2 = tiny.unet(), tiny.clip(), tiny.clip(projection=True)
    inventories = {"unet": tiny.walk(unet, "unet"), "text_encoder": tiny.walk(te1, "text_encoder"),
                   "text_encoder_2": tiny.walk(te2, "text_encoder_2")}
    spec = tiny.spec(model="sdxl", method="lora", rank=rank, train_text_encoder=True)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    tiny.add(te1, config)
    tiny.add(te2, config)
    counts = LORA.trainable(spec, inventories)
    assert counts["text_encoder"] == tiny.peft_trainable(te1)
    assert counts["text_encoder_2"] == tiny.peft_trainable(te2)
    assert "text_encoder" not in LORA.trainable(spec.replace(train_text_encoder=False), inventories)


@pytest.mark.parametrize("rank,groups", [(4, 1), (4, 4), (8, 2), (6, 3)])
def test_conv_counts_match_peft_with_groups(tiny, rank, groups):
    model = torch.nn.Sequential(torch.nn.Conv2d(12, 24, 3, padding=1, groups=groups),
                                torch.nn.Conv2d(24, 6, 1), torch.nn.Linear(6, 10))
    inventory = tiny.walk(model, "unet")
    spec = tiny.spec(model="sd15", method="lora", rank=rank, lora_targets="all-linear+conv")
    tiny.add(model, LoraConfig(r=rank, target_modules=["0", "1", "2"]))
    assert LORA.trainable(spec, {"unet": inventory}) == {"unet": tiny.peft_trainable(model)}
    # lora_A of a grouped conv sees every input channel: r * in * k * k, then out * r / groups
    assert lora_module_params(inventory.modules[0], rank) == rank * 12 * 9 + 24 * rank // groups


def test_conv_rank_must_divide_by_groups(tiny):
    model = torch.nn.Sequential(torch.nn.Conv2d(12, 24, 3, groups=4))
    spec = tiny.spec(model="sd15", method="lora", rank=6, lora_targets="all-linear+conv")
    with pytest.raises(ValueError):  # peft itself refuses
        tiny.add(model, LoraConfig(r=6, target_modules=["0"]))
    with pytest.raises(UsageError, match="divide by the groups"):
        LORA.trainable(spec, {"unet": tiny.walk(model, "unet")})


def test_diffusers_attn_list_selects_our_attn_targets(tiny):
    unet = tiny.unet()
    spec = tiny.spec(model="sd15", method="lora", rank=4)
    ours = [m.name for m in LORA.targets(spec, tiny.walk(unet, "unet"))]
    # train_text_to_image_lora.py / train_dreambooth_lora_sdxl.py: target_modules=[to_k, to_q, to_v, to_out.0]
    tiny.add(unet, LoraConfig(r=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    assert sorted(tiny.adapted(unet)) == sorted(ours)


@pytest.mark.parametrize("dtype", ["F16", "F32"])
def test_sd_file_size_matches_diffusers_save(tiny, tmp_path, dtype):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet, te = tiny.unet(), tiny.clip()
    inventories = {"unet": tiny.walk(unet, "unet"), "text_encoder": tiny.walk(te, "text_encoder")}
    spec = tiny.spec(model="sd15", method="lora", rank=4, lora_targets="all-linear+conv",
                     train_text_encoder=True)
    unet.requires_grad_(False)
    te.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=[m.name for m in LORA.targets(spec, inventories["unet"])]))
    # what transformers' `add_adapter` does (it wants peft >= 0.22 in transformers 5)
    tiny.add(te, LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                            target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    torch_dtype = {"F16": torch.float16, "F32": torch.float32}[dtype]
    unet_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet.to(torch_dtype)))
    te_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(te.to(torch_dtype)))
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=unet_layers,
                                              text_encoder_lora_layers=te_layers, safe_serialization=True)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    expected_keys = {LORA.saved_key(spec, component, t.name)
                     for component, ts in LORA.trainable_tensors(spec, inventories).items() for t in ts}
    assert tiny.saved_keys(path) == expected_keys
    assert any(".to_q.lora.down.weight" in k for k in expected_keys)
    assert any(".q_proj.lora_linear_layer.up.weight" in k for k in expected_keys)
    assert os.path.getsize(path) == LORA.adapter_file_bytes(spec, inventories, dtype=dtype)


def test_flux_file_keeps_peft_names(tiny, tmp_path):
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    transformer = tiny.flux()
    inventories = {"transformer": tiny.walk(transformer, "transformer")}
    spec = tiny.spec(model="flux-dev", method="lora", rank=8, lora_targets="attn-mlp")
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                       target_modules=[m.name for m in LORA.targets(spec, inventories["transformer"])]))
    layers = {k: v.to(torch.float16) for k, v in get_peft_model_state_dict(transformer).items()}
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=layers)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    assert all(k.startswith("transformer.") and ".lora_" in k for k in tiny.saved_keys(path))
    assert os.path.getsize(path) == LORA.adapter_file_bytes(spec, inventories)
    assert LORA.trainable(spec, inventories) == {"transformer": tiny.peft_trainable(transformer)}


def test_to_diffusers_key_takes_the_first_match_only():
    assert to_diffusers_key("mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight") \
        == "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight"
    assert to_diffusers_key("a.ff.net.2.lora_B.weight") == "a.ff.net.2.lora_B.weight"
    assert to_diffusers_key("text_model.encoder.layers.0.self_attn.out_proj.lora_B.weight") \
        == "text_model.encoder.layers.0.self_attn.out_proj.lora_linear_layer.up.weight"


def test_sd15_attn_rank_counts(tiny):
    from vramplan.models.inventory import load_inventory

    spec = tiny.spec(model="sd15", method="lora", rank=4)
    # 16 transformer blocks x (attn1 + attn2) x 4 projections; sum(in + out) = 199,296
    assert LORA.trainable(spec, {"unet": load_inventory("sd15", "unet")}) == {"unet": 4 * 199_296}

"""LoKr: parameter counts against real peft (LoKrConfig) over ranks, factors and the options that
change the factorisation; the saved file against a real save."""

import os

import pytest
import torch
from peft import LoKrConfig

from vramplan.methods import get_method
from vramplan.methods.lokr import LoKr, factorization
from vramplan.spec import Method

LOKR = get_method(Method.LOKR)


TE_NAMES = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _count(tiny, rank, factor, **options):
    unet, te = tiny.unet(), tiny.clip()  # the tiny CLIP's MLP is 32 -> 37 (prime): factorization (1, 37)
    unet_inventory, te_inventory = tiny.walk(unet, "unet"), tiny.walk(te, "text_encoder")
    spec = tiny.spec(model="sd15", method="lokr", rank=rank, lokr_factor=factor, lora_targets="all-linear+conv")
    impl = LoKr(**options)
    config = dict(r=rank, alpha=rank, decompose_factor=factor, **options)
    tiny.add(unet, LoKrConfig(target_modules=[m.name for m in impl.targets(spec, unet_inventory)], **config))
    tiny.add(te, LoKrConfig(target_modules=TE_NAMES, **config))
    ours_te = sum(t.numel for m in te_inventory.find(TE_NAMES) for t in impl.module_tensors(spec, m))
    return impl.trainable(spec, {"unet": unet_inventory})["unet"], tiny.peft_trainable(unet), \
        ours_te, tiny.peft_trainable(te)


@pytest.mark.parametrize("factor", [-1, 2, 4, 8])
@pytest.mark.parametrize("rank", [1, 4, 8, 64])
def test_counts_match_peft(tiny, rank, factor):
    ours_unet, peft_unet, ours_te, peft_te = _count(tiny, rank, factor)
    assert ours_unet == peft_unet
    assert ours_te == peft_te


@pytest.mark.parametrize("options", [{"decompose_both": True}, {"use_effective_conv2d": True},
                                     {"decompose_both": True, "use_effective_conv2d": True}])
@pytest.mark.parametrize("rank,factor", [(1, -1), (2, 4), (4, -1), (16, 8)])
def test_options_match_peft(tiny, rank, factor, options):
    ours_unet, peft_unet, ours_te, peft_te = _count(tiny, rank, factor, **options)
    assert ours_unet == peft_unet
    assert ours_te == peft_te


@pytest.mark.parametrize("dimension,factor", [(320, -1), (768, -1), (1280, 4), (37, -1), (37, 4), (96, 5),
                                              (3072, 16), (1, -1), (640, 64)])
def test_factorization_matches_peft(dimension, factor):
    from peft.tuners.lokr.layer import factorization as peft_factorization

    assert factorization(dimension, factor) == peft_factorization(dimension, factor)


def test_grouped_conv_matches_peft(tiny):
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, groups=4), torch.nn.Conv2d(32, 12, 3, groups=2))
    inventory = tiny.walk(model, "unet")
    spec = tiny.spec(model="sd15", method="lokr", rank=2, lora_targets="all-linear+conv")
    tiny.add(model, LoKrConfig(r=2, target_modules=["0", "1"]))
    assert LOKR.trainable(spec, {"unet": inventory}) == {"unet": tiny.peft_trainable(model)}


def test_sd15_attn_count():
    from vramplan.models.inventory import load_inventory
    from vramplan.spec import build_spec

    spec = build_spec({"model": "sd15", "method": "lokr", "rank": 16})
    # NOTES.md, measured with peft on the meta SD 1.5 UNet, q/k/v/out r16: 193,664
    assert LOKR.trainable(spec, {"unet": load_inventory("sd15", "unet")}) == {"unet": 193_664}


def test_file_size_matches_save(tiny, tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    unet = tiny.unet()
    inventories = {"unet": tiny.walk(unet, "unet")}
    spec = tiny.spec(model="sd15", method="lokr", rank=4, lora_targets="all-linear+conv")
    unet.requires_grad_(False)
    unet.add_adapter(LoKrConfig(r=4, alpha=4, target_modules=[m.name for m in LOKR.targets(spec, inventories["unet"])]))
    layers = {k: v.to(torch.float16) for k, v in get_peft_model_state_dict(unet).items()}
    StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=layers)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    assert tiny.saved_keys(path) == {LOKR.saved_key(spec, "unet", t.name)
                                     for t in LOKR.trainable_tensors(spec, inventories)["unet"]}
    assert os.path.getsize(path) == LOKR.adapter_file_bytes(spec, inventories)

"""The FSDP wrap units read from inventories are the ones torch's transformer_auto_wrap_policy
makes from the real modules: same wrapped paths, same parameters per unit."""

import pytest
import torch

from vramplan.distributed.units import WRAP_CLASSES, wrap_units
from vramplan.models.catalog import MODELS
from vramplan.models.inventory import load_model_inventories
from vramplan.step.loading import build_component


def torch_units(module: torch.nn.Module) -> dict[str, int]:
    """Module path -> parameters FSDP1's `_recursive_wrap` gives that unit: the wrapped module's
    parameters minus those of wrapped modules below it ("" is the root, the whole model)."""
    names = {name for name, _ in WRAP_CLASSES[type(module).__name__]}
    wrapped = [path for path, m in module.named_modules() if type(m).__name__ in names]
    units = {"": 0, **{p: 0 for p in wrapped}}
    for pname, p in module.named_parameters():
        owner = max((u for u in units if u == "" or pname.startswith(u + ".")), key=len)
        units[owner] += p.numel()
    return units


@pytest.mark.parametrize("model, component", [
    ("sd15", "unet"), ("sd15", "text_encoder"), ("sdxl", "unet"), ("sdxl", "text_encoder_2"),
    ("sd35-medium", "transformer"), ("sd35-medium", "text_encoder_3"), ("flux-dev", "transformer"),
])
def test_units_match_the_wrap_policy_on_the_real_modules(model, component):
    info = MODELS[model]
    comp = next(c for c in info.components if c.name == component)
    module = build_component(info, comp, "meta")
    expected = torch_units(module)
    ours = {u.path: u.numel for u in wrap_units(component, load_model_inventories(info)[component])}
    assert ours == {path: n for path, n in expected.items() if n or path == ""}


def test_sd15_unet_units_by_hand():
    units = wrap_units("unet", load_model_inventories(MODELS["sd15"])["unet"])
    root = units[0]
    # conv_in 4*320*9+320, time_embedding 320*1280+1280 + 1280*1280+1280, conv_norm_out 2*320,
    # conv_out 320*4*9+4
    assert root.path == "" and root.numel == 11840 + 410880 + 1639680 + 640 + 11524
    assert sum(u.numel for u in units) == 859_520_964
    biggest = max(units, key=lambda u: u.numel)
    # up_blocks.0.resnets.0: 2560->1280 ResnetBlock2D: norm1 2*2560, conv1 2560*1280*9+1280,
    # time_emb_proj 1280*1280+1280, norm2 2*1280, conv2 1280*1280*9+1280, shortcut 2560*1280+1280
    assert biggest.path == "up_blocks.0.resnets.0"
    assert biggest.numel == 5120 + 29492480 + 1639680 + 2560 + 14746880 + 3278080


def test_adapter_tensors_join_the_unit_of_their_module_in_module_order():
    inventory = load_model_inventories(MODELS["sd15"])["unet"]
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    extra = [(f"{name}.lora_A.weight", 16 * 320, True), (f"{name}.lora_B.weight", 320 * 16, True)]
    units = wrap_units("unet", inventory, extra)
    unit = next(u for u in units if u.path == "down_blocks.0.attentions.0.transformer_blocks.0")
    names = [n for n, _ in unit.params]
    at = names.index(f"{name}.weight")
    assert names[at + 1: at + 3] == [e[0] for e in extra]
    assert unit.trainable_numel == 2 * 16 * 320

"""Tiny real diffusers / transformers models, their inventories, and peft's own counts of them.

The inventories here are walked from the live modules with the same `ModuleEntry` / `Inventory`
types the shipped ones load into, so each test compares our arithmetic with what peft builds on
the very same modules.
"""

import os
from types import SimpleNamespace

import pytest
import torch

from vramplan.models.inventory import Inventory, ModuleEntry
from vramplan.spec import build_spec

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

_KINDS = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Embedding", "LayerNorm", "GroupNorm")


def _kind(module) -> str:
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn") and cls.__name__ in _KINDS:
            return cls.__name__
    return type(module).__name__


def walk_inventory(module, component: str) -> Inventory:
    entries = []
    for name, sub in module.named_modules():
        own = list(sub.named_parameters(recurse=False))
        if not own:
            continue
        kind = _kind(sub)
        geometry = {}
        if kind == "Linear":
            geometry = dict(in_features=sub.in_features, out_features=sub.out_features)
        elif kind.startswith("Conv"):
            geometry = dict(in_channels=sub.in_channels, out_channels=sub.out_channels,
                            kernel_size=tuple(sub.kernel_size), groups=sub.groups)
        elif kind == "Embedding":
            geometry = dict(num_embeddings=sub.num_embeddings, embedding_dim=sub.embedding_dim)
        entries.append(ModuleEntry(
            name=name, kind=kind, cls=type(sub).__name__, params=sum(p.numel() for _, p in own),
            param_shapes=tuple((n, tuple(p.shape)) for n, p in own),
            bias=getattr(sub, "bias", None) is not None, **geometry))
    params = tuple((n, tuple(p.shape)) for n, p in module.named_parameters())
    return Inventory(model="tiny", component=component, cls=type(module).__name__, library="test",
                     config={}, total_params=sum(p.numel() for p in module.parameters()),
                     params=params, modules=tuple(entries))


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=24,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8)


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                  pooled_projection_dim=20, axes_dims_rope=(4, 4, 8))


def tiny_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    # two layers, the first with SD3.5 Medium's second self-attention (attn2), the last context_pre_only
    return SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                 joint_attention_dim=24, pooled_projection_dim=20, out_channels=4,
                                 dual_attention_layers=(0,))


def tiny_clip(projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=16,
                            bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def peft_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def add_peft_adapter(model, config):
    """peft's injection as diffusers' `add_adapter` does it, with the base frozen first."""
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    inject_adapter_in_model(config, model)
    return model


def adapted_modules(model) -> list[str]:
    """Names of the modules peft wrapped."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]


def saved_keys(path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return set(f.keys())


@pytest.fixture(scope="session")
def tiny():
    """The helpers above, for tests (conftest modules are not for importing)."""
    return SimpleNamespace(unet=tiny_unet, flux=tiny_flux, sd3=tiny_sd3, clip=tiny_clip,
                           walk=walk_inventory, peft_trainable=peft_trainable, add=add_peft_adapter,
                           adapted=adapted_modules, saved_keys=saved_keys,
                           spec=lambda **options: build_spec(options))

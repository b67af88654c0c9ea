"""Which modules `--lora-targets` wraps, per model family, as the diffusers training scripts do.

Names match the way peft matches `target_modules` (a name equal to the target or ending in "." +
target; `Inventory.find`). The lists come from diffusers' example scripts (repository
huggingface/diffusers, examples/):
  * UNet families (sd1, sd2, sdxl): ["to_k", "to_q", "to_v", "to_out.0"] in
    text_to_image/train_text_to_image_lora.py and dreambooth/train_dreambooth_lora_sdxl.py
    (dreambooth/train_dreambooth_lora.py adds add_k_proj/add_v_proj, which SD/SDXL UNets lack).
  * MMDiT families (sd3, flux): "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out" in
    dreambooth/train_dreambooth_lora_sd3.py and train_dreambooth_lora_flux.py. The "attn." prefix
    is theirs: it leaves SD3.5 Medium's second attention (`attn2`) alone. (The Flux script's default
    list also takes ff / ff_context of the double blocks, without the single blocks' MLP: between
    our `attn` and `attn-mlp`.)
  * Text encoders (CLIP): ["q_proj", "k_proj", "v_proj", "out_proj"] in every script above.
`attn-mlp` adds the feed-forward Linears: ff.net.0.proj / ff.net.2 (diffusers `FeedForward`; for
MMDiT also ff_context), and for Flux's single-stream blocks their MLP input `proj_mlp` and the
block's `proj_out` (which projects attention and MLP outputs together). `all-linear` is every
Linear of the denoiser, `all-linear+conv` adds every Conv2d (LoCon).
"""

from __future__ import annotations

import re

from vramplan.models.inventory import Inventory, ModuleEntry, kept_per_inventory
from vramplan.spec import LoraTargets, TrainingSpec

UNET_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
UNET_MLP = ("ff.net.0.proj", "ff.net.2")
MMDIT_ATTN = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
              "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
MMDIT_MLP = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
FLUX_SINGLE_MLP = re.compile(r"(^|\.)single_transformer_blocks\.\d+\.(proj_mlp|proj_out)$")
TEXT_ENCODER_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")

MMDIT_FAMILIES = frozenset({"sd3", "flux"})


def _matches(name: str, suffixes: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def _is_attn(entry: ModuleEntry, family: str) -> bool:
    return entry.is_linear and _matches(entry.name, MMDIT_ATTN if family in MMDIT_FAMILIES else UNET_ATTN)


def _is_mlp(entry: ModuleEntry, family: str) -> bool:
    if not entry.is_linear:
        return False
    if family in MMDIT_FAMILIES:
        return _matches(entry.name, MMDIT_MLP) or bool(FLUX_SINGLE_MLP.search(entry.name))
    return _matches(entry.name, UNET_MLP)


_SELECT = {
    LoraTargets.ATTN: lambda m, family: _is_attn(m, family),
    LoraTargets.ATTN_MLP: lambda m, family: _is_attn(m, family) or _is_mlp(m, family),
    LoraTargets.ALL_LINEAR: lambda m, family: m.is_linear,
    LoraTargets.ALL_LINEAR_CONV: lambda m, family: m.is_linear or m.kind == "Conv2d",
}


def denoiser_targets(spec: TrainingSpec, inventory: Inventory) -> list[ModuleEntry]:
    """The denoiser modules `spec.lora_targets` selects, in the inventory's (module) order (a new
    list each call; the selection over an inventory's thousand-odd modules is made once)."""
    targets = spec.lora_targets or LoraTargets.ATTN
    family = spec.model.family
    select = _SELECT[targets]
    return list(kept_per_inventory(inventory, ("targets", targets, family),
                                   lambda: tuple(m for m in inventory.modules if select(m, family))))


def text_encoder_targets(inventory: Inventory) -> list[ModuleEntry]:
    """The text-encoder modules the diffusers scripts wrap with `--train_text_encoder`."""
    return list(inventory.find(TEXT_ENCODER_ATTN, kind="Linear"))

"""LoRA, as peft 0.21.2 builds it (peft/tuners/lora/layer.py).

Per wrapped module, rank r, no bias (`lora_bias=False`, the default):
  * Linear(in, out) (`LoraLayer.update_layer`): lora_A = Linear(in, r), lora_B = Linear(r, out)
    -> r * (in + out) parameters.
  * ConvNd(in, out, kernel k, groups g) (`_ConvNd.update_layer`): lora_A = ConvNd(in, r, k) with
    groups 1 (all input channels, whatever g), lora_B = ConvNd(r, out, 1x1, groups=g)
    -> r * in * prod(k) + out * r / g; peft refuses r not divisible by g.
lora_B starts at zero (`reset_lora_parameters`, both for init_lora_weights=True and "gaussian",
which the diffusers scripts pass).

Saved keys: `get_peft_model_state_dict` gives "<module>.lora_A.weight"; the diffusers SD1.x/2.x/
SDXL scripts then apply `convert_state_dict_to_diffusers` (diffusers/utils/state_dict_utils.py,
PEFT_TO_DIFFUSERS: "to_q.lora_A" -> "to_q.lora.down", ".q_proj.lora_A" ->
".q_proj.lora_linear_layer.down", ...; first matching pattern only), while the SD3 and Flux scripts
save the peft names as they are; `save_lora_weights` prefixes "unet." / "transformer." /
"text_encoder." ...
"""

from __future__ import annotations

from math import prod

from vramplan.errors import UsageError
from vramplan.methods.base import AdapterMethod, TrainableTensor, register_method
from vramplan.models.inventory import ModuleEntry
from vramplan.spec import Method

# diffusers 0.42.1 utils/state_dict_utils.py PEFT_TO_DIFFUSERS, in its order (the first match wins).
PEFT_TO_DIFFUSERS = (
    (".q_proj.lora_B", ".q_proj.lora_linear_layer.up"),
    (".q_proj.lora_A", ".q_proj.lora_linear_layer.down"),
    (".k_proj.lora_B", ".k_proj.lora_linear_layer.up"),
    (".k_proj.lora_A", ".k_proj.lora_linear_layer.down"),
    (".v_proj.lora_B", ".v_proj.lora_linear_layer.up"),
    (".v_proj.lora_A", ".v_proj.lora_linear_layer.down"),
    (".out_proj.lora_B", ".out_proj.lora_linear_layer.up"),
    (".out_proj.lora_A", ".out_proj.lora_linear_layer.down"),
    ("to_k.lora_A", "to_k.lora.down"),
    ("to_k.lora_B", "to_k.lora.up"),
    ("to_q.lora_A", "to_q.lora.down"),
    ("to_q.lora_B", "to_q.lora.up"),
    ("to_v.lora_A", "to_v.lora.down"),
    ("to_v.lora_B", "to_v.lora.up"),
    ("to_out.0.lora_A", "to_out.0.lora.down"),
    ("to_out.0.lora_B", "to_out.0.lora.up"),
)
# Families whose diffusers LoRA scripts convert the peft names before saving.
CONVERTING_FAMILIES = frozenset({"sd1", "sd2", "sdxl"})


def to_diffusers_key(key: str) -> str:
    """`convert_state_dict_to_diffusers` on one peft key (plus its ".processor." -> "." rule)."""
    key = key.replace(".processor.", ".")
    for pattern, replacement in PEFT_TO_DIFFUSERS:
        if pattern in key:
            return key.replace(pattern, replacement)
    return key


def lora_module_tensors(entry: ModuleEntry, rank: int) -> list[TrainableTensor]:
    if entry.is_linear:
        return [TrainableTensor("lora_A.weight", (rank, entry.in_features)),
                TrainableTensor("lora_B.weight", (entry.out_features, rank), zero_init=True)]
    if entry.is_conv:
        groups = entry.groups or 1
        if rank % groups:
            raise UsageError(f"--rank {rank} cannot wrap {entry.name} ({entry.kind} with groups={groups}): "
                             f"peft needs the rank to divide by the groups")
        kernel = tuple(entry.kernel_size)
        return [TrainableTensor("lora_A.weight", (rank, entry.in_channels, *kernel)),
                TrainableTensor("lora_B.weight", (entry.out_channels, rank // groups, *(1,) * len(kernel)),
                                zero_init=True)]
    raise UsageError(f"LoRA cannot wrap {entry.name}: a {entry.kind}, not a Linear or convolution")


def lora_module_params(entry: ModuleEntry, rank: int) -> int:
    return sum(prod(t.shape) for t in lora_module_tensors(entry, rank))


class LoRA(AdapterMethod):
    def module_tensors(self, spec, entry):
        return lora_module_tensors(entry, spec.rank)

    def peft_config(self, spec, target_modules):
        from peft import LoraConfig

        # the diffusers LoRA scripts: LoraConfig(r, lora_alpha, init_lora_weights="gaussian",
        # target_modules); lora_dropout 0 makes peft use nn.Identity.
        return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, init_lora_weights="gaussian",
                          target_modules=list(target_modules))

    def saved_key(self, spec, component, name):
        if spec.model.family in CONVERTING_FAMILIES:
            name = to_diffusers_key(name)
        return f"{component}.{name}"


register_method(Method.LORA, LoRA)

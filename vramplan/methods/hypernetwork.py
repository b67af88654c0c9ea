"""NovelAI-style hypernetworks, as AUTOMATIC1111's web UI trains them.

Source: AUTOMATIC1111/stable-diffusion-webui, modules/hypernetworks/hypernetwork.py.
`Hypernetwork.__init__` builds, for every size in `enable_sizes`, a pair of `HypernetworkModule`s
-- one transforms the cross-attention context before `to_k`, the other before `to_v`
(`apply_hypernetwork`). `HypernetworkModule.__init__` stacks, for each step of `layer_structure`
(e.g. 1, 2, 1), `Linear(int(dim * layer_structure[i]), int(dim * layer_structure[i+1]))` with a
bias; the defaults add nothing else with parameters (activation "linear" = none, no LayerNorm, no
dropout). Weights start normal(0, 0.01), biases `normal_(b, std=0)`, i.e. zeros.

Sizes: one per distinct cross-attention context width of the denoiser (the `in_features` of its
`attn2.to_k`): 768 for SD 1.x, 1024 for SD 2.x, 2048 for SDXL. (A1111's "Create hypernetwork" tab
also ticks 320, 640 and 1280 by default, sizes that only self-attention contexts have; we follow
NovelAI's cross-attention-only design.) MMDiT models (SD3, Flux) have no such cross-attention.

Saved file (ours; A1111 pickles `{size: (k_state_dict, v_state_dict)}` with torch.save): the same
tensors flattened to "<size>.<0 for k | 1 for v>.linear.<i>.weight|bias" in a safetensors file
without metadata.
"""

from __future__ import annotations

from vramplan.errors import UsageError
from vramplan.methods.base import (MethodImpl, TrainableTensor, denoiser_inventory, register_method,
                                   safetensors_file_bytes)
from vramplan.models.inventory import Inventory
from vramplan.spec import Method

UNET_FAMILIES = frozenset({"sd1", "sd2", "sdxl"})
DEFAULT_LAYERS = (1.0, 2.0, 1.0)


def context_widths(inventory: Inventory) -> list[int]:
    """The distinct widths of the cross-attention contexts, in first-seen order."""
    widths = []
    for m in inventory.find("attn2.to_k", kind="Linear"):
        if m.in_features not in widths:
            widths.append(m.in_features)
    return widths


def hypernetwork_module_tensors(width: int, layers) -> list[TrainableTensor]:
    """One `HypernetworkModule(width, layer_structure=layers)`, named as its state_dict."""
    tensors = []
    for i in range(len(layers) - 1):
        fan_in, fan_out = int(width * layers[i]), int(width * layers[i + 1])
        tensors += [TrainableTensor(f"linear.{i}.weight", (fan_out, fan_in)),
                    TrainableTensor(f"linear.{i}.bias", (fan_out,), zero_init=True)]
    return tensors


class Hypernetwork(MethodImpl):
    def trainable_tensors(self, spec, inventories):
        if spec.model.family not in UNET_FAMILIES:
            raise UsageError(f"--method hypernetwork needs a UNet with cross-attention (SD 1.x, 2.x, "
                             f"SDXL); {spec.model.name} is a {spec.model.family} transformer without "
                             f"one: use lora, loha or lokr")
        name, denoiser = denoiser_inventory(spec, inventories)
        layers = spec.hypernetwork_layers or DEFAULT_LAYERS
        return {name: [TrainableTensor(f"{width}.{which}.{t.name}", t.shape, t.zero_init)
                       for width in context_widths(denoiser) for which in (0, 1)
                       for t in hypernetwork_module_tensors(width, layers)]}

    def wrapped_modules(self, spec, component, inventories):
        name, denoiser = denoiser_inventory(spec, inventories)
        if component != name:
            return []
        return [m for m in denoiser.modules if m.is_linear and
                (m.name.endswith("attn2.to_k") or m.name.endswith("attn2.to_v"))]

    def template(self, spec, entry):
        return "hypernetwork", "", {"IN": entry.in_features, "OUT": entry.out_features}

    def adapter_prefix(self, spec, entry):
        # one MLP pair per context width, shared by every cross-attention layer of that width
        return f"{entry.in_features}.{0 if entry.name.endswith('to_k') else 1}."

    def adapter_file_bytes(self, spec, inventories, dtype: str = "F16") -> int:
        return safetensors_file_bytes([(t.name, t.shape) for ts in self.trainable_tensors(spec, inventories).values()
                                       for t in ts], dtype)


    def apply(self, spec, models, inventories):
        from vramplan.step.modules import HyperLinear, HypernetworkMLP, replace_module

        name, _ = denoiser_inventory(spec, inventories)
        for module in models.values():
            module.requires_grad_(False)
        denoiser = models[name]
        layers = spec.hypernetwork_layers or DEFAULT_LAYERS
        mlps = {}
        for entry in self.wrapped_modules(spec, name, inventories):
            base = denoiser.get_submodule(entry.name)
            key = (entry.in_features, entry.name.endswith("to_k"))
            if key not in mlps:
                mlps[key] = HypernetworkMLP(entry.in_features, layers, device=base.weight.device)
            replace_module(denoiser, entry.name, HyperLinear(base, mlps[key]))
        # registered on the denoiser so that .to() and parameters() see each MLP once
        denoiser.hypernetwork = torch_module_dict({f"{w}_{'k' if k else 'v'}": m for (w, k), m in mlps.items()})


def torch_module_dict(modules: dict):
    from torch import nn

    return nn.ModuleDict(modules)


register_method(Method.HYPERNETWORK, Hypernetwork)

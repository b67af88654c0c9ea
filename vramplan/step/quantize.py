"""Quantize the frozen denoiser's Linear layers with bitsandbytes (`--base-quant int8|nf4`).

As diffusers' `replace_with_bnb_linear` (diffusers/quantizers/bitsandbytes/utils.py) does for a
`BitsAndBytesConfig`: every `nn.Linear` becomes `bnb.nn.Linear8bitLt` (has_fp16_weights False) or
`bnb.nn.Linear4bit` (NF4, compute dtype = the precision's 16-bit type, no double quantization --
BitsAndBytesConfig's defaults). One difference, stated: int8 runs with `threshold=0.0` (no outlier
decomposition); diffusers' default 6.0 splits outlier columns into an fp16 matmul whose size
depends on the data, which no plan can count ahead.

On real devices the weights are quantized by bitsandbytes when the layer moves to the device.
On fake tensors bitsandbytes' parameter subclasses cannot wrap fake tensors, so the quantized
weight is a plain Parameter carrying the same attributes and tensors (`CB`/`SCB`;
`quant_state.absmax/code`) that bitsandbytes' own ops then read: the layers' forward and backward
are bitsandbytes' code, run through its registered fake kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from vramplan.spec import BaseQuant

NF4_BLOCK = 64


def quantize_linears(module: nn.Module, quant: BaseQuant, compute_dtype: torch.dtype, device: str) -> list[str]:
    """Replace every nn.Linear under `module` by its bitsandbytes layer; returns their names."""
    import bitsandbytes as bnb

    names = [n for n, m in module.named_modules() if type(m) is nn.Linear]
    for name in names:
        old = module.get_submodule(name)
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        bias = old.bias is not None
        if quant is BaseQuant.INT8:
            new = bnb.nn.Linear8bitLt(old.in_features, old.out_features, bias, has_fp16_weights=False,
                                      threshold=0.0, device="meta")
        else:
            new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias, compute_dtype=compute_dtype,
                                    compress_statistics=False, quant_type="nf4", device="meta")
        if device != "meta":
            # real weights: let bitsandbytes quantize them as it does on load
            if quant is BaseQuant.INT8:
                new.weight = bnb.nn.Int8Params(old.weight.data.to("cpu", torch.float16), requires_grad=False,
                                               has_fp16_weights=False)
            else:
                new.weight = bnb.nn.Params4bit(old.weight.data.to("cpu", compute_dtype), requires_grad=False,
                                               quant_type="nf4", blocksize=NF4_BLOCK, compress_statistics=False)
            if bias:
                new.bias = nn.Parameter(old.bias.data.to(compute_dtype), requires_grad=False)
            new = new.to(device)
        new.requires_grad_(False)
        setattr(parent, attr, new)
    return names


def is_quantized(layer: nn.Module) -> bool:
    return type(layer).__name__ in ("Linear8bitLt", "Linear4bit")


def fake_quantized_weight(layer: nn.Module, compute_dtype: torch.dtype) -> nn.Parameter:
    """Inside a FakeTensorMode: the quantized weight of `layer` as bitsandbytes stores it."""
    return symbolic_quantized_weight(layer, layer.out_features, layer.in_features, compute_dtype)


def symbolic_quantized_weight(layer: nn.Module, out_features, in_features, compute_dtype) -> nn.Parameter:
    """The same with sizes that may be symbolic (layer templates)."""
    if type(layer).__name__ == "Linear8bitLt":
        weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False)
        weight.CB = weight.data
        weight.SCB = torch.empty(out_features, dtype=torch.float32)
        return weight
    from bitsandbytes.functional import QuantState

    n = out_features * in_features
    weight = nn.Parameter(torch.empty((n + 1) // 2, 1, dtype=torch.uint8), requires_grad=False)
    weight.quant_state = QuantState(absmax=torch.empty(-(-n // NF4_BLOCK), dtype=torch.float32),
                                    shape=torch.Size([out_features, in_features]),
                                    code=torch.empty(16, dtype=torch.float32), blocksize=NF4_BLOCK,
                                    quant_type="nf4", dtype=compute_dtype)
    weight.bnb_quantized = True
    weight.quant_type = "nf4"
    weight.blocksize = NF4_BLOCK
    return weight


def quant_tensors(weight) -> dict:
    """The tensors a quantized weight carries besides its data (for trackers and recorders)."""
    out = {}
    if getattr(weight, "SCB", None) is not None:
        out["SCB"] = weight.SCB
    state = getattr(weight, "quant_state", None)
    if state is not None:
        out["absmax"] = state.absmax
        out["code"] = state.code
    return out

"""Give a meta-device model fake CPU weights, dtype by dtype, without allocating anything.

`module.to(...)` and `to_empty(...)` fail under FakeTensorMode ("Couldn't swap"), so we build on
the meta device, apply the method there (peft injects fine on meta), then, inside the fake mode,
replace every parameter and buffer with a fresh fake CPU tensor of the dtype the precision policy
gives it (NOTES.md). Tied weights stay tied.
"""

from __future__ import annotations

from typing import Callable

import torch


def materialize(module: torch.nn.Module, param_dtype: Callable[[str, torch.nn.Parameter], torch.dtype],
                buffer_dtype: torch.dtype | None, device: str = "cpu") -> None:
    """Replace meta parameters/buffers in place with empty tensors on `device`.

    Call inside a FakeTensorMode for fake tensors, or outside it for real (uninitialised) ones.
    `param_dtype(name, param)` chooses each parameter's dtype; requires_grad is kept.
    """
    from vramplan.step.quantize import fake_quantized_weight, is_quantized

    done: dict[int, torch.nn.Parameter] = {}
    for mod_name, mod in module.named_modules():
        for name, param in list(mod._parameters.items()):
            if param is None:
                continue
            full = f"{mod_name}.{name}" if mod_name else name
            if name == "weight" and is_quantized(mod):
                mod._parameters[name] = fake_quantized_weight(mod, param_dtype(full + ".bias", param))
                continue
            if id(param) not in done:
                new = torch.nn.Parameter(
                    torch.empty(param.shape, dtype=param_dtype(full, param), device=device),
                    requires_grad=param.requires_grad)
                done[id(param)] = new
            mod._parameters[name] = done[id(param)]
        for name, buf in list(mod._buffers.items()):
            if buf is None:
                continue
            dtype = buffer_dtype if (buffer_dtype is not None and buf.is_floating_point()) else buf.dtype
            if buf.device.type == "meta":
                mod._buffers[name] = _buffer_like(buf, dtype, device)


def _buffer_like(buf: torch.Tensor, dtype: torch.dtype, device: str) -> torch.Tensor:
    # Index buffers (position_ids) are read by embeddings: give them valid values.
    if not dtype.is_floating_point:
        if buf.dim() >= 1:
            return torch.arange(buf.shape[-1], device=device, dtype=dtype).expand(buf.shape).contiguous()
        return torch.zeros(buf.shape, dtype=dtype, device=device)
    return torch.zeros(buf.shape, dtype=dtype, device=device)

"""Choose the attention kernel: sdpa (default), xformers, or eager (materialises scores).

UNet-family models (and their VAEs) use diffusers' attention processors: `AttnProcessor2_0`
calls `F.scaled_dot_product_attention` (flash / memory-efficient kernels on CUDA: no sequence x
sequence matrix kept), `AttnProcessor` is the eager path (baddbmm, softmax, bmm) that keeps the
attention probabilities for backward, `XFormersAttnProcessor` calls xformers'
memory-efficient kernel. Transformer models (SD3, Flux) route through diffusers' attention
dispatcher; their eager path is PyTorch's math SDPA kernel, which materialises the scores.
"""

from __future__ import annotations

import contextlib

import torch


def set_attention(module: torch.nn.Module, attention: str, real_xformers: bool = False) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if not hasattr(module, "set_attn_processor") or not hasattr(module, "attn_processors"):
        return
    processors = module.attn_processors
    if not processors:
        return
    classic = all(type(p).__name__ in ("AttnProcessor2_0", "AttnProcessor", "XFormersAttnProcessor")
                  for p in processors.values())
    if not classic:
        return  # transformer models: eager is chosen by `attention_context`
    if attention == "eager":
        module.set_attn_processor(AttnProcessor())
    elif attention == "xformers" and real_xformers:
        from diffusers.models.attention_processor import XFormersAttnProcessor

        module.set_attn_processor(XFormersAttnProcessor())
    else:
        # xformers keeps the same bytes as SDPA's memory-efficient kernel (output and logsumexp);
        # where xformers is not importable (simulate, CPU) we run SDPA in its place.
        module.set_attn_processor(AttnProcessor2_0())


def attention_context(attention: str):
    """For dispatcher-based models: force PyTorch's math SDPA kernel when eager is asked for."""
    if attention != "eager":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])

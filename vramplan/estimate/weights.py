"""Weights on the card: every parameter and buffer of every resident component, by dtype.

One record per tensor (the allocator sees them one by one). Which components are resident:
the denoiser always; the VAE unless latents are cached; the text encoders unless text
embeddings are cached. Dtypes come from `vramplan.precision`; a quantized frozen base
(`--base-quant`) stores each Linear weight of the denoiser as bitsandbytes does:
  * int8 (`bnb.nn.Int8Params`, LLM.int8 with has_fp16_weights=False): `CB` int8 of the weight's
    shape and `SCB` float32, one per output row (bitsandbytes/nn/modules.py `Int8Params._quantize`);
  * nf4 (`bnb.nn.Params4bit`, blocksize 64, no double quantization -- the default of
    diffusers' BitsAndBytesConfig): the weight packed two values per byte, plus `absmax`, one
    float32 per block of 64 (bitsandbytes/functional.py `quantize_4bit`).
Biases, norms and convolutions stay in the frozen dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from vramplan.footprint import Category
from vramplan.methods import get_method
from vramplan.models.inventory import Inventory, kept_per_inventory
from vramplan.precision import ITEMSIZE, frozen_dtype, trainable_dtype, vae_dtype
from vramplan.spec import BaseQuant, TrainingSpec

NF4_BLOCK = 64


@dataclass(frozen=True)
class Tensor:
    name: str
    nbytes: int
    category: Category
    component: str


def quantized_bytes(shape: tuple, quant: BaseQuant) -> list[int]:
    """Allocations bitsandbytes makes for one quantized Linear weight of `shape` (out, in)."""
    n = prod(shape)
    if quant is BaseQuant.INT8:
        return [n, shape[0] * 4]
    if quant is BaseQuant.NF4:
        # packed weight, absmax per block, and the 16-value NF4 code table each layer's QuantState
        # holds (`get_4bit_type` makes one per quantize_4bit call)
        return [(n + 1) // 2, -(-n // NF4_BLOCK) * 4, 16 * 4]
    raise ValueError(quant)


def resident_components(spec: TrainingSpec) -> list[str]:
    out = [spec.model.denoiser.name]
    if not spec.cache_latents:
        out.append("vae")
    if not spec.cache_text_embeddings:
        out.extend(c.name for c in spec.model.text_encoders)
    return out


def weight_tensors(spec: TrainingSpec, inventories: dict[str, Inventory], trained: dict | None = None
                   ) -> list[Tensor]:
    """`trained`: the method's trainable tensors, when the caller has them."""
    if trained is None:
        trained = get_method(spec.method).trainable_tensors(spec, inventories)
    denoiser = spec.model.denoiser.name
    frozen, train = frozen_dtype(spec), trainable_dtype(spec)
    out: list[Tensor] = []
    for component in resident_components(spec):
        inv = inventories[component]
        whole = spec.method.trains_denoiser and (component == denoiser or component in trained)
        resting = vae_dtype(spec) if component == "vae" else frozen
        quant = spec.base_quant if component == denoiser else BaseQuant.NONE
        out.extend(_component_weights(inv, component, train if whole else resting, whole, quant, resting))
        if not whole and component in trained:
            for t in trained[component]:
                out.append(Tensor(f"{component}.{t.name}", t.numel * ITEMSIZE[train],
                                  Category.TRAINABLE_WEIGHTS, component))
    if spec.ema:
        for component, tensors in trained.items():
            for t in tensors:
                out.append(Tensor(f"ema.{component}.{t.name}", t.numel * 4, Category.EMA, component))
    return out


def _component_weights(inv: Inventory, component: str, dtype: str, whole: bool, quant: BaseQuant,
                       buffer_dtype: str) -> tuple:
    """One component's parameters (in `dtype`) and buffers on the card (kept: fit's candidates
    differ in rank, optimizer or caching far more often than in these). Floating buffers are in
    `buffer_dtype`, the frozen (or VAE) dtype even where the component trains whole: the step
    casts parameters by whether they train and buffers never train (`step.build`), so SD 3.5's
    position table (864 MiB in fp32 for Medium) stays 16-bit in a mixed-precision full fine-tune."""
    def make() -> tuple:
        out = []
        quantize = {m.name + ".weight" for m in inv.linears()} if quant is not BaseQuant.NONE else set()
        for name, shape in inv.params:
            if name in quantize:
                for k, nbytes in enumerate(quantized_bytes(tuple(shape), quant)):
                    out.append(Tensor(f"{component}.{name}#{k}", nbytes, Category.FROZEN_WEIGHTS, component))
            else:
                out.append(Tensor(f"{component}.{name}", prod(shape) * ITEMSIZE[dtype],
                                  Category.TRAINABLE_WEIGHTS if whole else Category.FROZEN_WEIGHTS, component))
        for buf in inv.buffers:
            itemsize = ITEMSIZE[buffer_dtype] if buf.dtype in ("float32", "float16", "bfloat16") else \
                buf.bytes // max(buf.numel, 1)
            out.append(Tensor(f"{component}.{buf.name}", buf.numel * itemsize, Category.BUFFERS, component))
        return tuple(out)

    return kept_per_inventory(inv, ("weights", component, dtype, whole, quant, buffer_dtype), make)

"""Single-file .safetensors checkpoints: read the header only, and recognise the key layout.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON mapping each
tensor's name to {dtype, shape, data_offsets}, then the tensor data. Reading the header tells
every tensor's shape and dtype without touching a byte of the weights, which is all vramplan
needs to know what a checkpoint is.

Layouts recognised (the denoiser's parameter count is what `local.py` checks against the catalog):
- original Stable Diffusion (LDM / CompVis / A1111) files: `model.diffusion_model.*` UNet, with
  SD 1.x (cross-attention `to_k` reading 768-wide CLIP-L states, 1x1-conv `proj_in`), SD 2.x
  (1024-wide OpenCLIP-H states, linear `proj_in`) and SDXL (`conditioner.embedders.*`, `label_emb`);
- a diffusers-format UNet saved alone (`diffusion_pytorch_model.safetensors`): the same three,
  told apart the same way (`add_embedding` is SDXL's `label_emb`).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from vramplan.errors import UsageError

# The safetensors format caps the header at 100 MB; a larger length is a corrupt or foreign file.
MAX_HEADER_BYTES = 100_000_000

# safetensors dtype -> (torch-style name, bytes per element; None where not byte-sized)
DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U64": ("uint64", 8), "U32": ("uint32", 4), "U16": ("uint16", 2), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "F8_E8M0": ("float8_e8m0fnu", 1), "F4": ("float4_e2m1fn_x2", None), "F6_E2M3": ("float6_e2m3", None),
    "F6_E3M2": ("float6_e3m2", None),
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str                    # safetensors spelling: F16, BF16, F32 ...
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict
    header_bytes: int
    file_bytes: int

    def get(self, name: str) -> TensorInfo | None:
        return self.tensors.get(name)

    def with_prefix(self, prefix: str) -> list[TensorInfo]:
        return [t for name, t in self.tensors.items() if name.startswith(prefix)]


def _fail(path: Path, message: str):
    raise UsageError(f"{path}: {message}")


def read_safetensors_header(path) -> SafetensorsHeader:
    """Parse and check a .safetensors header; every malformation is a one-line UsageError."""
    path = Path(path)
    try:
        file_bytes = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                _fail(path, f"not a safetensors file: {file_bytes} bytes, too short for the "
                            f"8-byte header length")
            (length,) = struct.unpack("<Q", head)
            if length > file_bytes - 8:
                _fail(path, f"truncated or not a safetensors file: the header claims {length:,} "
                            f"bytes but only {file_bytes - 8:,} follow")
            if length > MAX_HEADER_BYTES:
                _fail(path, f"not a safetensors file: header length {length:,} bytes is over the "
                            f"format's {MAX_HEADER_BYTES:,}")
            raw = f.read(length)
    except OSError as err:
        _fail(path, f"cannot read: {err.strerror or err}")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        _fail(path, f"not a safetensors file: its header is not valid JSON ({err})")
    if not isinstance(header, dict):
        _fail(path, f"not a safetensors file: its header is a JSON {type(header).__name__}, "
                    f"not an object of tensors")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        _fail(path, "malformed safetensors header: __metadata__ is not an object")
    data_bytes = file_bytes - 8 - length
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            _fail(path, f"malformed safetensors header: entry {name!r} is not "
                        f"{{dtype, shape, data_offsets}}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or not isinstance(shape, list) or not all(
                isinstance(d, int) and d >= 0 for d in shape):
            _fail(path, f"malformed safetensors header: {name!r} has dtype {dtype!r} and "
                        f"shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets) or not 0 <= offsets[0] <= offsets[1]):
            _fail(path, f"malformed safetensors header: {name!r} has data_offsets {offsets!r}")
        size = DTYPES.get(dtype, (None, None))[1]
        if size is not None and offsets[1] - offsets[0] != math.prod(shape) * size:
            _fail(path, f"malformed safetensors header: {name!r} is {dtype} {shape} "
                        f"but spans {offsets[1] - offsets[0]:,} bytes")
        if offsets[1] > data_bytes:
            _fail(path, f"truncated: tensor {name!r} ends at byte {offsets[1]:,} of the data, "
                        f"which has only {data_bytes:,} bytes (an incomplete download?)")
        tensors[name] = TensorInfo(name, dtype, tuple(shape), (offsets[0], offsets[1]))
    if not tensors:
        _fail(path, "the safetensors file holds no tensors")
    return SafetensorsHeader(str(path), tensors, metadata, length, file_bytes)


@dataclass(frozen=True)
class CheckpointLayout:
    family: str              # sd1, sd2, sdxl
    catalog_key: str         # the catalog model of the same architecture
    layout: str              # "ldm" (original single file) or "diffusers" (a diffusers UNet alone)
    denoiser_prefix: str
    denoiser_params: int
    dtype: str               # the denoiser's dominant dtype, torch spelling
    components: tuple[str, ...]  # what the file holds: unet, vae, text_encoder, text_encoder_2
    description: str


_FAMILY_KEY = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl"}
_FAMILY_NAME = {"sd1": "an SD 1.x", "sd2": "an SD 2.x", "sdxl": "an SDXL"}


def _dominant_dtype(tensors) -> str:
    """The dtype holding most of the elements: "float16" for an fp16 checkpoint."""
    by_dtype: dict[str, int] = {}
    for t in tensors:
        by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.numel
    code = max(by_dtype, key=by_dtype.get)
    return DTYPES.get(code, (code.lower(), None))[0]


def _unet_family(header: SafetensorsHeader, prefix: str, xl_key: str, to_k: str,
                 proj_in: str) -> str | None:
    """sdxl if the added-conditioning embedding is there, else sd1 / sd2 by the cross-attention
    context width (768 CLIP-L / 1024 OpenCLIP-H) and proj_in's kind (1x1 conv / Linear)."""
    if header.get(prefix + xl_key) is not None:
        return "sdxl"
    k = header.get(prefix + to_k)
    if k is None or len(k.shape) != 2:
        return None
    context = k.shape[1]
    proj = header.get(prefix + proj_in)
    linear_proj = proj is not None and len(proj.shape) == 2
    if context == 768 and not linear_proj:
        return "sd1"
    if context == 1024 and linear_proj:
        return "sd2"
    return None


def recognise_checkpoint(header: SafetensorsHeader) -> CheckpointLayout:
    """Which known architecture a checkpoint holds, from its key names and shapes alone."""
    path = Path(header.path)
    names = header.tensors.keys()

    if any(n.startswith("model.diffusion_model.") for n in names):
        prefix, layout = "model.diffusion_model.", "ldm"
        family = _unet_family(
            header, prefix, "label_emb.0.0.weight",
            "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "input_blocks.1.1.proj_in.weight")
        if family == "sdxl" and header.get(prefix + "label_emb.0.0.weight").shape[-1] != 2816:
            family = None  # 2816 = pooled OpenCLIP-G 1280 + 6 size/crop embeddings x 256 (base)
        components = ["unet"]
        if any(n.startswith("first_stage_model.") for n in names):
            components.append("vae")
        if any(n.startswith(("cond_stage_model.", "conditioner.embedders.0.")) for n in names):
            components.append("text_encoder")
        if any(n.startswith("conditioner.embedders.1.") for n in names):
            components.append("text_encoder_2")
        if family is None:
            if any(".joint_blocks." in n or n.startswith(prefix + "joint_blocks.") for n in names):
                _fail(path, "an SD3 / SD3.5 single-file checkpoint: not supported yet; give the "
                            "diffusers folder, or --model sd35-medium / sd35-large")
            if any(n.startswith(prefix + "double_blocks.") for n in names):
                _fail(path, "a FLUX single-file checkpoint: not supported yet; give the diffusers "
                            "folder, or --model flux-dev")
            _fail(path, "an original-layout (model.diffusion_model.*) checkpoint of a UNet that is "
                        "neither SD 1.x, SD 2.x nor SDXL")
    elif header.get("conv_in.weight") is not None and any(n.startswith("down_blocks.") for n in names):
        prefix, layout, components = "", "diffusers", ["unet"]
        family = _unet_family(
            header, prefix, "add_embedding.linear_1.weight",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            "down_blocks.0.attentions.0.proj_in.weight")
        if family == "sdxl" and header.get("add_embedding.linear_1.weight").shape[-1] != 2816:
            family = None
        if family is None:
            _fail(path, "a diffusers-format UNet that is neither SD 1.x, SD 2.x nor SDXL")
    else:
        if any(n.startswith(("encoder.conv_in.", "encoder.down.", "decoder.conv_in.")) for n in names):
            _fail(path, "a VAE on its own, not a model: give the checkpoint or folder of the "
                        "whole model")
        if any(n.startswith(("double_blocks.", "transformer_blocks.", "joint_blocks.")) for n in names):
            _fail(path, "a FLUX / SD3 transformer single file: not supported yet; give the "
                        "diffusers folder, or a catalog key (flux-dev, sd35-medium, sd35-large)")
        if any(n.startswith(("lora_unet_", "lora_te")) or ".lora_" in n or "lora_A" in n
               for n in names):
            _fail(path, "a LoRA, not a model: give the base model it was trained on")
        sample = ", ".join(sorted(names)[:2])
        _fail(path, f"unknown checkpoint layout (keys like {sample}); vramplan recognises "
                    f"original SD 1.x / 2.x / SDXL files and diffusers UNets")

    unet = header.with_prefix(prefix) if layout == "ldm" else list(header.tensors.values())
    kind = "single-file checkpoint" if layout == "ldm" else "diffusers UNet"
    return CheckpointLayout(
        family=family, catalog_key=_FAMILY_KEY[family], layout=layout, denoiser_prefix=prefix,
        denoiser_params=sum(t.numel for t in unet), dtype=_dominant_dtype(unet),
        components=tuple(components), description=f"{_FAMILY_NAME[family]} {kind}",
    )

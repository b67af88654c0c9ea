"""Models that are not in the catalog: a diffusers folder, or a single .safetensors checkpoint.

- A diffusers folder (`model_index.json` + one folder per component) is described from its own
  configs: family, native resolution, latent channels, text lengths. Its inventories are built on
  the meta device, like the catalog's, and cached as JSON under
  `${VRAMPLAN_CACHE:-~/.cache/vramplan}/inventories/<sha256 of the configs>/`, so only the first
  use imports torch.
- A single `.safetensors` checkpoint is read through its header only (never its weights), its key
  layout recognised (`vramplan.models.checkpoint`) and mapped to the catalog model of the same
  architecture, whose shipped inventories then apply.

This module also holds the one meta-device builder (`build_module`, `build_component_inventory`)
that `scripts/build_inventory.py` uses for the catalog, so both kinds of inventory are the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from vramplan.cache import cache_root, write_atomic
from vramplan.errors import UsageError
from vramplan.models.catalog import MODELS, Component, ModelInfo
from vramplan.models.inventory import INVENTORY_FORMAT, Inventory, inventory_from_json, load_inventory

DENOISERS = ("unet", "transformer")
VAES = ("vae",)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")

# What the diffusers training scripts do per family, where a folder's configs cannot say it.
_FAMILY_DEFAULTS = {
    "sd1": dict(prediction="epsilon", trainable=("text_encoder",), t5_length=77),
    "sd2": dict(prediction="epsilon", trainable=("text_encoder",), t5_length=77),
    "sdxl": dict(prediction="epsilon", trainable=("text_encoder", "text_encoder_2"), t5_length=77),
    # train_dreambooth_lora_sd3.py: --max_sequence_length 77; ..._flux.py: 512. Both keep T5 frozen.
    "sd3": dict(prediction="flow_matching", trainable=("text_encoder", "text_encoder_2"), t5_length=77),
    "flux": dict(prediction="flow_matching", trainable=("text_encoder",), t5_length=512),
}


# ---------------------------------------------------------------------------------------------
# Building on the meta device (imports torch; used by scripts/build_inventory.py and below)
# ---------------------------------------------------------------------------------------------

def text_config(config: dict) -> dict:
    """The text-model part of a transformers config: a full CLIPConfig nests it in `text_config`."""
    if config.get("model_type") == "clip" and isinstance(config.get("text_config"), dict):
        return config["text_config"]
    return config


def build_module(cls_name: str, library: str, config: dict):
    """Build one component with no weights: `with torch.device("meta")`, exact shapes."""
    import torch

    if library == "diffusers":
        import diffusers
        from diffusers.utils import logging as diffusers_logging

        cls = getattr(diffusers, cls_name, None)
        if cls is None:
            raise ValueError(f"diffusers {diffusers.__version__} has no class {cls_name}")
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # unknown config keys are expected and harmless
        try:
            with torch.device("meta"):
                return cls.from_config(config)
        finally:
            diffusers_logging.set_verbosity(verbosity)
    if library == "transformers":
        import transformers
        from transformers.utils import logging as transformers_logging

        cls = getattr(transformers, cls_name, None)
        if cls is None:
            raise ValueError(f"transformers {transformers.__version__} has no class {cls_name}")
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()
        try:
            cfg = cls.config_class(**text_config(config))
            with torch.device("meta"):
                return cls(cfg)
        finally:
            transformers_logging.set_verbosity(verbosity)
    raise ValueError(f"unknown library {library!r} (diffusers or transformers)")


def _module_kind(module) -> str:
    from torch import nn

    for base in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                 nn.ConvTranspose3d, nn.Embedding, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm):
        if isinstance(module, base):
            return base.__name__
    name = type(module).__name__
    # diffusers' RMSNorm and transformers' T5LayerNorm / LlamaRMSNorm are RMS norms of their own.
    if name.endswith("RMSNorm") or name == "T5LayerNorm":
        return "RMSNorm"
    return name


def _module_row(name: str, module, kind: str) -> dict:
    """The geometry of one parameter-owning module, None fields left out."""
    row: dict = {"name": name, "kind": kind}
    if type(module).__name__ != kind:
        row["cls"] = type(module).__name__
    if kind == "Linear":
        row.update(in_features=module.in_features, out_features=module.out_features,
                   bias=module.bias is not None)
    elif kind.startswith("Conv"):
        row.update(in_channels=module.in_channels, out_channels=module.out_channels,
                   kernel_size=list(module.kernel_size), stride=list(module.stride),
                   padding=list(module.padding) if not isinstance(module.padding, str) else None,
                   groups=module.groups, bias=module.bias is not None)
    elif kind == "Embedding":
        row.update(num_embeddings=module.num_embeddings, embedding_dim=module.embedding_dim)
    elif kind == "LayerNorm":
        row.update(normalized_shape=list(module.normalized_shape),
                   bias=getattr(module, "bias", None) is not None)
    elif kind == "GroupNorm":
        row.update(num_groups=module.num_groups, num_channels=module.num_channels,
                   bias=module.bias is not None)
    elif kind == "RMSNorm":
        weight = getattr(module, "weight", None)
        if weight is not None:
            row["normalized_shape"] = list(weight.shape)
        row["bias"] = getattr(module, "bias", None) is not None
    return {k: v for k, v in row.items() if v is not None}


def _versions() -> dict:
    import diffusers
    import torch
    import transformers

    return {"torch": torch.__version__.split("+")[0], "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def build_component_inventory(module, meta: dict) -> dict:
    """The inventory of any nn.Module as a JSON-ready dict.

    `meta` gives model, component, cls, library and config. Parameters are listed as
    `named_parameters()` lists them (a tied parameter once); modules that own parameters
    directly are listed with their geometry, and a module whose parameter is tied to an earlier
    one names it in `tied` and counts 0, so the modules' counts sum to `total_params`.
    """
    params = [[name, list(p.shape)] for name, p in module.named_parameters()]
    owner: dict[int, str] = {}
    rows = []
    for name, sub in module.named_modules():
        own = list(sub.named_parameters(recurse=False))
        if not own:
            continue
        kind = _module_kind(sub)
        row = _module_row(name, sub, kind)
        count, tied = 0, None
        for pname, p in own:
            full = f"{name}.{pname}" if name else pname
            if id(p) in owner:
                tied = owner[id(p)]
            else:
                owner[id(p)] = full
                count += p.numel()
        row["params"] = count
        row["shapes"] = [[pname, list(p.shape)] for pname, p in own]
        if tied is not None:
            row["tied"] = tied
        rows.append(row)
    buffers = []
    for name, buf in module.named_buffers():
        prefix, _, local = name.rpartition(".")
        holder = module.get_submodule(prefix) if prefix else module
        persistent = local not in getattr(holder, "_non_persistent_buffers_set", set())
        buffers.append([name, list(buf.shape), str(buf.dtype).replace("torch.", ""), persistent])
    total = sum(p.numel() for p in module.parameters())
    assert total == sum(r["params"] for r in rows), "module entries must sum to the total"
    return {
        "format": INVENTORY_FORMAT,
        "model": meta["model"], "component": meta["component"], "cls": meta["cls"],
        "library": meta["library"], "built_with": _versions(), "config": meta["config"],
        "total_params": total, "buffers": buffers, "params": params, "modules": rows,
    }


def dump_inventory(data: dict) -> str:
    """Compact JSON with one parameter or module per line: small files, readable diffs."""
    def one(value) -> str:
        return json.dumps(value, separators=(",", ":"), sort_keys=False)

    lines = []
    for key, value in data.items():
        if key in ("params", "modules", "buffers") and value:
            body = ",\n".join(one(v) for v in value)
            lines.append(f"{one(key)}:[\n{body}\n]")
        else:
            lines.append(f"{one(key)}:{one(value)}")
    return "{" + ",\n".join(lines) + "}\n"


# ---------------------------------------------------------------------------------------------
# Diffusers folders
# ---------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    return cache_root() / "inventories"


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path}: missing ({what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{path}: cannot read {what}: {err}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: {what} must be a JSON object")
    return data


def _role(name: str) -> str | None:
    if name in DENOISERS:
        return "denoiser"
    if name in VAES:
        return "vae"
    if name in TEXT_ENCODERS:
        return "text_encoder"
    return None


def _folder_components(path: Path) -> tuple[dict, tuple[Component, ...], dict[str, dict]]:
    index = _read_json(path / "model_index.json", "the pipeline's model_index.json")
    components, configs = [], {}
    for name, value in index.items():
        role = _role(name)
        if role is None or not isinstance(value, list) or len(value) != 2 or None in value:
            continue
        library, cls = value
        if library not in ("diffusers", "transformers"):
            raise UsageError(f"{path / 'model_index.json'}: {name} comes from {library!r}; "
                             f"vramplan reads diffusers and transformers components")
        components.append(Component(name, cls, library, role))
        configs[name] = _read_json(path / name / "config.json", f"the {name} config")
    if not any(c.role == "denoiser" for c in components):
        raise UsageError(f"{path}: model_index.json names no unet or transformer: "
                         f"not a text-to-image pipeline vramplan knows")
    return index, tuple(components), configs


def _family(index: dict, denoiser: Component, config: dict, path: Path) -> str:
    if denoiser.cls == "SD3Transformer2DModel":
        return "sd3"
    if denoiser.cls == "FluxTransformer2DModel":
        return "flux"
    if denoiser.cls == "UNet2DConditionModel":
        if config.get("addition_embed_type") == "text_time" or "XL" in str(index.get("_class_name")):
            return "sdxl"
        # SD 2.x: OpenCLIP-H context (1024) and linear proj_in/proj_out; SD 1.x: CLIP-L, 1x1 convs.
        if config.get("cross_attention_dim") == 1024 or config.get("use_linear_projection"):
            return "sd2"
        return "sd1"
    raise UsageError(f"{path}: denoiser {denoiser.cls} is not one vramplan knows "
                     f"(UNet2DConditionModel, SD3Transformer2DModel, FluxTransformer2DModel)")


def config_digest(components: tuple[Component, ...], configs: dict[str, dict]) -> str:
    """sha256 of the inventory format and every component's class and config."""
    blob = {"format": INVENTORY_FORMAT,
            "components": {c.name: [c.library, c.cls, configs[c.name]] for c in components}}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _folder_inventories(path: Path, components, configs) -> dict[str, Inventory]:
    """Load the cached inventories, building (on the meta device) and caching missing ones."""
    folder = cache_dir() / config_digest(components, configs)
    out = {}
    for comp in components:
        file = folder / f"{comp.name}.json"
        data = None
        if file.is_file():
            try:
                data = json.loads(file.read_text())
            except (OSError, json.JSONDecodeError):
                data = None  # a broken cache entry is rebuilt
        if not isinstance(data, dict) or data.get("format") != INVENTORY_FORMAT:
            try:
                module = build_module(comp.cls, comp.library, configs[comp.name])
            except Exception as err:  # diffusers/transformers reject a config in many ways
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise UsageError(f"{path / comp.name / 'config.json'}: cannot build {comp.cls}: "
                                 f"{first}") from None
            data = build_component_inventory(module, {
                "model": str(path), "component": comp.name, "cls": comp.cls,
                "library": comp.library, "config": configs[comp.name]})
            _write_cache(file, dump_inventory(data))
        data["model"] = str(path)  # the same configs may sit in several folders
        out[comp.name] = inventory_from_json(data, source=str(file))
    return out


def _write_cache(file: Path, text: str) -> None:
    write_atomic(file, text.encode())   # an unwritable cache only costs a rebuild next time


def _diffusers_model_info(path: Path) -> ModelInfo:
    index, components, configs = _folder_components(path)
    denoiser = next(c for c in components if c.role == "denoiser")
    den_cfg = configs[denoiser.name]
    family = _family(index, denoiser, den_cfg, path)
    defaults = _FAMILY_DEFAULTS[family]

    vae_cfg = configs.get("vae", {})
    vae_scale = 2 ** (len(vae_cfg.get("block_out_channels", [0, 0, 0, 0])) - 1)
    latent_channels = int(vae_cfg.get("latent_channels", den_cfg.get("in_channels", 4)))
    if denoiser.cls == "UNet2DConditionModel":
        # The UNet halves the latent once per level but the last, and its skips must line up.
        multiple = vae_scale * 2 ** (len(den_cfg.get("block_out_channels", [0] * 4)) - 1)
        sample_size = den_cfg.get("sample_size", 64)
    else:
        # SD3 patchifies 2x2 (patch_size); Flux packs 2x2 latents (its patch_size 1 is per packed token).
        patch = 2 if denoiser.cls == "FluxTransformer2DModel" else int(den_cfg.get("patch_size", 2))
        multiple = vae_scale * patch
        sample_size = den_cfg.get("sample_size", 128)
    if isinstance(sample_size, (list, tuple)):
        sample_size = max(sample_size)
    native = int(sample_size) * vae_scale

    text_lengths = {}
    for comp in components:
        if comp.role == "text_encoder":
            cfg = text_config(configs[comp.name])
            if cfg.get("model_type") == "t5" or comp.cls.startswith("T5"):
                text_lengths[comp.name] = defaults["t5_length"]
            else:
                text_lengths[comp.name] = int(cfg.get("max_position_embeddings", 77))

    prediction = defaults["prediction"]
    if family in ("sd1", "sd2", "sdxl"):
        sched = path / "scheduler" / "scheduler_config.json"
        if sched.is_file():
            prediction = _read_json(sched, "the scheduler config").get("prediction_type") or prediction

    present = {c.name for c in components}
    info = ModelInfo(
        key=str(path), name=f"{path.name} (local {family} pipeline)", family=family,
        repo=str(path), components=components, native_resolution=native,
        resolution_multiple=multiple, vae_scale=vae_scale, latent_channels=latent_channels,
        text_lengths=text_lengths, prediction=prediction,
        trainable_text_encoders=tuple(n for n in defaults["trainable"] if n in present),
        local_path=str(path),
        # the family's code branches on float16 as the catalog model's does (FLUX's clip)
        bf16_traces=any(m.bf16_traces for m in MODELS.values() if m.family == family),
    )
    _folder_inventories(path, components, configs)  # validate now: errors surface at --model
    return info


def local_inventories(model: ModelInfo) -> dict[str, Inventory]:
    """Inventories of a local diffusers folder (cached after the first build)."""
    path = Path(model.local_path)
    _, components, configs = _folder_components(path)
    return _folder_inventories(path, components, configs)


# ---------------------------------------------------------------------------------------------
# Single-file checkpoints
# ---------------------------------------------------------------------------------------------

def _checkpoint_model_info(path: Path) -> ModelInfo:
    from vramplan.models.checkpoint import read_safetensors_header, recognise_checkpoint

    header = read_safetensors_header(path)
    layout = recognise_checkpoint(header)
    base = MODELS[layout.catalog_key]
    denoiser = base.denoiser.name
    expected = load_inventory(base.key, denoiser).total_params
    if layout.denoiser_params != expected:
        raise UsageError(
            f"{path}: {layout.description} with a {layout.denoiser_params:,}-parameter "
            f"{denoiser}, but {base.name}'s has {expected:,}: a variant vramplan has no "
            f"inventory for (inpainting, pruned, or another architecture)")
    return dataclasses.replace(
        base, key=str(path), name=f"{path.name} ({base.name}, {layout.dtype})", repo=str(path),
        aliases=(), local_path=str(path), base_model=base.key, checkpoint_dtype=layout.dtype)


def local_model_info(path) -> ModelInfo:
    """Describe a diffusers folder or a .safetensors checkpoint as a ModelInfo."""
    path = Path(path).expanduser()
    if path.is_dir():
        return _diffusers_model_info(path)
    if not path.is_file():
        raise UsageError(f"--model: {path} does not exist")
    if path.suffix.lower() != ".safetensors":
        raise UsageError(f"--model: {path.name}: give a .safetensors checkpoint or a diffusers "
                         f"folder (.ckpt/.bin are pickles that vramplan does not open)")
    return _checkpoint_model_info(path)

"""The finished run, saved where the ecosystem reads it.

* LoRA: `pytorch_lora_weights.safetensors`, written by the pipeline class's own
  `save_lora_weights` from peft's `get_peft_model_state_dict`, converted with diffusers'
  `convert_state_dict_to_diffusers` for the UNet families (as their diffusers scripts do; SD3 and
  Flux keep peft's names), so `pipe.load_lora_weights(run_folder)` reads it. The scale
  alpha / rank is folded into the up (lora_B) weights, so the file means the same with any
  loader's default alpha (= rank). `--save-format kohya`: the same weights through diffusers'
  `convert_state_dict_to_kohya` ("lora_unet_..." keys with lora_down / lora_up / alpha), which
  AUTOMATIC1111, ComfyUI and `load_lora_weights` read.
* LoHa / LoKr: diffusers' `load_lora_weights` reads LoRA only, so each trained module's update
  (peft's `get_delta_weight`, scale included) is written as the exact LoRA of it: an SVD kept at
  the update's rank bound (LoHa: rank^2, the Hadamard product of two rank-r products; LoKr: the
  Kronecker factors' ranks multiplied), up to float rounding. The native peft weights are kept
  beside it as `adapter_model.safetensors` + `adapter_config.json` (peft / LyCORIS names).
* Textual inversion: `learned_embeds.safetensors` ({token: (num_vectors, width)}) for the first
  text encoder, `learned_embeds_2.safetensors` for the second (SDXL), as diffusers'
  textual_inversion scripts write them; `pipe.load_textual_inversion(run_folder)` reads it.
* Full fine-tune and DreamBooth: the pipeline folder, the source pipeline with the trained
  denoiser (and text encoders, if trained; the EMA weights when kept), by `save_pretrained`,
  so `DiffusionPipeline.from_pretrained(run_folder)` loads it.
* Hypernetwork: `hypernetwork.safetensors`, the trained MLPs' state dict.
Files are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from vramplan.spec import Method, TrainingSpec

LORA_FILE = "pytorch_lora_weights.safetensors"
PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
             "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
CONVERTING_FAMILIES = frozenset({"sd1", "sd2", "sdxl"})


def _replace_file(tmp: Path, final: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)   # some writers make 0600 files; give what open() would
    os.replace(tmp, final)


def save_result(spec: TrainingSpec, built, run: Path, model_path: Path, save_format: str = "diffusers",
                placeholders: dict | None = None) -> list[Path]:
    method = spec.method
    if method is Method.LORA:
        return [save_lora(spec, built, run, save_format, lora_state_dicts(built, spec))]
    if method in (Method.LOHA, Method.LOKR):
        native = save_lycoris_native(spec, built, run)
        return [save_lora(spec, built, run, save_format, lycoris_as_lora(built, spec)), *native]
    if method is Method.TEXTUAL_INVERSION:
        return save_embeddings(spec, built, run, placeholders or {})
    if method in (Method.FULL, Method.DREAMBOOTH):
        return [save_pipeline(spec, built, run, model_path)]
    return [save_state_dict(built, run, "hypernetwork.safetensors")]


# -- LoRA --------------------------------------------------------------------------------------------

def _adapted(built) -> dict:
    """Component -> module, for the components holding peft layers that train."""
    return {name: module for name, module in built.models.items()
            if hasattr(module, "peft_config") and any(p.requires_grad for p in module.parameters())}


def lora_state_dicts(built, spec: TrainingSpec) -> dict:
    """{component: peft-named LoRA tensors with alpha / rank folded into lora_B}."""
    from peft import get_peft_model_state_dict

    out = {}
    for name, module in _adapted(built).items():
        config = module.peft_config["default"]
        scale = config.lora_alpha / config.r
        state = {}
        for key, tensor in get_peft_model_state_dict(module).items():
            tensor = tensor.detach().to("cpu").contiguous()
            if ".lora_B." in key and scale != 1:
                tensor = tensor * scale
            state[key] = tensor
        out[name] = state
    return out


def save_lora(spec: TrainingSpec, built, run: Path, save_format: str, states: dict) -> Path:
    import diffusers

    final = run / LORA_FILE
    tmp_name = ".tmp-" + LORA_FILE
    if save_format == "kohya":
        from diffusers.utils import convert_state_dict_to_kohya
        from safetensors.torch import save_file

        packed = {f"{component}.{key}": tensor for component, state in states.items() for key, tensor in state.items()}
        kohya = convert_state_dict_to_kohya(packed)
        save_file({k: v.contiguous() for k, v in kohya.items()}, str(run / tmp_name))
    else:
        from diffusers.utils import convert_state_dict_to_diffusers

        pipeline = getattr(diffusers, PIPELINES[spec.model.family])
        layers = {}
        for component, state in states.items():
            if spec.model.family in CONVERTING_FAMILIES:
                state = convert_state_dict_to_diffusers(state)
            layers[f"{component}_lora_layers"] = state
        pipeline.save_lora_weights(str(run), weight_name=tmp_name, safe_serialization=True, **layers)
    _replace_file(run / tmp_name, final)
    return final


# -- LoHa / LoKr -------------------------------------------------------------------------------------

def lycoris_as_lora(built, spec: TrainingSpec) -> dict:
    """{component: LoRA tensors (peft names) equal to each LyCORIS layer's update}."""
    import torch
    from peft.tuners.lycoris_utils import LycorisLayer

    out = {}
    for component, module in _adapted(built).items():
        state = {}
        for name, layer in module.named_modules():
            if not isinstance(layer, LycorisLayer) or "default" not in layer.active_adapters:
                continue
            with torch.no_grad():
                delta = layer.get_delta_weight("default").float().cpu()
            shape = delta.shape
            matrix = delta.reshape(shape[0], -1)
            rank = min(_rank_bound(layer, spec), *matrix.shape)
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
            up = (u[:, :rank] * s[:rank]).contiguous()
            down = vh[:rank].contiguous()
            if len(shape) > 2:          # convolution: down keeps the kernel, up is 1x1
                down = down.reshape(rank, *shape[1:])
                up = up.reshape(shape[0], rank, *([1] * (len(shape) - 2)))
            state[f"{name}.lora_A.weight"] = down
            state[f"{name}.lora_B.weight"] = up
        out[component] = state
    return out


def _rank_bound(layer, spec: TrainingSpec) -> int:
    """The rank the update cannot exceed, from the method's structure."""
    r = spec.rank
    if spec.method is Method.LOHA:
        return r * r
    w1 = layer.lokr_w1["default"] if "default" in getattr(layer, "lokr_w1", {}) else None
    if w1 is not None:
        rank1 = min(w1.shape)
    else:
        rank1 = layer.lokr_w1_a["default"].shape[1]
    if "default" in getattr(layer, "lokr_w2", {}):
        w2 = layer.lokr_w2["default"]
        rank2 = min(w2.shape[0], w2[0].numel())
    else:
        rank2 = layer.lokr_w2_a["default"].shape[1]
    return rank1 * rank2


def save_lycoris_native(spec: TrainingSpec, built, run: Path) -> list[Path]:
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    tensors, configs = {}, {}
    for component, module in _adapted(built).items():
        for key, tensor in get_peft_model_state_dict(module).items():
            tensors[f"{component}.{key}"] = tensor.detach().to("cpu").contiguous()
        configs[component] = module.peft_config["default"].to_dict()
    weights, config = run / "adapter_model.safetensors", run / "adapter_config.json"
    save_file(tensors, str(run / ".tmp-adapter_model.safetensors"), metadata={"format": "pt"})
    _replace_file(run / ".tmp-adapter_model.safetensors", weights)
    (run / ".tmp-adapter_config.json").write_text(json.dumps(configs, indent=2, default=_jsonable))
    _replace_file(run / ".tmp-adapter_config.json", config)
    return [weights, config]


def _jsonable(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if hasattr(value, "value"):
        return value.value
    return str(value)


# -- textual inversion -------------------------------------------------------------------------------

def save_embeddings(spec: TrainingSpec, built, run: Path, placeholders: dict) -> list[Path]:
    from safetensors.torch import save_file

    from vramplan.step.modules import EmbeddingWithNewTokens

    written = []
    for n, component in enumerate(spec.model.trainable_text_encoders):
        module = built.models.get(component)
        placeholder = placeholders.get(component)
        if module is None or placeholder is None:
            continue
        embedding = next(m for m in module.modules() if isinstance(m, EmbeddingWithNewTokens))
        name = "learned_embeds.safetensors" if n == 0 else f"learned_embeds_{n + 1}.safetensors"
        tmp = run / f".tmp-{name}"
        save_file({placeholder.tokens[0]: embedding.new_rows.detach().to("cpu").float().contiguous()},
                  str(tmp), metadata={"format": "pt"})
        _replace_file(tmp, run / name)
        written.append(run / name)
    return written


# -- full fine-tunes ---------------------------------------------------------------------------------

def save_pipeline(spec: TrainingSpec, built, run: Path, model_path: Path) -> Path:
    from diffusers import DiffusionPipeline

    if built.ema is not None:
        built.ema.copy_to(built.trainable)
    trained = {name: module for name, module in built.models.items()
               if any(p.requires_grad for p in module.parameters())}
    pipeline = DiffusionPipeline.from_pretrained(str(model_path), local_files_only=True, **trained)
    tmp = run / ".tmp-pipeline"
    if tmp.exists():
        shutil.rmtree(tmp)
    pipeline.save_pretrained(str(tmp), safe_serialization=True)
    for entry in tmp.iterdir():
        target = run / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    tmp.rmdir()
    return run / "model_index.json"


def save_state_dict(built, run: Path, name: str) -> Path:
    from safetensors.torch import save_file

    from vramplan.train.checkpoint import trained_tensors

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in trained_tensors(built.models).items()}
    save_file(tensors, str(run / f".tmp-{name}"), metadata={"format": "pt"})
    _replace_file(run / f".tmp-{name}", run / name)
    return run / name

"""A diffusers SD 1.x pipeline's weights under the original (LDM / A1111) single-file key names,
so tests can make a small single-file checkpoint: the inverse of the renaming diffusers'
single-file loader does, written from the two layouts' module names (tests check the round
trip through diffusers' loader is exact)."""

from __future__ import annotations

import torch


def _resnet(prefix_new: str, prefix_old: str, keys, out):
    names = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
             "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    for key in keys:
        if key.startswith(prefix_new + "."):
            rest = key[len(prefix_new) + 1:]
            head, _, tail = rest.partition(".")
            out[key] = f"{prefix_old}.{names[head]}.{tail}"


def _same(prefix_new: str, prefix_old: str, keys, out):
    for key in keys:
        if key.startswith(prefix_new + "."):
            out[key] = prefix_old + key[len(prefix_new):]


def unet_names(keys, layers: int, blocks: int, attention_up: list[bool]) -> dict:
    """diffusers UNet key -> "model.diffusion_model.*" key."""
    out = {}
    simple = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for new, old in simple.items():
        _same(new, old, keys, out)
    for i in range(blocks):
        for j in range(layers):
            n = 1 + i * (layers + 1) + j
            _resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0", keys, out)
            _same(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1", keys, out)
        _same(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * (layers + 1)}.0.op", keys, out)
        for j in range(layers + 1):
            n = i * (layers + 1) + j
            _resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0", keys, out)
            _same(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1", keys, out)
        last = i * (layers + 1) + layers
        _same(f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{last}.{2 if attention_up[i] else 1}.conv", keys, out)
    _resnet("mid_block.resnets.0", "middle_block.0", keys, out)
    _same("mid_block.attentions.0", "middle_block.1", keys, out)
    _resnet("mid_block.resnets.1", "middle_block.2", keys, out)
    return {k: "model.diffusion_model." + v for k, v in out.items()}


def vae_names(keys, blocks: int, layers: int) -> dict:
    """diffusers AutoencoderKL key -> "first_stage_model.*" key (q/k/v/out as 1x1 convs: `conv`)."""
    out = {}
    resnet = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

    def res(new, old):
        for key in keys:
            if key.startswith(new + "."):
                head, _, tail = key[len(new) + 1:].partition(".")
                out[key] = f"{old}.{resnet[head]}.{tail}"

    def attn(new, old):
        for key in keys:
            if key.startswith(new + "."):
                rest = key[len(new) + 1:]
                for a, b in attention.items():
                    if rest.startswith(a + "."):
                        out[key] = f"{old}.{b}.{rest[len(a) + 1:]}"

    for side in ("encoder", "decoder"):
        _same(f"{side}.conv_in", f"{side}.conv_in", keys, out)
        _same(f"{side}.conv_out", f"{side}.conv_out", keys, out)
        _same(f"{side}.conv_norm_out", f"{side}.norm_out", keys, out)
        res(f"{side}.mid_block.resnets.0", f"{side}.mid.block_1")
        res(f"{side}.mid_block.resnets.1", f"{side}.mid.block_2")
        attn(f"{side}.mid_block.attentions.0", f"{side}.mid.attn_1")
    for i in range(blocks):
        for j in range(layers):
            res(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}")
        _same(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv", keys, out)
        for j in range(layers + 1):
            res(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{blocks - 1 - i}.block.{j}")
        _same(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{blocks - 1 - i}.upsample.conv", keys, out)
    for name in ("quant_conv", "post_quant_conv"):
        _same(name, name, keys, out)
    return {k: "first_stage_model." + v for k, v in out.items()}


def ldm_state_dict(pipe) -> dict:
    """The whole pipeline as one original-layout state dict (CPU tensors)."""
    unet, vae = pipe.unet, pipe.vae
    state = {}
    u = unet.state_dict()
    names = unet_names(u.keys(), unet.config.layers_per_block, len(unet.config.block_out_channels),
                       ["CrossAttn" in t for t in unet.config.up_block_types])
    missing = set(u) - set(names)
    assert not missing, sorted(missing)[:5]
    state.update({names[k]: v for k, v in u.items()})
    v = vae.state_dict()
    names = vae_names(v.keys(), len(vae.config.block_out_channels), vae.config.layers_per_block)
    missing = set(v) - set(names)
    assert not missing, sorted(missing)[:5]
    for k, t in v.items():
        attention = any(f".{a}." in names[k] for a in ("q", "k", "v", "proj_out"))
        if attention and names[k].endswith("weight") and t.dim() == 2:
            t = t[:, :, None, None]                 # the original VAE's attention is 1x1 convolutions
        state[names[k]] = t
    for k, t in pipe.text_encoder.state_dict().items():   # transformers 5.6+ dropped "text_model."
        state["cond_stage_model.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k] = t
    return {k: t.contiguous() for k, t in state.items()}


def _openclip(module, prefix: str) -> dict:
    """A transformers CLIP text model under OpenCLIP's names (SD 2.x's encoder, SDXL's second):
    `resblocks`, fused q/k/v `in_proj`, `ln_final`, `text_projection` as a matrix to right-multiply."""
    state = module.state_dict()
    out = {}
    renames = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
               "self_attn.out_proj": "attn.out_proj"}
    layers = {}
    for key, tensor in state.items():
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key          # transformers 5.6+ CLIPTextModel: no "text_model."
        if key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = tensor
        elif key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = tensor
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = tensor
        elif key == "text_projection.weight":
            out["text_projection"] = tensor.T
        elif key.startswith("text_model.encoder.layers."):
            index, rest = key[len("text_model.encoder.layers."):].split(".", 1)
            if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
                layers.setdefault((index, rest.rsplit(".", 1)[1]), {})[rest.split(".")[1]] = tensor
                continue
            for new, old in renames.items():
                if rest.startswith(new + "."):
                    rest = old + rest[len(new):]
            out[f"transformer.resblocks.{index}.{rest}"] = tensor
    for (index, kind), parts in layers.items():
        out[f"transformer.resblocks.{index}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return {prefix + k: v for k, v in out.items()}


def ldm_state_dict_xl(pipe) -> dict:
    """An SDXL pipeline as one original-layout state dict: the UNet (with `label_emb`), the VAE,
    CLIP-L under `conditioner.embedders.0.transformer.` and OpenCLIP-G under `...1.model.`."""
    unet = pipe.unet
    u = unet.state_dict()
    names = unet_names(u.keys(), unet.config.layers_per_block, len(unet.config.block_out_channels),
                       ["CrossAttn" in t for t in unet.config.up_block_types])
    names.update({f"add_embedding.linear_{i}.{p}": f"model.diffusion_model.label_emb.0.{2 * (i - 1)}.{p}"
                  for i in (1, 2) for p in ("weight", "bias")})
    missing = set(u) - set(names)
    assert not missing, sorted(missing)[:5]
    state = {names[k]: v for k, v in u.items()}
    sd1 = ldm_state_dict(type("P", (), {"unet": _Empty(), "vae": pipe.vae, "text_encoder": pipe.text_encoder})())
    state.update({k: v for k, v in sd1.items() if k.startswith("first_stage_model.")})
    state.update({k.replace("cond_stage_model.", "conditioner.embedders.0."): v for k, v in sd1.items()
                  if k.startswith("cond_stage_model.")})
    state.update(_openclip(pipe.text_encoder_2, "conditioner.embedders.1.model."))
    return {k: t.contiguous() for k, t in state.items()}


class _Empty:
    """A UNet with no weights, for reusing the VAE and CLIP-L parts of `ldm_state_dict`."""

    config = type("C", (), {"layers_per_block": 1, "block_out_channels": (), "up_block_types": ()})()

    def state_dict(self):
        return {}


def ldm_state_dict_sd2(pipe) -> dict:
    """An SD 2.x pipeline: as SD 1.x, but OpenCLIP-H under `cond_stage_model.model.`."""
    state = {k: v for k, v in ldm_state_dict(pipe).items() if not k.startswith("cond_stage_model.")}
    state.update(_openclip(pipe.text_encoder, "cond_stage_model.model."))
    return {k: t.contiguous() for k, t in state.items()}

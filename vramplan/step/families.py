"""How each model family turns a batch into a denoiser call and a loss, as diffusers' scripts do.

One class per family, found by `ModelInfo.family`; the step builder never branches on the family.
Each mirrors the diffusers example training script named in its docstring: which text-encoder
outputs condition the denoiser, how latents are scaled and noised, what the target is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vramplan.models.catalog import ModelInfo
from vramplan.step.loading import component_config


@dataclass
class Conditioning:
    """What the text side hands the denoiser (tensors on the step's device)."""
    tensors: dict


class Random:
    """Where the step draws random numbers; the symbolic recorder swaps in allocation-only
    stand-ins (the same shapes and dtypes) because random kernels do not trace symbolically."""

    randn_like = staticmethod(torch.randn_like)
    rand = staticmethod(torch.rand)
    randint = staticmethod(torch.randint)


class Shapes(Random):
    randn_like = staticmethod(torch.empty_like)

    @staticmethod
    def rand(*size, **kwargs):
        return torch.empty(*size, **kwargs)

    @staticmethod
    def randint(low, high, size, **kwargs):
        return torch.zeros(size, dtype=torch.int64, device=kwargs.get("device"))


class Family:
    name = ""
    flow_matching = False

    # -- text -------------------------------------------------------------------------------
    def encoder_outputs(self, model: ModelInfo, name: str, encoder, input_ids) -> dict:
        """The outputs of one text encoder that the family's conditioning uses."""
        raise NotImplementedError

    def combine(self, model: ModelInfo, outputs: dict) -> Conditioning:
        """Conditioning from {encoder name: encoder_outputs(...)}."""
        raise NotImplementedError

    def encode_text(self, model: ModelInfo, encoders: dict, input_ids: dict) -> Conditioning:
        return self.combine(model, {name: self.encoder_outputs(model, name, encoders[name], input_ids[name])
                                    for name in encoders})

    def cached_text_shapes(self, model: ModelInfo, batch: int) -> dict:
        """Shapes of the conditioning tensors when `--cache-text-embeddings` precomputed them."""
        raise NotImplementedError

    # -- latents ----------------------------------------------------------------------------
    def latents_from_pixels(self, vae, pixels: torch.Tensor) -> torch.Tensor:
        cfg = vae.config
        latents = vae.encode(pixels).latent_dist.sample()
        shift = getattr(cfg, "shift_factor", None)
        if shift is not None:
            latents = latents - shift
        return latents * cfg.scaling_factor

    def noise(self, model: ModelInfo, latents: torch.Tensor, noise: torch.Tensor, rng=Random):
        """Returns (noisy latents, timesteps for the denoiser, target)."""
        batch = latents.shape[0]
        if self.flow_matching:
            # Rectified flow (SD3/Flux scripts): x_t = (1 - sigma) x_0 + sigma * noise, target
            # noise - x_0. The scripts look sigma up in the scheduler's table; the values do not
            # change memory, so we draw sigma directly.
            sigmas = rng.rand(batch, device=latents.device, dtype=latents.dtype)
            s = sigmas.view(batch, *([1] * (latents.dim() - 1)))
            noisy = (1.0 - s) * latents + s * noise
            return noisy, sigmas * 1000.0, noise - latents
        timesteps = rng.randint(0, 1000, (batch,), device=latents.device).long()
        alphas = _ddpm_alphas_cumprod(latents.device)
        sqrt_alpha = alphas[timesteps].to(latents.dtype) ** 0.5
        sqrt_one_minus = (1 - alphas[timesteps]).to(latents.dtype) ** 0.5
        shape = (batch,) + (1,) * (latents.dim() - 1)
        noisy = sqrt_alpha.view(shape) * latents + sqrt_one_minus.view(shape) * noise
        if model.prediction == "v_prediction":
            target = sqrt_alpha.view(shape) * noise - sqrt_one_minus.view(shape) * latents
        else:
            target = noise
        return noisy, timesteps, target

    # -- denoiser ---------------------------------------------------------------------------
    def predict(self, model: ModelInfo, denoiser, noisy, timesteps, cond: Conditioning):
        raise NotImplementedError

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")


def _width(model: ModelInfo, name: str) -> int:
    cfg = component_config(model, model.component(name))
    return cfg.get("hidden_size") or cfg["d_model"]


def _projection(model: ModelInfo, name: str) -> int:
    return component_config(model, model.component(name))["projection_dim"]


# SD 1.x / 2.x / XL's training scheduler, as their scheduler_config.json ship it (the prediction
# type is the model's); the step draws its noise by it, and pipeline folders vramplan writes carry it.
SD_SCHEDULER = {"_class_name": "DDPMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "steps_offset": 1,
                "clip_sample": False}


def _ddpm_alphas_cumprod(device) -> torch.Tensor:
    s = SD_SCHEDULER    # scaled_linear: linear in the square roots
    betas = torch.linspace(s["beta_start"] ** 0.5, s["beta_end"] ** 0.5, s["num_train_timesteps"],
                           dtype=torch.float32, device=device) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class StableDiffusion(Family):
    """SD 1.x / 2.x: diffusers examples/text_to_image/train_text_to_image.py."""

    name = "sd1"

    def encoder_outputs(self, model, name, encoder, input_ids):
        return {"hidden": encoder(input_ids, return_dict=False)[0]}

    def combine(self, model, outputs):
        return Conditioning({"encoder_hidden_states": outputs["text_encoder"]["hidden"]})

    def cached_text_shapes(self, model, batch):
        width = _width(model, "text_encoder")
        return {"encoder_hidden_states": (batch, model.text_lengths["text_encoder"], width)}

    def predict(self, model, denoiser, noisy, timesteps, cond):
        return denoiser(noisy, timesteps, cond.tensors["encoder_hidden_states"], return_dict=False)[0]


class StableDiffusionXL(Family):
    """SDXL: examples/text_to_image/train_text_to_image_lora_sdxl.py (`encode_prompt`)."""

    name = "sdxl"

    def encoder_outputs(self, model, name, encoder, input_ids):
        out = encoder(input_ids, output_hidden_states=True, return_dict=False)
        hidden = out[-1][-2]
        return {"hidden": hidden, "pooled": out[0]} if name == "text_encoder_2" else {"hidden": hidden}

    def combine(self, model, outputs):
        hidden = torch.cat([outputs["text_encoder"]["hidden"], outputs["text_encoder_2"]["hidden"]], dim=-1)
        batch = hidden.shape[0]
        pooled = outputs["text_encoder_2"]["pooled"]
        return Conditioning({"encoder_hidden_states": hidden, "text_embeds": pooled.view(batch, -1),
                             "time_ids": _sdxl_time_ids(model, batch, hidden.device)})

    def cached_text_shapes(self, model, batch):
        return {"encoder_hidden_states": (batch, 77, _width(model, "text_encoder") + _width(model, "text_encoder_2")),
                "text_embeds": (batch, _projection(model, "text_encoder_2")),
                "time_ids": (batch, 6)}

    def predict(self, model, denoiser, noisy, timesteps, cond):
        t = cond.tensors
        added = {"time_ids": t["time_ids"].to(noisy.dtype), "text_embeds": t["text_embeds"]}
        return denoiser(noisy, timesteps, t["encoder_hidden_states"], added_cond_kwargs=added,
                        return_dict=False)[0]


def _sdxl_time_ids(model, batch, device):
    size = model.native_resolution
    # original size, crop top-left, target size, as compute_time_ids() in the SDXL scripts.
    return torch.tensor([size, size, 0, 0, size, size], dtype=torch.float32,
                        device=device).repeat(batch, 1)


class StableDiffusion3(Family):
    """SD3 / 3.5: examples/dreambooth/train_dreambooth_lora_sd3.py (`encode_prompt`)."""

    name = "sd3"
    flow_matching = True

    def encoder_outputs(self, model, name, encoder, input_ids):
        if name == "text_encoder_3":
            return {"hidden": encoder(input_ids)[0]}
        out = encoder(input_ids, output_hidden_states=True)
        return {"hidden": out.hidden_states[-2], "pooled": out[0]}

    def combine(self, model, outputs):
        clip = torch.cat([outputs["text_encoder"]["hidden"], outputs["text_encoder_2"]["hidden"]], dim=-1)
        t5 = outputs["text_encoder_3"]["hidden"]
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        pooled = torch.cat([outputs["text_encoder"]["pooled"], outputs["text_encoder_2"]["pooled"]], dim=-1)
        return Conditioning({"encoder_hidden_states": torch.cat([clip, t5], dim=-2),
                             "pooled_projections": pooled})

    def cached_text_shapes(self, model, batch):
        lengths = model.text_lengths
        seq = lengths["text_encoder"] + lengths["text_encoder_3"]
        return {"encoder_hidden_states": (batch, seq, _width(model, "text_encoder_3")),
                "pooled_projections": (batch, _projection(model, "text_encoder")
                                       + _projection(model, "text_encoder_2"))}

    def predict(self, model, denoiser, noisy, timesteps, cond):
        t = cond.tensors
        return denoiser(hidden_states=noisy, timestep=timesteps,
                        encoder_hidden_states=t["encoder_hidden_states"],
                        pooled_projections=t["pooled_projections"], return_dict=False)[0]

    def loss(self, pred, target):
        # weighting_scheme "none" (weights of 1): mean over pixels per sample, then over the batch.
        batch = pred.shape[0]
        return torch.mean(((pred.float() - target.float()) ** 2).reshape(batch, -1), 1).mean()


class Flux(StableDiffusion3):
    """FLUX.1: examples/dreambooth/train_dreambooth_lora_flux.py."""

    name = "flux"

    def encoder_outputs(self, model, name, encoder, input_ids):
        if name == "text_encoder":
            return {"pooled": encoder(input_ids, output_hidden_states=False).pooler_output}
        return {"hidden": encoder(input_ids, output_hidden_states=False)[0]}

    def combine(self, model, outputs):
        return Conditioning({"encoder_hidden_states": outputs["text_encoder_2"]["hidden"],
                             "pooled_projections": outputs["text_encoder"]["pooled"]})

    def cached_text_shapes(self, model, batch):
        return {"encoder_hidden_states": (batch, model.text_lengths["text_encoder_2"],
                                          _width(model, "text_encoder_2")),
                "pooled_projections": (batch, _width(model, "text_encoder"))}

    def predict(self, model, denoiser, noisy, timesteps, cond):
        t = cond.tensors
        batch, channels, height, width = noisy.shape
        # FluxPipeline._pack_latents / _prepare_latent_image_ids / _unpack_latents, written with
        # tensor sizes only so that they also trace with symbolic shapes.
        packed = noisy.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
        packed = packed.reshape(batch, (height // 2) * (width // 2), channels * 4)
        ids = torch.zeros(height // 2, width // 2, 3, device=noisy.device)
        ids[..., 1] = ids[..., 1] + torch.arange(height // 2, device=noisy.device)[:, None]
        ids[..., 2] = ids[..., 2] + torch.arange(width // 2, device=noisy.device)[None, :]
        img_ids = ids.reshape((height // 2) * (width // 2), 3).to(noisy.dtype)
        txt_ids = torch.zeros(t["encoder_hidden_states"].shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = None
        if getattr(denoiser.config, "guidance_embeds", False):
            # the script's --guidance_scale default 3.5, one per sample
            guidance = torch.full((batch,), 3.5, device=noisy.device, dtype=torch.float32)
        out = denoiser(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                       pooled_projections=t["pooled_projections"],
                       encoder_hidden_states=t["encoder_hidden_states"], txt_ids=txt_ids,
                       img_ids=img_ids, return_dict=False)[0]
        out = out.view(batch, height // 2, width // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(batch, channels, height, width)


FAMILIES = {f.name: f for f in (StableDiffusion(), StableDiffusionXL(), StableDiffusion3(), Flux())}
FAMILIES["sd2"] = FAMILIES["sd1"]


def family_of(model: ModelInfo) -> Family:
    return FAMILIES[model.family]

"""The catalog of known models: what each is made of, and the facts training needs about it.

Every component is described by its real diffusers/transformers config (JSON under `configs/`),
from which `scripts/build_inventory.py` builds the module inventory on the meta device. Nothing
here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Component:
    name: str        # the pipeline's attribute: unet, transformer, vae, text_encoder, ...
    cls: str         # the diffusers / transformers class that builds it
    library: str     # "diffusers" or "transformers"
    role: str        # "denoiser", "vae" or "text_encoder"


@dataclass(frozen=True)
class ModelInfo:
    key: str
    name: str
    family: str                  # sd1, sd2, sdxl, sd3, flux: which key layouts and recipes apply
    repo: str                    # the Hugging Face repository the configs come from
    components: tuple[Component, ...]
    native_resolution: int       # pixels, square
    resolution_multiple: int     # pixels the denoiser needs the size to divide by
    vae_scale: int = 8
    latent_channels: int = 4
    text_lengths: dict = field(default_factory=dict)  # tokens per text encoder, as training scripts pad
    prediction: str = "epsilon"  # epsilon, v_prediction, flow_matching
    # Text encoders that `--train-text-encoder` trains: the diffusers SD3/Flux scripts leave T5 frozen.
    trainable_text_encoders: tuple[str, ...] = ("text_encoder",)
    aliases: tuple[str, ...] = ()
    # Local models (vramplan.models.local): the folder or file given, the catalog model whose
    # shipped inventories apply (single-file checkpoints), and the checkpoint's weight dtype.
    local_path: str | None = None
    base_model: str | None = None
    checkpoint_dtype: str | None = None
    # The denoiser's code branches on float16, so its 16-bit graphs are recorded in bf16 too
    # ("<variant>-bf16", used when the precision is bf16; fp16 ones otherwise).
    bf16_traces: bool = False

    @property
    def denoiser(self) -> Component:
        return next(c for c in self.components if c.role == "denoiser")

    @property
    def text_encoders(self) -> tuple[Component, ...]:
        return tuple(c for c in self.components if c.role == "text_encoder")

    def component(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)


def _unet(cls="UNet2DConditionModel"):
    return Component("unet", cls, "diffusers", "denoiser")


def _vae():
    return Component("vae", "AutoencoderKL", "diffusers", "vae")


def _te(name, cls):
    return Component(name, cls, "transformers", "text_encoder")


MODELS: dict[str, ModelInfo] = {m.key: m for m in [
    ModelInfo(
        key="sd15", name="Stable Diffusion 1.5", family="sd1",
        repo="stable-diffusion-v1-5/stable-diffusion-v1-5",
        components=(_unet(), _vae(), _te("text_encoder", "CLIPTextModel")),
        # The UNet downsamples the 1/8 latent three times and concatenates skips: 8 * 2^3 = 64.
        native_resolution=512, resolution_multiple=64,
        text_lengths={"text_encoder": 77}, aliases=("sd1.5", "sd-1.5", "stable-diffusion-v1-5"),
    ),
    ModelInfo(
        key="sd21", name="Stable Diffusion 2.1 (768-v)", family="sd2",
        repo="stabilityai/stable-diffusion-2-1",
        components=(_unet(), _vae(), _te("text_encoder", "CLIPTextModel")),
        native_resolution=768, resolution_multiple=64, prediction="v_prediction",
        text_lengths={"text_encoder": 77}, aliases=("sd2.1", "sd-2.1", "stable-diffusion-2-1"),
    ),
    ModelInfo(
        key="sdxl", name="Stable Diffusion XL 1.0 base", family="sdxl",
        repo="stabilityai/stable-diffusion-xl-base-1.0",
        components=(_unet(), _vae(), _te("text_encoder", "CLIPTextModel"),
                    _te("text_encoder_2", "CLIPTextModelWithProjection")),
        native_resolution=1024, resolution_multiple=64,
        text_lengths={"text_encoder": 77, "text_encoder_2": 77},
        trainable_text_encoders=("text_encoder", "text_encoder_2"),
        aliases=("sdxl-base", "sdxl1.0", "stable-diffusion-xl-base-1.0"),
    ),
    ModelInfo(
        key="sd35-medium", name="Stable Diffusion 3.5 Medium", family="sd3",
        repo="stabilityai/stable-diffusion-3.5-medium",
        components=(Component("transformer", "SD3Transformer2DModel", "diffusers", "denoiser"), _vae(),
                    _te("text_encoder", "CLIPTextModelWithProjection"),
                    _te("text_encoder_2", "CLIPTextModelWithProjection"),
                    _te("text_encoder_3", "T5EncoderModel")),
        # VAE 1/8, then 2x2 patches: 16.
        native_resolution=1024, resolution_multiple=16, latent_channels=16, prediction="flow_matching",
        # diffusers train_dreambooth_lora_sd3.py: --max_sequence_length default 77 for T5.
        text_lengths={"text_encoder": 77, "text_encoder_2": 77, "text_encoder_3": 77},
        trainable_text_encoders=("text_encoder", "text_encoder_2"),
        aliases=("sd3.5-medium", "stable-diffusion-3.5-medium"),
    ),
    ModelInfo(
        key="sd35-large", name="Stable Diffusion 3.5 Large", family="sd3",
        repo="stabilityai/stable-diffusion-3.5-large",
        components=(Component("transformer", "SD3Transformer2DModel", "diffusers", "denoiser"), _vae(),
                    _te("text_encoder", "CLIPTextModelWithProjection"),
                    _te("text_encoder_2", "CLIPTextModelWithProjection"),
                    _te("text_encoder_3", "T5EncoderModel")),
        native_resolution=1024, resolution_multiple=16, latent_channels=16, prediction="flow_matching",
        text_lengths={"text_encoder": 77, "text_encoder_2": 77, "text_encoder_3": 77},
        trainable_text_encoders=("text_encoder", "text_encoder_2"),
        aliases=("sd3.5-large", "stable-diffusion-3.5-large"),
    ),
    ModelInfo(
        key="flux-dev", name="FLUX.1 [dev]", family="flux",
        repo="black-forest-labs/FLUX.1-dev",
        components=(Component("transformer", "FluxTransformer2DModel", "diffusers", "denoiser"), _vae(),
                    _te("text_encoder", "CLIPTextModel"), _te("text_encoder_2", "T5EncoderModel")),
        native_resolution=1024, resolution_multiple=16, latent_channels=16, prediction="flow_matching",
        # diffusers train_dreambooth_lora_flux.py: --max_sequence_length default 512 for T5.
        text_lengths={"text_encoder": 77, "text_encoder_2": 512},
        trainable_text_encoders=("text_encoder",),
        aliases=("flux", "flux1-dev", "flux.1-dev"),
        # transformer_flux.py clips each block's output to +-65504 in float16 only: that clip
        # saves the residual sum for backward (38 single blocks, +0.9% at 512 px without
        # checkpointing when a bf16 run replayed the fp16 graph)
        bf16_traces=True,
    ),
]}


def find_model(key: str) -> ModelInfo | None:
    key = key.strip().lower()
    if key in MODELS:
        return MODELS[key]
    for model in MODELS.values():
        if key in model.aliases:
            return model
    return None

"""Build the one training step that simulate, profile and train run.

`build_step(spec, device)` returns the models (real diffusers / transformers classes), the
trainable parameters, the optimizer and `run_step()`, the same for every tier:
  * device "fake": fake CPU tensors (simulate): models built on the meta device, the method
    applied there, then given fake weights of the policy's dtypes; CUDA's autocast policy;
    stand-ins only where a library cannot run on fake tensors (vramplan/simulate/stand_ins.py);
  * device "cpu" / "cuda": real tensors with random weights built from the configs (profile);
  * `weights=<folder>`: real weights from a local diffusers pipeline (train).
The step follows diffusers' example training scripts: encode images with the VAE and prompts
with the frozen text encoders (no grad), noise the latents, predict with the denoiser under
autocast (mixed precision), MSE loss in fp32, backward (through a GradScaler for fp16),
clip gradients to norm 1, optimizer step, `zero_grad(set_to_none=True)`, EMA update.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from vramplan.errors import UsageError
from vramplan.methods import get_method
from vramplan.methods.base import keep_lycoris_layers_in_eval
from vramplan.models.inventory import load_model_inventories
from vramplan.precision import frozen_dtype, trainable_dtype, vae_dtype
from vramplan.simulate.variants import DTYPES
from vramplan.spec import BaseQuant, TrainingSpec
from vramplan.step.attention import attention_context, set_attention
from vramplan.step.families import Conditioning, Random, Shapes, family_of
from vramplan.step.loading import build_component, load_component

Hook = Callable[[str], None]


@dataclass
class Batch:
    pixel_values: torch.Tensor | None = None       # (B', 3, H, W) unless latents are cached
    latents: torch.Tensor | None = None            # cached latents
    input_ids: dict = field(default_factory=dict)  # text encoder -> (B', L) token ids
    cached_text: dict = field(default_factory=dict)


@dataclass
class BuiltStep:
    spec: TrainingSpec
    device: str
    models: dict
    trainable: list
    optimizer: torch.optim.Optimizer
    scaler: object | None = None
    ema: object | None = None
    fake_mode: object | None = None
    inventories: dict = field(default_factory=dict)
    steps_done: int = 0

    @property
    def torch_device(self) -> str:
        return "cpu" if self.device == "fake" else self.device

    # -- data -------------------------------------------------------------------------------
    def make_batch(self) -> Batch:
        """Random inputs of the right shapes (images per step, resolution, token lengths)."""
        spec, model = self.spec, self.spec.model
        n = spec.images_per_step
        width, height = spec.resolution
        dev = self.torch_device
        new = torch.empty if self.device == "fake" else torch.randn
        batch = Batch()
        if spec.cache_latents:
            scale = model.vae_scale
            batch.latents = new(n, model.latent_channels, height // scale, width // scale, device=dev,
                                dtype=DTYPES[frozen_dtype(spec)])
        else:
            batch.pixel_values = new(n, 3, height, width, device=dev, dtype=DTYPES[vae_dtype(spec)])
        family = family_of(model)
        if spec.cache_text_embeddings:
            for key, shape in family.cached_text_shapes(model, n).items():
                batch.cached_text[key] = new(*shape, device=dev, dtype=DTYPES[frozen_dtype(spec)])
        else:
            for te in model.text_encoders:
                length = model.text_lengths[te.name]
                batch.input_ids[te.name] = torch.zeros(n, length, dtype=torch.long, device=dev)
        return batch

    # -- the step ---------------------------------------------------------------------------
    def run_step(self, batch: Batch | None = None, hook: Hook | None = None, *,
                 update: bool = True, accumulation: int = 1) -> torch.Tensor:
        """One micro-step. Gradient accumulation (train): the loss is divided by `accumulation`
        and, with `update=False`, the step ends after backward, leaving gradients to sum into
        the next micro-step's, as accelerate's `accumulate()` does; the last one updates."""
        hook = hook or (lambda phase: None)
        spec, model = self.spec, self.spec.model
        family = family_of(model)
        rng = Shapes if self.device == "fake" else Random
        batch = batch or self.make_batch()
        low = DTYPES[spec.precision.low_dtype]
        autocast = spec.precision.autocast
        denoiser = self.models[model.denoiser.name]

        hook("encode")
        with torch.no_grad():
            if batch.latents is not None:
                latents = batch.latents
            else:
                latents = family.latents_from_pixels(self.models["vae"], batch.pixel_values)
                latents = latents.to(DTYPES[frozen_dtype(spec)])
            frozen_outputs = {}
            for te in model.text_encoders:
                if te.name in batch.input_ids and not self._trains(te.name):
                    frozen_outputs[te.name] = family.encoder_outputs(model, te.name, self.models[te.name],
                                                                    batch.input_ids[te.name])

        hook("forward")
        with self._autocast(autocast, low), attention_context(spec.attention.value):
            outputs = dict(frozen_outputs)
            for te in model.text_encoders:
                if te.name in batch.input_ids and self._trains(te.name):
                    outputs[te.name] = family.encoder_outputs(model, te.name, self.models[te.name],
                                                             batch.input_ids[te.name])
            cond = Conditioning(dict(batch.cached_text)) if batch.cached_text else family.combine(model, outputs)
            del outputs, frozen_outputs
            noise = rng.randn_like(latents)
            noisy, timesteps, target = family.noise(model, latents, noise, rng=rng)
            del noise
            pred = family.predict(model, denoiser, noisy, timesteps, cond)
            del noisy, timesteps, cond
        loss = self._loss(family, pred, target)
        del pred, target

        hook("backward")
        scaled = loss / accumulation if accumulation != 1 else loss
        if self.scaler is not None:
            self.scaler.scale(scaled).backward()
        else:
            scaled.backward()
        del scaled
        # the graph goes now, not after the optimizer: what autograd Functions keep on ctx rather
        # than save for backward (bitsandbytes' int8 matmul keeps its input) goes with it
        loss = loss.detach()
        if not update:
            return loss

        hook("optimizer")
        self.update()
        return loss

    def update(self, clip_grad_norm=None) -> None:
        """The optimizer step: unscale, clip to norm 1, step, zero the gradients, EMA. The one
        update every tier runs; `clip_grad_norm(max_norm)` replaces torch's clip where the
        gradients are sharded (FSDP's own, over all shards)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if clip_grad_norm is not None:
            clip_grad_norm(1.0)
        else:
            torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.trainable)
        self.steps_done += 1

    def _loss(self, family, pred, target):
        spec = self.spec
        if spec.prior_preservation:
            # DreamBooth: instance and class halves, each an MSE, prior weighted 1.0
            # (train_dreambooth.py: `model_pred, model_pred_prior = torch.chunk(model_pred, 2)`).
            pred, pred_prior = torch.chunk(pred, 2, dim=0)
            target, target_prior = torch.chunk(target, 2, dim=0)
            return family.loss(pred, target) + family.loss(pred_prior, target_prior)
        return family.loss(pred, target)

    def _trains(self, component: str) -> bool:
        return any(p.requires_grad for p in self.models[component].parameters())

    def _autocast(self, enabled: bool, dtype):
        if not enabled:
            return contextlib.nullcontext()
        if self.device == "fake":
            from vramplan.simulate.autocast_policy import autocast_region

            return autocast_region(dtype)
        return torch.autocast(self.torch_device, dtype=dtype)


def build_step(spec: TrainingSpec, device: str = "fake", weights: Path | None = None,
               fake_mode=None) -> BuiltStep:
    """See the module docstring. For device "fake", `fake_mode` (a FakeTensorMode) is entered
    while building and must be entered again around `run_step`."""
    if device not in ("fake", "cpu", "cuda"):
        raise UsageError(f"unknown device {device!r}: fake, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("CUDA was requested but this machine has no CUDA device (torch.cuda.is_available() is False)")
    model = spec.model
    inventories = load_model_inventories(model)
    method = get_method(spec.method)
    resident = _resident(spec)
    build_on = "meta" if device == "fake" else device
    models = {}
    quantized_denoiser = spec.base_quant is not BaseQuant.NONE
    for comp in model.components:
        if comp.name not in resident:
            continue
        if weights is not None:
            module = load_component(Path(weights), comp, dtype=load_dtype(spec, comp.name, method, inventories),
                                    attention=spec.attention.value)
            if not (quantized_denoiser and comp is model.denoiser):
                module = module.to(build_on)   # else it reaches the device layer by layer, quantized
        else:
            module = build_component(model, comp, build_on, attention=spec.attention.value)
        set_attention(module, spec.attention.value, real_xformers=device == "cuda")
        models[comp.name] = module
    if quantized_denoiser:
        from vramplan.step.quantize import quantize_linears

        denoiser = models[model.denoiser.name]
        if device != "fake" and weights is None:
            denoiser.to(DTYPES[frozen_dtype(spec)])   # random weights are built in float32
        quantize_linears(denoiser, spec.base_quant, DTYPES[spec.precision.low_dtype], build_on)
        if device != "fake":
            denoiser.to(build_on)   # what is not a Linear: loaded on the CPU when weights came from disk
    method.apply(spec, models, inventories)
    for name, module in models.items():
        trains = any(p.requires_grad for p in module.parameters())
        if name != model.denoiser.name and not trains:
            module.eval()
        else:
            module.train()
            keep_lycoris_layers_in_eval(module)
    if spec.gradient_checkpointing:
        models[model.denoiser.name].enable_gradient_checkpointing()
        for comp in model.text_encoders:
            if comp.name in models and any(p.requires_grad for p in models[comp.name].parameters()):
                models[comp.name].gradient_checkpointing_enable()

    def dtype_of(component: str):
        def choose(name, param):
            if param.requires_grad:
                return DTYPES[trainable_dtype(spec)]
            if component == "vae":
                return DTYPES[vae_dtype(spec)]
            return DTYPES[frozen_dtype(spec)]
        return choose

    if device == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        from vramplan.simulate.fake import materialize

        fake_mode = fake_mode or FakeTensorMode()
        zero_init = _zero_init_names(spec, inventories)
        with fake_mode:
            for name, module in models.items():
                materialize(module, dtype_of(name), DTYPES[vae_dtype(spec) if name == "vae" else frozen_dtype(spec)])
                for pname, param in module.named_parameters():
                    if (name, pname.replace(".default", "")) in zero_init:
                        param._vramplan_zero_init = True
        # optimizers are built outside the fake mode (bitsandbytes makes real quantization maps)
        return _finish(spec, device, models, inventories, fake_mode)
    from vramplan.step.quantize import is_quantized

    for name, module in models.items():
        choose = dtype_of(name)
        quantized = {id(m.weight) for m in module.modules() if is_quantized(m)}
        with torch.no_grad():
            for pname, param in module.named_parameters():
                if id(param) not in quantized:
                    param.data = param.data.to(choose(pname, param))
            for bname, buf in module.named_buffers():
                if buf.is_floating_point():
                    buf.data = buf.data.to(DTYPES[vae_dtype(spec) if name == "vae" else frozen_dtype(spec)])
    return _finish(spec, device, models, inventories, None)


def load_dtype(spec: TrainingSpec, component: str, method, inventories) -> torch.dtype:
    """The dtype a component is read from disk in, on the CPU, before it moves to the device.

    diffusers reads a model in float32 unless told otherwise, and moving that to the GPU before
    casting put the whole fp32 model there first: `train` on H200, SD 1.5 LoRA in bf16 from an
    fp16 folder, peaked at 3.85 GiB while loading against 3.22 GiB in its steps. Frozen weights
    are read straight in the dtype the step keeps them in; a component whose own weights train
    (full fine-tune, a trained text encoder) in the trained dtype, so no precision is lost."""
    trained = {t.name for t in method.trainable_tensors(spec, inventories).get(component, [])}
    if trained & {name for name, _ in inventories[component].params}:
        return DTYPES[trainable_dtype(spec)]
    return DTYPES[vae_dtype(spec) if component == "vae" else frozen_dtype(spec)]


def trainable_parameters(models: dict) -> list:
    """Every parameter that requires grad, once (a module may share one), in model order."""
    seen, trainable = set(), []
    for module in models.values():
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                trainable.append(p)
    return trainable


def _finish(spec, device, models, inventories, fake_mode) -> BuiltStep:
    trainable = trainable_parameters(models)
    if not trainable:
        raise UsageError(f"--method {spec.method.value} trains nothing in {spec.model.name}")
    from vramplan.step.optimizers import build_optimizer, build_scaler

    optimizer = build_optimizer(spec, trainable, device, fake_mode)
    with (fake_mode if fake_mode is not None else contextlib.nullcontext()):
        scaler = build_scaler(spec, device)
    ema = None
    if spec.ema:
        from vramplan.step.optimizers import build_ema

        with (fake_mode if fake_mode is not None else contextlib.nullcontext()):
            ema = build_ema(trainable)
    return BuiltStep(spec=spec, device=device, models=models, trainable=trainable, optimizer=optimizer,
                     scaler=scaler, ema=ema, fake_mode=fake_mode, inventories=inventories)


def _zero_init_names(spec, inventories) -> set:
    """(component, parameter name) of the trained tensors that start as zeros (peft's lora_B...)."""
    tensors = get_method(spec.method).trainable_tensors(spec, inventories)
    return {(c, t.name) for c, ts in tensors.items() for t in ts if t.zero_init}


def _resident(spec: TrainingSpec) -> set:
    out = {spec.model.denoiser.name}
    if not spec.cache_latents:
        out.add("vae")
    if not spec.cache_text_embeddings:
        out.update(c.name for c in spec.model.text_encoders)
    return out

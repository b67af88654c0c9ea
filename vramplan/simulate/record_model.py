"""Record one denoiser / text encoder / VAE forward of a catalog model as a `Graph` (record.py)."""

from __future__ import annotations

import contextlib
import time

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from vramplan.models.catalog import ModelInfo
from vramplan.simulate.autocast_policy import autocast_region, cuda_autocast_policy
from vramplan.simulate.bnb_paths import cuda_bitsandbytes
from vramplan.simulate.fake import materialize
from vramplan.simulate.record import Graph, GraphRecorder, no_saved_tensors
from vramplan.simulate.variants import DtypePolicy
from vramplan.spec import Precision
from vramplan.step.attention import attention_context, set_attention
from vramplan.step.families import Conditioning, Shapes, family_of
from vramplan.step.loading import build_component

# Size hints for the symbolic dims: distinct, not 0 or 1 (ShapeEnv specialises those and unifies
# equal hints), and multiples of 8 so that the UNet takes its usual no-upsample-size branch.
HINTS = {"B": 3, "H": 72, "W": 88}

# (precision, trainable base): the four dtype layouts the denoiser's graph can take; bf16 has the
# same byte sizes as fp16, so fp16 stands for both.
VARIANTS = {
    "fp32": (Precision.FP32, False),
    "amp-frozen": (Precision.FP16, False),
    "amp-trainable": (Precision.FP16, True),
    "pure": (Precision.FP16_PURE, False),
}


def _symbolic(mode: FakeTensorMode, shape, dynamic: list[bool], dtype) -> torch.Tensor:
    ctx = StatelessSymbolicContext(
        dynamic_sizes=[DimDynamic.DYNAMIC if d else DimDynamic.STATIC for d in dynamic],
        constraint_sizes=[None] * len(shape))
    from torch._dynamo.source import ConstantSource

    return mode.from_tensor(torch.empty(shape, dtype=dtype), source=ConstantSource(f"in{len(shape)}"),
                            symbolic_context=ctx)


def keep_dtype(module: torch.nn.Module, names: list[str]) -> None:
    """Make the named Linear/Conv2d modules return their input's dtype, as peft's LyCORIS layers
    (LoHa, LoKr) do (`result.to(previous_dtype)`), so that what follows them is recorded with
    the dtypes it has under those methods; the method's template later replaces these calls."""
    for name in names:
        sub = module.get_submodule(name)
        base = type(sub)
        sub.__class__ = type(f"KeepDtype{base.__name__}", (base,),
                             {"forward": lambda self, x, _f=base.forward: _f(self, x).to(x.dtype)})


def keep_targets(model: ModelInfo, component: str, targets: str) -> list[str]:
    from vramplan.methods.targets import denoiser_targets, text_encoder_targets
    from vramplan.models.inventory import load_model_inventories
    from vramplan.spec import build_spec

    inventory = load_model_inventories(model)[component]
    if component == model.denoiser.name:
        spec = build_spec({"model": model, "method": "loha", "lora_targets": targets})
        return [m.name for m in denoiser_targets(spec, inventory)]
    return [m.name for m in text_encoder_targets(inventory)]


QUANT_SUFFIXES = ("-int8", "-nf4")


def split_quant(variant: str):
    """"amp-frozen-nf4" -> ("amp-frozen", BaseQuant.NF4)."""
    from vramplan.spec import BaseQuant

    for suffix in QUANT_SUFFIXES:
        if variant.endswith(suffix):
            return variant[: -len(suffix)], BaseQuant(suffix[1:])
    return variant, BaseQuant.NONE


BF16 = {Precision.FP16: Precision.BF16, Precision.FP16_PURE: Precision.BF16_PURE}


def record_denoiser(model: ModelInfo, variant: str, attention: str = "sdpa") -> Graph:
    """`variant` as VARIANTS name them, with the quantization, "-keep-<targets>" and, last,
    "-bf16" (the 16-bit dtype is bfloat16, not float16: `ModelInfo.bf16_traces`)."""
    full_variant = variant
    variant, bf16 = variant.removesuffix("-bf16"), variant.endswith("-bf16")
    variant, quant = split_quant(variant)
    variant, _, keep = variant.partition("-keep-")
    precision, trainable = VARIANTS[variant]
    if bf16:
        precision = BF16[precision]
    policy = DtypePolicy(precision)
    family = family_of(model)
    comp = model.denoiser
    denoiser = build_component(model, comp, "meta")
    set_attention(denoiser, attention)
    denoiser.requires_grad_(trainable)
    denoiser.train()
    if keep:
        keep_dtype(denoiser, keep_targets(model, comp.name, keep))
    if quant.value != "none":
        from vramplan.step.quantize import quantize_linears

        quantize_linears(denoiser, quant, policy.low, "meta")

    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env, static_shapes=False)
    recorder = GraphRecorder()
    started = time.time()
    latents_hint = (HINTS["B"], model.latent_channels, HINTS["H"], HINTS["W"])
    latents = _symbolic(mode, latents_hint, [True, False, True, True], policy.activations)
    b, _, h, w = latents.shape
    recorder.symbols = {b.node.expr: _sym("B"), h.node.expr: _sym("H"), w.node.expr: _sym("W")}
    with mode:
        materialize(denoiser, lambda name, p: policy.weight(trainable), policy.frozen)
        recorder.register_params(denoiser, prefix=f"{comp.name}.")
        denoiser.enable_gradient_checkpointing(recorder.checkpoint_func())
        shapes = family.cached_text_shapes(model, b)
        cond = {}
        for key, shape in shapes.items():
            cond[key] = torch.empty(shape, dtype=policy.activations)
        if not trainable:
            # Adapters upstream make every activation require grad; so does this.
            latents.requires_grad_(True)
        recorder.graph.inputs["latents"] = recorder.tid(latents)
        for key, tensor in cond.items():
            recorder.graph.inputs[key] = recorder.tid(tensor)
        with _recording(recorder, policy.autocast):
            noise = Shapes.randn_like(latents)
            noisy, timesteps, target = family.noise(model, latents, noise, rng=Shapes)
            del noise
            region = autocast_region(policy.low) if policy.autocast else contextlib.nullcontext()
            # eager in dispatcher-based transformers (SD 3, Flux) is SDPA's math kernel, as the step runs it
            with region, attention_context(attention):
                pred = family.predict(model, denoiser, noisy, timesteps, Conditioning(cond))
            recorder.mark("autocast_exit")
            del noisy, timesteps
            loss = family.loss(pred, target)
            recorder.graph.outputs["loss"] = recorder.tid(loss)
            del pred, target
            recorder.mark("end")
    graph = recorder.graph
    graph.guards = [str(g.expr.xreplace(recorder.symbols)) for g in env.guards]
    graph.meta = {"model": model.key, "component": comp.name, "variant": full_variant,
                  "attention": attention, "symbols": {"B": "batch (images per step)",
                                                      "H": "latent height", "W": "latent width"},
                  "hints": HINTS, "torch": torch.__version__, "seconds": round(time.time() - started, 2)}
    return graph


@contextlib.contextmanager
def symbolic_interpolate():
    """`F.interpolate(x, scale_factor=2.0)` computes its output size through floats, which makes
    the shape environment specialise every symbol; asking for the same size as integers runs the
    same kernel (upsample_nearest2d) and keeps the sizes symbolic."""
    import torch.nn.functional as F

    original = F.interpolate

    def interpolate(input, size=None, scale_factor=None, *args, **kwargs):
        if size is None and scale_factor is not None:
            factors = scale_factor if isinstance(scale_factor, (tuple, list)) else \
                [scale_factor] * (input.dim() - 2)
            mode = kwargs.get("mode", args[0] if args else "nearest")
            if mode == "nearest" and input.dim() == 4 and all(float(f).is_integer() for f in factors):
                size = [int(f) * s for f, s in zip(factors, input.shape[2:])]
                return torch.ops.aten.upsample_nearest2d.default(input, size, *map(float, factors))
        return original(input, size, scale_factor, *args, **kwargs)

    original_pad = F.pad

    def pad(input, pad, mode="constant", value=None):
        # F.pad (constant_pad_nd) specialises symbolic sizes under the fake mode. Write the same
        # result the same way memory-wise: one new tensor of the padded size, the input copied in.
        # Used only where nothing requires grad (the VAE encoder's downsampling).
        if mode != "constant" or input.requires_grad or any(p < 0 for p in pad):
            return original_pad(input, pad, mode, value)
        sizes = list(input.shape)
        index = [slice(None)] * input.dim()
        for k in range(len(pad) // 2):
            dim = input.dim() - 1 - k
            before, after = pad[2 * k], pad[2 * k + 1]
            index[dim] = slice(before, before + sizes[dim])
            sizes[dim] = sizes[dim] + before + after
        out = input.new_full(sizes, 0.0 if value is None else value)
        out[tuple(index)] = input
        return out

    original_kron = torch.kron

    def kron(a, b):
        # aten::kron (KronImpl in aten/src/ATen/native/LinearAlgebra.cpp) views both operands with
        # interleaved unit dims, multiplies (one allocation of the result's size) and views the
        # product as the result; its C++ reads concrete sizes, so write the same ops here.
        nd = max(a.dim(), b.dim())
        a = a.reshape((1,) * (nd - a.dim()) + tuple(a.shape))
        b = b.reshape((1,) * (nd - b.dim()) + tuple(b.shape))
        a_view, b_view, out = [], [], []
        for i in range(nd):
            a_view += [a.shape[i], 1]
            b_view += [1, b.shape[i]]
            out.append(a.shape[i] * b.shape[i])
        return (a.reshape(a_view) * b.reshape(b_view)).reshape(out)

    F.interpolate = interpolate
    F.pad = pad
    torch.kron = kron
    try:
        yield
    finally:
        F.interpolate = original
        F.pad = original_pad
        torch.kron = original_kron


def _sym(name: str):
    import sympy

    return sympy.Symbol(name, integer=True, positive=True)


def _recording(recorder, policy_autocast: bool):
    stack = contextlib.ExitStack()
    stack.enter_context(cuda_autocast_policy())
    stack.enter_context(symbolic_interpolate())
    stack.enter_context(cuda_bitsandbytes())
    stack.enter_context(_shape_only_sampling())
    stack.enter_context(recorder)
    stack.enter_context(recorder.module_hooks())
    stack.enter_context(recorder.autograd_functions())
    stack.enter_context(no_saved_tensors())
    return stack


@contextlib.contextmanager
def _shape_only_sampling():
    """The VAE's `latent_dist.sample()` draws `randn_tensor(...)`; random kernels do not trace
    symbolically, so while recording it allocates the same shape without drawing."""
    import diffusers.models.autoencoders.vae as vae_module

    original = vae_module.randn_tensor

    def empty(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.empty(shape, device=device, dtype=dtype)

    vae_module.randn_tensor = empty
    try:
        yield
    finally:
        vae_module.randn_tensor = original


def record_text_encoder(model: ModelInfo, name: str, variant: str, attention: str = "sdpa",
                        textual_inversion: bool = False) -> Graph:
    """One text encoder's forward as the family calls it; outputs are what conditioning uses."""
    from vramplan.step.modules import EmbeddingWithNewTokens, replace_module, token_embedding_path

    variant, _, keep = variant.partition("-keep-")
    precision, trainable = VARIANTS[variant]
    policy = DtypePolicy(precision)
    family = family_of(model)
    comp = model.component(name)
    encoder = build_component(model, comp, "meta", attention=attention)
    encoder.requires_grad_(trainable)
    encoder.train(trainable)
    if keep:
        keep_dtype(encoder, keep_targets(model, name, keep))
    path = None
    if textual_inversion:
        path = token_embedding_path(encoder)
        replace_module(encoder, path, EmbeddingWithNewTokens(encoder.get_submodule(path), 1))
        encoder.get_submodule(path).new_rows.requires_grad_(True)
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env, static_shapes=False)
    recorder = GraphRecorder()
    started = time.time()
    length = model.text_lengths[name]
    ids = _symbolic(mode, (HINTS["B"], length), [True, False], torch.int64)
    recorder.symbols = {ids.shape[0].node.expr: _sym("B")}

    def dtype_of(pname, p):
        if textual_inversion and pname.endswith("new_rows"):
            return policy.trainable
        return policy.weight(trainable)

    with mode:
        materialize(encoder, dtype_of, policy.frozen)
        recorder.register_params(encoder, prefix=f"{name}.")
        recorder.graph.inputs["input_ids"] = recorder.tid(ids)
        with _recording(recorder, policy.autocast):
            region = autocast_region(policy.low) if policy.autocast else contextlib.nullcontext()
            with region:
                outputs = family.encoder_outputs(model, name, encoder, ids)
            recorder.mark("autocast_exit")
            for role, tensor in outputs.items():
                recorder.graph.outputs[role] = recorder.tid(tensor)
            del outputs
            recorder.mark("end")
    return _finish(recorder, env, model, name, variant + ("-ti" if textual_inversion else "")
                   + (f"-keep-{keep}" if keep else ""), attention,
                   started, {"B": "batch (images per step)"})


def record_vae_encode(model: ModelInfo, variant: str, attention: str = "sdpa") -> Graph:
    """`vae.encode(pixels).latent_dist.sample()` scaled, as the scripts do, with no gradient."""
    precision, _ = VARIANTS[variant]
    policy = DtypePolicy(precision)
    family = family_of(model)
    vae = build_component(model, model.component("vae"), "meta")
    set_attention(vae, attention)
    vae.requires_grad_(False)
    vae.eval()
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env, static_shapes=False)
    recorder = GraphRecorder()
    started = time.time()
    scale = model.vae_scale
    pixels = _symbolic(mode, (HINTS["B"], 3, HINTS["H"] * scale, HINTS["W"] * scale),
                       [True, False, True, True], policy.frozen)
    b, _, h, w = pixels.shape
    recorder.symbols = {b.node.expr: _sym("B"), h.node.expr: _sym("H"), w.node.expr: _sym("W")}
    with mode:
        materialize(vae, lambda n, p: policy.frozen, policy.frozen)
        recorder.register_params(vae, prefix="vae.")
        recorder.graph.inputs["pixel_values"] = recorder.tid(pixels)
        with _recording(recorder, False):
            with torch.no_grad():
                latents = family.latents_from_pixels(vae, pixels)
            recorder.graph.outputs["latents"] = recorder.tid(latents)
            del latents
            recorder.mark("end")
    return _finish(recorder, env, model, "vae", variant, attention, started,
                   {"B": "batch (images per step)", "H": "pixel height", "W": "pixel width"})


def _finish(recorder, env, model, component, variant, attention, started, symbols) -> Graph:
    graph = recorder.graph
    graph.guards = [str(g.expr.xreplace(recorder.symbols)) for g in env.guards]
    graph.meta = {"model": model.key, "component": component, "variant": variant,
                  "attention": attention, "symbols": symbols, "hints": HINTS,
                  "torch": torch.__version__, "seconds": round(time.time() - started, 2)}
    return graph

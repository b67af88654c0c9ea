"""Record one denoiser / text encoder / VAE forward of a catalog model as a `Graph` (record.py)."""

from __future__ import annotations

import contextlib
import time

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

from vramplan.models.catalog import ModelInfo
from vramplan.simulate.autocast_policy import autocast_region, cuda_autocast_policy
from vramplan.simulate.fake import materialize
from vramplan.simulate.record import Graph, GraphRecorder, no_saved_tensors
from vramplan.simulate.variants import DtypePolicy
from vramplan.spec import Precision
from vramplan.step.attention import set_attention
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


def record_denoiser(model: ModelInfo, variant: str, attention: str = "sdpa") -> Graph:
    precision, trainable = VARIANTS[variant]
    policy = DtypePolicy(precision)
    family = family_of(model)
    comp = model.denoiser
    denoiser = build_component(model, comp, "meta")
    set_attention(denoiser, attention)
    denoiser.requires_grad_(trainable)
    denoiser.train()

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
        with contextlib.ExitStack() as stack:
            stack.enter_context(cuda_autocast_policy())
            stack.enter_context(symbolic_interpolate())
            stack.enter_context(recorder)
            stack.enter_context(recorder.module_hooks())
            stack.enter_context(no_saved_tensors())
            noise = Shapes.randn_like(latents)
            noisy, timesteps, target = family.noise(model, latents, noise, rng=Shapes)
            del noise
            region = autocast_region(policy.low) if policy.autocast else contextlib.nullcontext()
            with region:
                pred = family.predict(model, denoiser, noisy, timesteps, Conditioning(cond))
            recorder.mark("autocast_exit")
            del noisy, timesteps
            loss = family.loss(pred, target)
            recorder.graph.outputs["loss"] = recorder.tid(loss)
            del pred, target
            recorder.mark("end")
    graph = recorder.graph
    graph.guards = [str(g.expr.xreplace(recorder.symbols)) for g in env.guards]
    graph.meta = {"model": model.key, "component": comp.name, "variant": variant,
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

    F.interpolate = interpolate
    try:
        yield
    finally:
        F.interpolate = original


def _sym(name: str):
    import sympy

    return sympy.Symbol(name, integer=True, positive=True)

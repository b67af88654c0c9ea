"""The whole training step as one allocation timeline, for the analytic tier.

load (weights, buffers, EMA) -> per step: encode (frozen VAE and text encoders, no grad) ->
forward (trained text encoders, then the denoiser) -> backward (the denoiser, then the trained
text encoders) -> optimizer (states on the first step, transients, then gradients freed by
`zero_grad(set_to_none=True)`). Two steps, so that the second runs with optimizer states
resident, as every later step does. Each phase is replayed from the recorded graphs
(`replay.py`); everything else is counted from the inventories.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vramplan.estimate.optimizer import optimizer_state_tensors
from vramplan.estimate.optimizer_step import clip_scalars, step_transients
from vramplan.estimate.adapters import adapted
from vramplan.estimate.concrete import concretize
from vramplan.estimate.replay import Clock, ReplayOptions, Replayer
from vramplan.estimate.traces import graph_for
from vramplan.estimate.weights import resident_components, weight_tensors
from vramplan.footprint import Category
from vramplan.timeline import Record
from vramplan.methods import get_method
from vramplan.precision import ITEMSIZE, graph_variant, trainable_dtype, vae_dtype
from vramplan.spec import BaseQuant, TrainingSpec

STEPS = 2


@dataclass
class StepTimeline:
    clock: Clock
    notes: list = field(default_factory=list)
    saved_by_module: dict = field(default_factory=dict)
    unknown_ops: set = field(default_factory=set)


def _sizes(spec: TrainingSpec) -> dict:
    width, height = spec.resolution
    scale = spec.model.vae_scale
    return {"B": spec.images_per_step, "H": height // scale, "W": width // scale}


def build_timeline(spec: TrainingSpec, inventories: dict) -> StepTimeline:
    clock = Clock()
    out = StepTimeline(clock)
    method = get_method(spec.method)
    trained = method.trainable_tensors(spec, inventories)
    resident = resident_components(spec)

    clock.phase("load")
    for t in weight_tensors(spec, inventories):
        clock.alloc(t.nbytes, t.category, "load", module=t.name)

    trainable_names = {(c, t.name) for c, ts in trained.items() for t in ts}
    state_tensors = []
    state_size = ITEMSIZE[trainable_dtype(spec)]
    for component, tensors in trained.items():
        states = optimizer_state_tensors(spec.optimizer, [t.shape for t in tensors], state_size,
                                         spec.momentum, zero_params=[t.zero_init for t in tensors])
        state_tensors.extend(s for s in states if not s.on_host)
    transients = step_transients(spec.optimizer, [(t.numel, state_size)
                                                  for ts in trained.values() for t in ts])
    n_grads = sum(len(ts) for ts in trained.values())

    states_live = []
    first = None
    # Gradient accumulation: micro-steps after the first run with the gradients already there;
    # each new gradient is added in place (AccumulateGrad) and dropped. Two micro-steps show all
    # there is: the third repeats the second.
    micro_steps = min(spec.gradient_accumulation_steps, 2)
    for step in range(STEPS):
        prefix = "" if step == 0 else "step 2 "
        for micro in range(micro_steps):
            micro_prefix = prefix + (f"micro {micro + 1} " if micro else "")
            if first is None:
                window_start = clock.now + 1
                phases_before = len(clock.phases)
                step_grads, step_batch = _one_step(spec, inventories, trained, resident, clock, prefix, out)
                first = (window_start, clock.now, phases_before, step_grads, step_batch)
            else:
                # every later (micro-)step allocates what the first did, in the same order
                step_grads, step_batch = _repeat_step(clock, *first, micro_prefix)
            if micro == 0:
                grads = step_grads
            else:
                for rec in step_grads:
                    rec.category = Category.TEMPORARIES
                    rec.free_at = rec.alloc_at + 1   # summed into param.grad, then freed
            if micro < micro_steps - 1:
                for rec in step_batch:
                    clock.free(rec)   # the next micro-step's batch replaces it
            batch = step_batch
        clock.phase(prefix + "optimizer")
        if step == 0:
            for s in state_tensors:
                states_live.append(clock.alloc(s.nbytes, Category.OPTIMIZER_STATES, prefix + "optimizer"))
        scalars = [clock.alloc(n, Category.TEMPORARIES, prefix + "optimizer") for n in clip_scalars(n_grads)]
        for rec in scalars:
            clock.free(rec)
        for wave in transients:
            recs = [clock.alloc(n, Category.TEMPORARIES, prefix + "optimizer") for n in wave]
            for rec in recs:
                clock.free(rec)
        if spec.ema:
            # diffusers EMAModel.step: `s_param.sub_(one_minus_decay * (s_param - param))`, one
            # parameter at a time: two transients of the largest trained tensor at once.
            largest = max((t.numel for ts in trained.values() for t in ts), default=0)
            recs = [clock.alloc(largest * 4, Category.TEMPORARIES, prefix + "optimizer") for _ in range(2)]
            for rec in recs:
                clock.free(rec)
        for rec in grads:
            clock.free(rec)   # optimizer.zero_grad(set_to_none=True)
        for rec in batch:
            clock.free(rec)   # the next batch replaces this one
    return out


def _repeat_step(clock: Clock, start: int, end: int, phases_before: int, grads: list, batch: list,
                 prefix: str) -> tuple[list, list]:
    """Copy the records of events start..end (encode to backward of the first step) to now."""
    offset = clock.now + 1 - start
    copies = {}
    for rec in list(clock.records):
        if start <= rec.alloc_at <= end:
            free = rec.free_at + offset if rec.free_at is not None and rec.free_at <= end else None
            copy = Record(rec.nbytes, rec.alloc_at + offset, free, rec.category,
                          prefix + rec.phase, rec.module, rec.op, rec.saved)
            clock.records.append(copy)
            copies[id(rec)] = copy
    for name, event in clock.phases[phases_before:]:
        if start <= event <= end + 1 and not name.endswith("optimizer"):
            clock.phases.append((prefix + name, event + offset))
    clock.now = end + offset
    return [copies[id(r)] for r in grads if id(r) in copies], [copies[id(r)] for r in batch if id(r) in copies]


def _one_step(spec, inventories, trained, resident, clock: Clock, prefix: str, out: StepTimeline) -> list:
    env = _sizes(spec)
    method = get_method(spec.method)
    model = spec.model
    denoiser = model.denoiser.name
    batch_inputs = []
    clock.phase(prefix + "encode")
    if not spec.cache_latents:
        width, height = spec.resolution
        pixels = clock.alloc(env["B"] * 3 * width * height * ITEMSIZE[vae_dtype(spec)], Category.INPUTS,
                             prefix + "encode")
        batch_inputs.append(pixels)
        vae_env = dict(env, H=height, W=width)
        _inference(graph_for(spec, "vae", "fp32" if vae_dtype(spec) == "float32" else "pure"),
                   vae_env, clock, prefix + "encode", out, {"pixel_values": pixels})
    trained_tes = [c.name for c in model.text_encoders if c.name in trained]
    frozen_tes = [c.name for c in model.text_encoders if c.name not in trained and c.name in resident]
    ids = {}
    for name in trained_tes + frozen_tes:
        # token ids (int64) of the batch, alive for the whole step like the pixels
        ids[name] = clock.alloc(env["B"] * model.text_lengths[name] * 8, Category.INPUTS, prefix + "encode")
        batch_inputs.append(ids[name])
    for name in frozen_tes:
        _inference(graph_for(spec, name, graph_variant(spec, False, autocast=False)), env, clock,
                   prefix + "encode", out, {"input_ids": ids[name]})

    clock.phase(prefix + "forward")
    te_replays = []
    method_trains_te = spec.method.trains_denoiser
    for name in trained_tes:
        variant = graph_variant(spec, method_trains_te)
        if spec.method.value == "textual-inversion":
            variant += "-ti"
        elif method.output_keeps_input_dtype and variant == "amp-frozen":
            variant += "-keep-te"
        graph = adapted(concretize(graph_for(spec, name, variant), env), spec, method, name,
                        method.wrapped_modules(spec, name, inventories), variant)
        rep = Replayer(graph,
                       ReplayOptions(trainable=method.parameter_filter(spec, name, inventories),
                                     gradient_checkpointing=False, phase_prefix=prefix), clock)
        rep.forward({"input_ids": ids[name]})
        te_replays.append(rep)
    variant = graph_variant(spec, spec.method.trains_denoiser)
    if method.output_keeps_input_dtype and variant == "amp-frozen":
        variant += f"-keep-{spec.lora_targets.value}"
    if spec.base_quant is not BaseQuant.NONE:
        variant += f"-{spec.base_quant.value}"
    graph = adapted(concretize(graph_for(spec, denoiser, variant), env), spec, method, denoiser,
                    method.wrapped_modules(spec, denoiser, inventories), variant)
    rep = Replayer(graph, ReplayOptions(trainable=method.parameter_filter(spec, denoiser, inventories),
                                 inputs_require_grad=frozenset(_denoiser_rg_inputs(spec, trained_tes)),
                                 gradient_checkpointing=spec.gradient_checkpointing,
                                 phase_prefix=prefix), clock)
    rep.forward()
    clock.phase(prefix + "backward")
    result = rep.backward()
    rep.finish()
    out.unknown_ops |= result.unknown_ops
    if not prefix:
        out.saved_by_module.update(result.saved_by_module)
    for rec in result.input_grads.values():
        clock.free(rec)
    grads = list(result.param_grads.values())
    for te in reversed(te_replays):
        outputs = te.g.outputs
        given = {role: clock.alloc(te.t_bytes[tid], Category.TEMPORARIES, prefix + "backward")
                 for role, tid in outputs.items()}
        res = te.backward(given)
        te.finish(keep=[ids[name] for name in ids])
        out.unknown_ops |= res.unknown_ops
        grads.extend(res.param_grads.values())
    return grads, batch_inputs


def _denoiser_rg_inputs(spec: TrainingSpec, trained_tes: list) -> set:
    if not trained_tes:
        return set()
    return {"encoder_hidden_states", "text_embeds", "pooled_projections"}


def _inference(graph, env, clock: Clock, phase: str, out: StepTimeline, inputs: dict | None = None) -> None:
    rep = Replayer(concretize(graph, env), ReplayOptions(trainable=lambda name: False, phase_prefix=""), clock)
    rep.forward(inputs)
    rep.finish(keep=list((inputs or {}).values()))
    out.unknown_ops |= rep.result.unknown_ops

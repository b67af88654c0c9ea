"""The whole training step as one allocation timeline, for the analytic tier.

load (weights, buffers, EMA) -> per step: encode (frozen VAE and text encoders, no grad) ->
forward (trained text encoders, then the denoiser) -> backward (the denoiser, then the trained
text encoders) -> optimizer (states on the first step, transients, then gradients freed by
`zero_grad(set_to_none=True)`). Two steps, so that the second runs with optimizer states
resident, as every later step does. Each phase is replayed from the recorded graphs
(`replay.py`); everything else is counted from the inventories.

`fit` builds this timeline for many specs that differ in a setting or two, and most replays do
not depend on the setting that changed (the VAE's and the frozen text encoders' inference never
depend on the rank or the optimizer, the denoiser's forward and backward never on the optimizer
or the caching). So each replay's clock events are kept, relative to its first, under the exact
inputs that decide them, and a later timeline with the same inputs re-applies them at its own
clock (`_Window`): the same records, in the same order, at the same distances.
"""

from __future__ import annotations

import dataclasses
import functools
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

from vramplan.estimate.optimizer import optimizer_state_tensors
from vramplan.estimate.optimizer_step import clip_scalars, step_transients
from vramplan.estimate import native_replay
from vramplan.estimate.adapters import adapted, readapted
from vramplan.estimate.concrete import concretize
from vramplan.estimate.record_log import ColumnRows, RecordLog, Rows, Shifted
from vramplan.estimate.replay import Clock, Replayed, ReplayOptions, Replayer, cuda_rounded
from vramplan.estimate.resize import resized_bytes, sizes_of
from vramplan.estimate.traces import attention_name, graph_for
from vramplan.estimate.weights import resident_components, weight_tensors
from vramplan.footprint import Category
from vramplan.timeline import Record
from vramplan.methods import get_method
from vramplan.methods import get_method as registered_method
from vramplan.precision import ITEMSIZE, graph_variant, trainable_dtype, vae_dtype
from vramplan.spec import BaseQuant, TrainingSpec

STEPS = 2


@dataclass
class StepTimeline:
    clock: Clock
    notes: list = field(default_factory=list)
    saved_by_module: dict = field(default_factory=dict)
    unknown_ops: set = field(default_factory=set)
    prepared: object = None     # footprint_build.Prepared of these records, made by fit's lower bound
    log: RecordLog | None = None

    @property
    def records(self) -> RecordLog:
        """The step's records, in order (made into Record objects only if iterated)."""
        if self.log is None:
            self.log = self.clock.records
        return self.log


def _sizes(spec: TrainingSpec) -> dict:
    width, height = spec.resolution
    scale = spec.model.vae_scale
    return {"B": spec.images_per_step, "H": height // scale, "W": width // scale}


def build_timeline(spec: TrainingSpec, inventories: dict, *, hand_on: bool = False, check=None) -> StepTimeline:
    """The step's timeline. `hand_on`: a caller that only reads it (fit's lower bound, its
    device used) lets the next build of the same spec take this one instead of building it
    again. A spec with a strategy shares its records with the builds of the other strategies:
    read them, as the distributed rewrite does (it copies them).

    `check(records)`: called with the records so far once a denoiser's forward has been replayed
    afresh (not re-applied), before its backward -- fit's lower bound may stop the build there
    by raising: the records a step makes first are all in the step's."""
    key = _replay_key(spec, inventories, get_method(spec.method), "timeline", every_field=True)
    pins = tuple(inventories.values())
    if key is not None and _HANDED_ON:
        (known, known_pins, timeline), = _HANDED_ON
        _HANDED_ON.clear()
        if known == key and _same(known_pins, pins):
            if hand_on:
                _HANDED_ON.append((known, known_pins, timeline))
            return timeline
    if key is not None and spec.is_distributed:
        # The strategy only rewrites this timeline (vramplan.distributed), from copies of its
        # records: fit's candidates that differ in strategy share one build.
        shared_key = _shared(key)
        known = _SHARED.get(shared_key)
        if known is None or not _same(known[0], pins):
            known = (pins, _build_timeline(spec, inventories, check))
            _SHARED.put(shared_key, known)
        return _sharing_records(known[1])
    timeline = _build_timeline(spec, inventories, check)
    if hand_on and key is not None:
        _HANDED_ON.append((key, pins, timeline))
    return timeline


def _sharing_records(timeline: StepTimeline) -> StepTimeline:
    """A timeline of its own (lists, notes, sets) over the same records."""
    clock = Clock()
    log = timeline.records.fork()
    clock.runs, clock.phases, clock.now = list(log.runs), list(timeline.clock.phases), timeline.clock.now
    return StepTimeline(clock, list(timeline.notes), dict(timeline.saved_by_module), set(timeline.unknown_ops),
                        log=log)


def _build_timeline(spec: TrainingSpec, inventories: dict, check=None) -> StepTimeline:
    clock = Clock()
    out = StepTimeline(clock)
    trained, weights = step_tensors(spec, inventories)
    resident = resident_components(spec)

    clock.phase("load")
    _place_rows(clock, spec, inventories, lambda: _load_rows(weights), "", "load rows")

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
                records_before, phases_before = clock.count(), len(clock.phases)
                step_grads, step_batch = _one_step(spec, inventories, trained, resident, clock, prefix, out, check)
                first = (window_start, clock.now, records_before, clock.count(), phases_before, step_grads,
                         step_batch)
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
        first_step = step == 0
        _place_rows(clock, spec, inventories, lambda: _optimizer_rows(spec, inventories, trained, first_step),
                    prefix, "optimizer rows", trainable_dtype(spec), spec.optimizer, spec.momentum, spec.ema,
                    first_step, kept=kept_for_trained)
        for rec in grads:
            clock.free(rec)   # optimizer.zero_grad(set_to_none=True)
        for rec in batch:
            clock.free(rec)   # the next batch replaces this one
    return out


def _place_rows(clock: Clock, spec: TrainingSpec, inventories: dict, make, prefix: str, *parts,
                kept=None) -> None:
    """Rows no later code changes -- `make()`: (rows from event 1, events taken) -- placed as one
    run, phases with `prefix`; made once for the specs with the same trainable tensors and
    weights and `parts` (`kept_for_tensors`; or `kept`: the optimizer's rows only read the
    trained tensors, `kept_for_trained`). The load and optimizer phases are some 10 000 records
    of an SDXL step that only those decide."""
    rows, length = (kept or kept_for_tensors)(spec, inventories, lambda: _as_rows(make()), *parts)
    clock.place(Shifted(rows, clock.now, prefix=prefix))
    clock.now += length


def _as_rows(made: tuple) -> tuple:
    rows, length = made
    return Rows(tuple(rows), op_names=frozenset({""})), length   # the load and optimizer phases name no op


def _load_rows(weights: list) -> tuple[list, int]:
    """Every weight on the card, loaded once and never freed (as `Clock.alloc` would record them)."""
    return [(cuda_rounded(t.nbytes), i, None, t.category, "load", t.name, "", False)
            for i, t in enumerate(weights, 1)], len(weights)


def _optimizer_rows(spec: TrainingSpec, inventories: dict, trained: dict, first_step: bool) -> tuple[list, int]:
    """The optimizer step before `zero_grad`, as `Clock.alloc` and `Clock.free` would record it:
    the states (made by the first step, kept), gradient clipping's scalars, the optimizer's
    transients wave by wave, EMA's update. Each wave's tensors are allocated, then freed in the
    same order."""
    state_size = ITEMSIZE[trainable_dtype(spec)]
    rows = []
    if first_step:
        rows = [(cuda_rounded(s.nbytes), i, None, Category.OPTIMIZER_STATES, "optimizer", "", "", False)
                for i, s in enumerate(device_states(spec, inventories, trained, state_size), 1)]
    now = len(rows)
    waves = [clip_scalars(sum(len(ts) for ts in trained.values()))]
    waves += step_transients(spec.optimizer, [(t.numel, state_size) for ts in trained.values() for t in ts])
    if spec.ema:
        # diffusers EMAModel.step: `s_param.sub_(one_minus_decay * (s_param - param))`, one
        # parameter at a time: two transients of the largest trained tensor at once.
        largest = max((t.numel for ts in trained.values() for t in ts), default=0)
        waves.append([largest * 4] * 2)
    temporaries = Category.TEMPORARIES
    for wave in waves:
        k = len(wave)
        rows += [(cuda_rounded(n), now + i, now + k + i, temporaries, "optimizer", "", "", False)
                 for i, n in enumerate(wave, 1)]
        now += 2 * k
    return rows, now


def _repeat_step(clock: Clock, start: int, end: int, first_record: int, last_record: int, phases_before: int,
                 grads: list, batch: list, prefix: str) -> tuple[list, list]:
    """Copy the records of events start..end (encode to backward of the first step) to now: what
    the first step frees after `end` is live at the end of the copy (the caller frees it).
    Records are appended in event order, so those are records[first_record:last_record]; runs
    placed whole (`record_log.Shifted`) are copied as runs, their handles as Records."""
    offset = clock.now + 1 - start
    wanted = {id(r) for r in grads} | {id(r) for r in batch}
    copy_of = {}
    for piece in clock.pieces(first_record, last_record):
        if not isinstance(piece, list):
            clock.place(piece.copied(offset, end, prefix, copy_of))
            continue
        names = {phase: prefix + phase for phase in {r.phase for r in piece}}
        copies = [Record(r.nbytes, r.alloc_at + offset,
                         None if r.free_at is None or r.free_at > end else r.free_at + offset,
                         r.category, names[r.phase], r.module, r.op, r.saved) for r in piece]
        clock.open.extend(copies)
        copy_of.update((id(r), copy) for r, copy in zip(piece, copies) if id(r) in wanted)
    for name, event in clock.phases[phases_before:]:
        if start <= event <= end + 1 and not name.endswith("optimizer"):
            clock.phases.append((prefix + name, event + offset))
    clock.now = end + offset
    return [copy_of[id(r)] for r in grads if id(r) in copy_of], [copy_of[id(r)] for r in batch if id(r) in copy_of]


def _one_step(spec, inventories, trained, resident, clock: Clock, prefix: str, out: StepTimeline,
              check=None) -> list:
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
        _inference(spec, "vae", "fp32" if vae_dtype(spec) == "float32" else "pure",
                   vae_env, clock, out, {"pixel_values": pixels})
    trained_tes = [c.name for c in model.text_encoders if c.name in trained]
    frozen_tes = [c.name for c in model.text_encoders if c.name not in trained and c.name in resident]
    ids = {}
    for name in trained_tes + frozen_tes:
        # token ids (int64) of the batch, alive for the whole step like the pixels
        ids[name] = clock.alloc(env["B"] * model.text_lengths[name] * 8, Category.INPUTS, prefix + "encode")
        batch_inputs.append(ids[name])
    for name in frozen_tes:
        _inference(spec, name, graph_variant(spec, False, autocast=False), env, clock, out,
                   {"input_ids": ids[name]})

    clock.phase(prefix + "forward")
    te_replays = []
    method_trains_te = spec.method.trains_denoiser
    for name in trained_tes:
        variant = graph_variant(spec, method_trains_te)
        if spec.method.value == "textual-inversion":
            variant += "-ti"
        elif method.output_keeps_input_dtype and variant == "amp-frozen":
            variant += "-keep-te"
        graph = _adapted_graph(spec, inventories, method, name, variant, env)
        rep = Replayer(graph,
                       ReplayOptions(trainable=parameter_filter(spec, inventories, name),
                                     gradient_checkpointing=False, phase_prefix=prefix,
                                     low_dtype=spec.precision.low_dtype), clock)
        rep.forward({"input_ids": ids[name]})
        te_replays.append(rep)
    variant = graph_variant(spec, spec.method.trains_denoiser)
    if method.output_keeps_input_dtype and variant == "amp-frozen":
        variant += f"-keep-{spec.lora_targets.value}"
    if spec.base_quant is not BaseQuant.NONE:
        variant += f"-{spec.base_quant.value}"

    def options() -> ReplayOptions:
        return ReplayOptions(trainable=parameter_filter(spec, inventories, denoiser),
                             inputs_require_grad=frozenset(_denoiser_rg_inputs(spec, trained_tes)),
                             gradient_checkpointing=spec.gradient_checkpointing,
                             phase_prefix=prefix, low_dtype=spec.precision.low_dtype)

    def replay_denoiser() -> Replayed:
        graph = _adapted_graph(spec, inventories, method, denoiser, variant, env)
        rep = Replayer(graph, options(), clock)
        rep.forward()
        if check is not None:
            check(clock.records)
        clock.phase(prefix + "backward")
        replayed = rep.backward()
        rep.finish()
        replayed.replayer = rep
        return replayed

    def replay_in_c(pins: tuple) -> _Window | None:
        """The same replay in C (`native_replay.py`) as a window, None where it does not run."""
        def checked(rows: Rows) -> None:
            # the forward's rows placed after the records so far, for the lower bound to read
            clock.place(Shifted(rows, clock.now))
            try:
                check(clock.records)
            finally:
                clock.runs.pop()

        graph = _adapted_graph(spec, inventories, method, denoiser, variant, env)
        made = native_replay.replay(graph, options(), None if check is None else checked)
        if made is None:
            return None
        return _Window(pins=pins, rows=made.rows, phases=((prefix + "backward", made.backward_at),),
                       length=made.length, unknown_ops=made.unknown_ops, saved_by_module=made.saved_by_module,
                       param_grads=made.param_grads, input_grads=made.input_grads, sizes=made.sizes)

    # the denoiser's forward and backward: decided by the spec's replayed fields and which text
    # encoders train (their outputs require grad); at another rank, the same replay resized
    key = _replay_key(spec, inventories, method, "denoiser", variant, tuple(trained_tes), prefix)
    sizes_key = _replay_key(spec, inventories, method, "denoiser", variant, tuple(trained_tes), prefix,
                            ignore=frozenset({"rank", "alpha"}))
    result = _replayed(clock, key, inventories, replay_denoiser, resize=(
        sizes_key, lambda: _adapted_graph(spec, inventories, method, denoiser, variant, env),
        spec.precision.low_dtype), in_c=replay_in_c)
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


def _inference(spec: TrainingSpec, component: str, variant: str, env: dict, clock: Clock,
               out: StepTimeline, inputs: dict) -> None:
    """A frozen component's forward without grad, on inputs the caller allocated (and keeps)."""
    def replay() -> Replayed:
        rep = Replayer(concretize(graph_for(spec, component, variant), env),
                       ReplayOptions(trainable=lambda name: False, phase_prefix="",
                                     low_dtype=spec.precision.low_dtype), clock)
        rep.forward(inputs)
        rep.finish(keep=list(inputs.values()))
        return rep.result

    # decided by the graph (model, component, variant, attention), its sizes and the 16-bit dtype
    # it runs in (bf16's convolutions borrow other cuDNN workspaces than fp16's)
    key = None if not REUSE else (_model_key(spec), component, variant, attention_name(spec),
                                  tuple(sorted(env.items())), tuple(inputs), spec.precision.low_dtype)
    out.unknown_ops |= _replayed(clock, key, None, replay).unknown_ops


# -- reuse across timelines ----------------------------------------------------------------------

REUSE = True     # keep and re-apply replays (tests switch it off to compare)

# Spec fields no replay reads: they decide the load and optimizer phases (weights, optimizer
# states and transients, EMA), whether the frozen encoders run at all, or the distributed rewrite
# that starts from this timeline (vramplan.distributed).
NOT_REPLAYED = frozenset({"optimizer", "momentum", "cache_latents", "cache_text_embeddings", "ema",
                          "gradient_accumulation_steps", "gpu", "num_gpus", "strategy", "fsdp_sharding",
                          "offload"})


class _Lru:
    def __init__(self, size: int):
        self.size = size
        self.items: OrderedDict = OrderedDict()

    def get(self, key):
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)


# An SDXL denoiser window is some 50 000 rows (about 8 MB), an adapted SDXL graph some tens of MB.
_WINDOWS = _Lru(12)
_RESIZABLE = _Lru(4)   # by key less the rank: the last window with its size log (`resize.py`)
# Eight, not four: a several-GPU search alternates between some 8 graphs (autocast and pure 16-bit
# for DeepSpeed, FSDP's widened adapters, three quantizations); with four it spliced SDXL's
# adapters afresh 10 times instead of 7, 0.1-0.2 s of an SDXL LoRA 2x8GB search, for 1-2 MB more
# peak memory (both measured with /usr/bin/time on this machine).
_GRAPHS = _Lru(8)
_SPLICED = _Lru(8)     # by host (the key less the rank): the last adapted graph, to resize


_HANDED_ON: list = []    # [(key, pins, StepTimeline)]: at most one, for the next build of its spec
# Several GPUs: the strategy's fields, which the step itself never reads; builds whose specs
# differ only there share their records (read-only: the rewrite copies them).
STRATEGY_FIELDS = frozenset({"gpu", "num_gpus", "strategy", "fsdp_sharding", "offload"})
_SHARED = _Lru(12)         # an SDXL step is some 57 000 records (about 6 MB)


_OF_SHARED = _Lru(64)      # what is read of a shared build alone (`kept_for_shared_timeline`): a
                           # bound's peaks, a ZeRO-3 fetch trace, FSDP unit spans (up to some 0.3 MB)


def _shared(key: tuple) -> tuple:
    """A timeline's key less the strategy's fields: what its shared build is kept under."""
    return (key[0], tuple(kv for kv in key[1] if kv[0] not in STRATEGY_FIELDS)) + key[2:]


def kept_for_shared_timeline(spec: TrainingSpec, inventories: dict, make, *parts):
    """`make()`, kept for the specs whose `build_timeline`s share one build (they differ only in
    the strategy's fields) and `parts`: what that build and `parts` decide (fit's bound of a
    strategy's device used, `vramplan.distributed.floor`). Read-only for callers."""
    key = _replay_key(spec, inventories, get_method(spec.method), "timeline", every_field=True)
    return _kept(_OF_SHARED, None if key is None else _shared(key) + parts, tuple(inventories.values()), make)


def clear_reuse() -> None:
    _OF_SHARED.items.clear()
    _WINDOWS.items.clear()
    _RESIZABLE.items.clear()
    _GRAPHS.items.clear()
    _SPLICED.items.clear()
    _TENSORS.items.clear()
    _SHARED.items.clear()
    _HANDED_ON.clear()
    native_replay.clear()


def _same(pins: tuple, others: tuple) -> bool:
    """The same objects, one by one (what a key holds by identity)."""
    return len(pins) == len(others) and all(a is b for a, b in zip(pins, others))


def _model_key(spec: TrainingSpec) -> tuple:
    model = spec.model
    return (model.key, getattr(model, "local_path", None), getattr(model, "base_model", None))


def _replay_key(spec: TrainingSpec, inventories: dict, method, *parts, ignore: frozenset = frozenset(),
                every_field: bool = False) -> tuple | None:
    """The spec's replayed fields (less `ignore`; or `every_field`), the model and its inventories
    (by identity: users check they are the same objects), and `parts`. A method seen through a
    wrapper (the FSDP rewrite widens what trains) adds its `reuse_key`, what it changes; None
    when nothing may be reused (a wrapper without one)."""
    if not REUSE:
        return None
    model = _model_key(spec)
    if method is not registered_method(spec.method):
        seen = getattr(method, "reuse_key", None)
        if seen is None:
            return None
        model = (model, seen)     # in the first part, which every key derived from this one keeps
    skip = frozenset() if every_field else NOT_REPLAYED | ignore
    fields = tuple((name, tuple(value) if isinstance(value, list) else value)
                   for name, value in spec.to_json().items() if name not in skip)
    return (model, fields, tuple((name, id(inv)) for name, inv in inventories.items())) + parts


# Spec fields the trained tensors and the weights never depend on (sizes of the step, how it runs).
NOT_WEIGHTS = frozenset({"optimizer", "momentum", "gradient_checkpointing", "gradient_accumulation_steps",
                         "batch_size", "resolution", "attention", "gpu", "num_gpus", "strategy",
                         "fsdp_sharding", "offload"})
_TENSORS = _Lru(64)   # a few kinds (tensors, states, counts) for each of fit's distinct weights


def tensors_key(spec: TrainingSpec, inventories: dict, method, *parts) -> tuple | None:
    """What the trainable tensors and the weights depend on (the spec less NOT_WEIGHTS, the model,
    the inventories), and `parts`; None when nothing may be reused (see `_replay_key`)."""
    key = _replay_key(spec, inventories, method, every_field=True)
    if key is None:
        return None
    return (key[0], tuple(kv for kv in key[1] if kv[0] not in NOT_WEIGHTS), key[2]) + parts


def _kept(cache: _Lru, key: tuple | None, pins: tuple, make):
    """`make()`, or what it made under `key` for the same pinned objects."""
    if key is None:
        return make()
    known = cache.get(key)
    if known is not None and _same(known[0], pins):
        return known[1]
    value = make()
    cache.put(key, (pins, value))
    return value


def kept_for_tensors(spec: TrainingSpec, inventories: dict, make, *parts):
    """`make()`, kept for the specs with the same trainable tensors and weights (`tensors_key`)
    and `parts`: what only they decide (the tensors themselves, optimizer states, parameter
    counts, the adapter file's size). Read-only for callers."""
    method = get_method(spec.method)
    return _kept(_TENSORS, tensors_key(spec, inventories, method, *parts), tuple(inventories.values()), make)


def step_tensors(spec: TrainingSpec, inventories: dict) -> tuple[dict, list]:
    """(the method's trainable tensors by component, the weights on the card): read-only, shared
    by the specs that differ only in how the step runs."""
    def make():
        trained = trained_tensors(spec, inventories)
        return trained, weight_tensors(spec, inventories, trained)

    return kept_for_tensors(spec, inventories, make, "tensors")


# Spec fields no method's trainable tensors read besides NOT_WEIGHTS: they are names and shapes,
# never dtypes, nor what else is on the card (tests/estimate/test_step.py checks every method).
NOT_TRAINED = NOT_WEIGHTS | {"precision", "base_quant", "cache_latents", "cache_text_embeddings", "ema"}


def kept_for_trained(spec: TrainingSpec, inventories: dict, make, *parts):
    """`make()`, kept for the specs with the same trainable tensors (the spec less NOT_TRAINED)
    and `parts`: what only the trained tensors and `parts` decide. Read-only for callers."""
    method = get_method(spec.method)
    key = tensors_key(spec, inventories, method)
    if key is not None:
        key = (key[0], tuple(kv for kv in key[1] if kv[0] not in NOT_TRAINED), key[2], "trained") + parts
    return _kept(_TENSORS, key, tuple(inventories.values()), make)


def trained_tensors(spec: TrainingSpec, inventories: dict) -> dict:
    """The method's trainable tensors by component (read-only), shared by fit's candidates that
    differ in precision, quantization, caching or EMA (some 20 distinct weights per SDXL search
    come down to its 3 ranks)."""
    return kept_for_trained(spec, inventories, lambda: get_method(spec.method).trainable_tensors(spec, inventories))


def parameter_filter(spec: TrainingSpec, inventories: dict, component: str):
    """The method's `parameter_filter` for `component`, kept per trained tensors: every method's
    reads only what `trainable_tensors` gives (a dict of names built afresh each time)."""
    method = get_method(spec.method)
    return kept_for_trained(spec, inventories, lambda: method.parameter_filter(spec, component, inventories),
                            "parameter filter", component)


def device_states(spec: TrainingSpec, inventories: dict, trained: dict, state_size: int) -> list:
    """The optimizer's states on the card (read-only): one optimizer over every trained tensor,
    component by component, so that what it shares (bitsandbytes' qmaps) is counted once.
    `trained`: the spec's `trained_tensors`."""
    def make():
        tensors = [t for ts in trained.values() for t in ts]
        states = optimizer_state_tensors(spec.optimizer, [t.shape for t in tensors], state_size, spec.momentum,
                                         zero_params=[t.zero_init for t in tensors])
        return [s for s in states if not s.on_host]

    return kept_for_trained(spec, inventories, make, "states", spec.optimizer, spec.momentum, state_size)


def _adapted_graph(spec: TrainingSpec, inventories: dict, method, component: str, variant: str, env: dict):
    """The component's recorded graph at these sizes, with the method's adapted layers spliced in
    (the same graph with checkpointing on or off). Replays only read it."""
    pins = tuple(inventories.values())
    # the last adapted graph of this host at any rank (and alpha, which follows it and no
    # template reads): another rank only resizes its adapters
    host_key = _replay_key(spec, inventories, method, component, variant, tuple(sorted(env.items())),
                           ignore=frozenset({"gradient_checkpointing", "rank", "alpha"}))

    def build():
        entries = method.wrapped_modules(spec, component, inventories)
        known = _SPLICED.get(host_key) if host_key is not None else None
        graph = None
        if known is not None and _same(known[0], pins):
            graph = readapted(known[1], spec, method, component, entries, variant)
        if graph is None:
            graph = adapted(concretize(graph_for(spec, component, variant), env), spec, method, component,
                            entries, variant)
        if host_key is not None:
            _SPLICED.put(host_key, (pins, graph))
        return graph

    key = _replay_key(spec, inventories, method, component, variant, tuple(sorted(env.items())),
                      ignore=frozenset({"gradient_checkpointing"}))
    return _kept(_GRAPHS, key, pins, build)


@dataclass(frozen=True)
class _Window:
    """What one replay did to the clock, relative to the event before it: its records as
    (nbytes, alloc_at, free_at or None, category, phase, module, op, saved) when it ended (those
    still live are freed later by the caller, through the result's handles), the phases it began,
    the events it took, and its result with rows in place of records. Re-applied, it is placed
    on the clock as one run (`record_log.Shifted`): Record objects only for the handles."""
    pins: tuple                  # the objects whose identity the key holds
    rows: Rows
    phases: tuple
    length: int
    unknown_ops: frozenset
    saved_by_module: tuple
    param_grads: tuple           # (parameter name, row)
    input_grads: tuple           # (input role, row)
    sizes: object = None         # resize.Sizes: where the rows' bytes came from, to resize them

    @property
    def handle_rows(self) -> list[int]:
        """The rows the step frees or changes after the replay (its result's records)."""
        return [i for _, i in self.param_grads + self.input_grads]

    @functools.cached_property
    def _handles(self) -> list[tuple]:
        """(row, its tuple) of each handle: read once, for every apply (an SDXL LoRA has some
        1 100, from rows kept as columns or resized from another window's)."""
        return [(i, self.rows.row(i)) for i in self.handle_rows]

    def apply(self, clock: Clock) -> Replayed:
        base = clock.now
        run = Shifted(self.rows, base)
        # run.record(i), for a run placed at `base` without a limit or prefix
        run.handles = {i: Record(n, a + base, None if f is None else f + base, c, p, m, o, s)
                       for i, (n, a, f, c, p, m, o, s) in self._handles}
        clock.place(run)
        clock.phases.extend((name, event + base) for name, event in self.phases)
        clock.now = base + self.length
        return Replayed(unknown_ops=set(self.unknown_ops), saved_by_module=dict(self.saved_by_module),
                        param_grads={name: run.handles[i] for name, i in self.param_grads},
                        input_grads={role: run.handles[i] for role, i in self.input_grads})


def _replayed(clock: Clock, key: tuple | None, inventories: dict | None, replay, resize: tuple | None = None,
              in_c=None) -> Replayed:
    """`replay()` on the clock, or what it did the last time under `key`, re-applied. `resize`:
    (the key less the sizes, a function giving this replay's graph, its 16-bit dtype): a
    replay under the first at other sizes, resized to this graph where it can be (`resize.py`).
    `in_c(pins)`: the same replay made in C as a window (`native_replay.py`), or None where it
    does not run (then `replay()`)."""
    if key is None:
        return _unlinked(replay())
    pins = tuple((inventories or {}).values())
    window = _WINDOWS.get(key)
    if window is not None and _same(window.pins, pins):
        return window.apply(clock)
    sizes_key = resize[0] if resize is not None else None
    window = _resized_window(resize, pins) if sizes_key is not None else None
    if window is None and in_c is not None:
        window = in_c(pins)
    if window is not None:
        _keep_window(key, sizes_key, window)
        return window.apply(clock)
    base, first, first_phase, open_run = clock.now, len(clock.open), len(clock.phases), clock.open
    earlier = list(clock.records.visible())       # what a replay could reach: the rest are rows
    before = [(r.free_at, r.category, r.saved) for r in earlier]
    result = replay()
    replayer = result.replayer
    _unlinked(result)
    records = clock.open[first:]
    row_of = {id(r): i for i, r in enumerate(records)}
    handles = list(result.param_grads.values()) + list(result.input_grads.values())
    if (clock.open is not open_run or any(id(r) not in row_of for r in handles) or len(clock.open) < first
            or any((r.free_at, r.category, r.saved) != b for r, b in zip(earlier, before))):
        return result   # it touched records it did not make: not a window to re-apply elsewhere
    rows = Rows.of(records, base)
    window = _Window(
        pins=pins, rows=rows, phases=tuple((name, event - base) for name, event in clock.phases[first_phase:]),
        length=clock.now - base, unknown_ops=frozenset(result.unknown_ops),
        saved_by_module=tuple(result.saved_by_module.items()),
        param_grads=tuple((name, row_of[id(r)]) for name, r in result.param_grads.items()),
        input_grads=tuple((role, row_of[id(r)]) for role, r in result.input_grads.items()),
        sizes=None if resize is None or replayer is None else sizes_of(replayer, records))
    _keep_window(key, sizes_key, window)
    # the replay's records become the window's run, as a re-applied one is: one shape for both
    del clock.open[first:]
    clock.place(Shifted(rows, base, handles={i: records[i] for i in window.handle_rows}))
    return result


def _keep_window(key: tuple, sizes_key: tuple | None, window: _Window) -> None:
    """Keep `window` for re-applying under `key`, and, with its size log, for resizing to other
    sizes under `sizes_key`."""
    _WINDOWS.put(key, window)
    if window.sizes is not None and sizes_key is not None:
        _RESIZABLE.put(sizes_key, window)


def _unlinked(result: Replayed) -> Replayed:
    """The result without its Replayer, whose `result` it is: that cycle would keep the step's
    records from reference counting, and the CLI freezes what fit's search leaves for the
    collector (`timeline.gc_paused(freeze=True)`)."""
    result.replayer = None
    return result


def _resized_window(resize: tuple, pins: tuple) -> _Window | None:
    """The last window replayed under `resize`'s key at other sizes, with its rows' bytes read
    off this replay's graph; None when there is none or it cannot be resized (then replay)."""
    sizes_key, graph, low_dtype = resize
    known = _RESIZABLE.get(sizes_key)
    if known is None or known.sizes is None or not _same(known.pins, pins):
        return None
    nbytes = resized_bytes(known.sizes, graph(), low_dtype)
    if nbytes is None:
        return None
    saved: dict = {}
    for module, row in known.sizes.saved_from:
        saved[module] = saved.get(module, 0) + nbytes[row]
    like = known.rows
    columns = like.columns()
    rows = ColumnRows(len(nbytes), None if columns is None else (array("q", nbytes),) + columns[1:],
                      make=lambda: tuple((n,) + row[1:] for n, row in zip(nbytes, like.rows)),
                      row=lambda i: (nbytes[i],) + like.row(i)[1:], op_names=like.op_names, allocs=like.allocs_of)
    return dataclasses.replace(known, rows=rows, saved_by_module=tuple(saved.items()))

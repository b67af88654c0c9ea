"""torch FSDP (FSDP1, as accelerate 1.x launches it) on one rank: the step timeline rewritten.

accelerate's `fsdp_version` defaults to 1 (`FullyShardedDataParallelPlugin.__post_init__`:
`int(os.environ.get("FSDP_VERSION", "1"))`), so this is torch/distributed/fsdp/_flat_param.py and
_runtime_utils.py of torch 2.13, with the options vramplan's emitted config sets
(`configs.py`): transformer-based auto wrap on the blocks of `units.py`, `use_orig_params=True`
(needed for adapters, whose frozen and trainable tensors share a FlatParameter),
`backward_prefetch=BACKWARD_PRE`, `forward_prefetch=False`, and, for --precision fp16/bf16,
accelerate's `MixedPrecision(param_dtype=reduce_dtype=buffer_dtype=<16-bit>)`.

Rules, each from the file named:
  * flat parameter (`FlatParamHandle._init_flat_param_and_metadata`): a unit's parameters are
    concatenated, each padded to start on 16 bytes of the *compute* dtype
    (`_get_aligned_numel`: 16 // itemsize elements, with use_orig_params), the total padded to a
    multiple of the world size; `shard()` keeps `numel / N` elements per rank in the parameter
    dtype and frees the rest. Resident: sum of the shards.
  * unshard (`unshard`, `_alloc_padded_unsharded_flat_param`): before a unit runs, the padded
    unsharded flat parameter is allocated in the compute dtype and all-gathered; with mixed
    precision `pre_unshard` first fills `_mp_shard` (the shard cast to 16 bits) and
    `post_unshard` frees it.
  * reshard after forward (`_post_forward_reshard`): FULL_SHARD and HYBRID_SHARD free it after
    the unit's forward, except the root ("Do not free the root's parameters in the post-forward
    ... they are immediately used for backward"); SHARD_GRAD_OP keeps every unit unsharded until
    its post-backward.
  * backward: the pre-backward hook unshards the unit again and, with BACKWARD_PRE, the next
    unit to run backward (`_prefetch_handle`): two units' unsharded parameters at once.
  * gradients: autograd computes a gradient per original parameter (views of the flat
    parameter); when the unit's last one is ready, the split's backward concatenates them into
    the unsharded flat gradient (compute dtype), the per-parameter ones are freed, and
    `_post_backward_hook` reshards the unit, reduce-scatters into `new_sharded_grad`
    (`torch.empty_like(chunk)`, numel / N), casts it to the parameter dtype when they differ
    (`_cast_grad_to_param_dtype`), keeps it as `_saved_grad_shard` and frees the unsharded
    gradient. With adapters the FlatParameter's gradient covers its frozen part too.
  * optimizer: states over the original parameters' local slices of the shard
    (use_orig_params: `_use_sharded_views`), in the parameter dtype.
  * CPU offload (`--offload params`, `CPUOffload(offload_params=True)`): the shard lives pinned on
    the host (`_local_shard.pin_memory()`), a pinned `_cpu_grad` of the shard's size receives
    the gradient, and the optimizer steps on the CPU: no resident shard, sharded gradient or
    state on the GPU; each unshard copies the shard to the GPU first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vramplan.distributed.rewrite import (Rewriter, StepWindows, WEIGHTS, made_afresh, optimizer_temporary,
                                         kept_by_identity, rounded, widen)
from vramplan.distributed.units import Unit, UnitIndex
from vramplan.estimate.optimizer import optimizer_state_tensors
from vramplan.estimate.optimizer_step import clip_scalars, step_transients
from vramplan.footprint import Category
from vramplan.spec import FsdpSharding, Offload, TrainingSpec

FSDP_ALIGNMENT_BYTES = 16   # torch/distributed/fsdp/_flat_param.py `_get_aligned_numel`: ALIGNMENT = 16


@dataclass
class FlatLayout:
    """One unit's FlatParameter: (name, offset, numel, trainable) per original parameter, and the
    padded total, a multiple of the world size."""

    unit: Unit
    entries: list = field(default_factory=list)
    padded_numel: int = 0
    world: int = 1

    @property
    def shard_numel(self) -> int:
        return self.padded_numel // self.world

    def local_slices(self, rank: int) -> list[tuple[str, int, bool]]:
        """(name, elements of it in `rank`'s shard, trainable) for every parameter."""
        lo, hi = rank * self.shard_numel, (rank + 1) * self.shard_numel
        out = []
        for name, offset, numel, trainable in self.entries:
            overlap = max(0, min(hi, offset + numel) - max(lo, offset))
            out.append((name, overlap, trainable))
        return out


def flat_layout(unit: Unit, world: int, compute_itemsize: int, trainable: set) -> FlatLayout:
    aligned = FSDP_ALIGNMENT_BYTES // compute_itemsize
    layout = FlatLayout(unit, world=world)
    total = 0
    for name, numel in unit.params:
        if total % aligned:
            total += aligned - total % aligned
        layout.entries.append((name, total, numel, name in trainable))
        total += numel
    if total % world:
        total += world - total % world
    layout.padded_numel = total
    return layout


@dataclass
class FsdpResult:
    layouts: list                   # FlatLayout per unit, every wrapped component
    shard_bytes: int                # resident sharded parameters (GPU, or host when offloaded)
    sharded_grad_bytes: int
    state_bytes: int
    largest_unit_bytes: int         # the largest unsharded unit in the compute dtype
    host_pinned_bytes: int = 0
    host_state_bytes: int = 0
    notes: list = field(default_factory=list)


def fsdp_rewrite(rw: Rewriter, spec: TrainingSpec, units: dict[str, list[Unit]], trainable: dict,
                 param_itemsize: int, compute_itemsize: int, world: int, rank: int = 0,
                 kept=made_afresh) -> FsdpResult:
    """Rewrite `rw` (the single-GPU timeline) into rank `rank`'s under FSDP.

    `units`: component -> its wrap units (root first); `trainable`: component -> set of trained
    parameter names (relative to the component). `kept(make, *parts)`: `make()`, or what it made
    for the same step records and `parts` (the units' spans, which only those records decide)."""
    sharding = spec.fsdp_sharding or FsdpSharding.FULL_SHARD
    offload = spec.offload is Offload.PARAMS
    mixed = compute_itemsize != param_itemsize
    index = _index(units)
    layouts = fsdp_layouts(units, trainable, world, compute_itemsize)
    roots = {id(us[0]) for us in units.values()}
    in_wrapped = wrapped_by(units)

    def category(unit: Unit) -> Category:
        return Category.TRAINABLE_WEIGHTS if unit.trainable_numel * 2 > unit.numel or \
            spec.method.trains_denoiser else Category.FROZEN_WEIGHTS

    # -- load: the wrapped components' tensors become one shard per unit ------------------------
    moved = moved_at_load(units)
    load_weights = rw.drop(lambda r: r.phase == "load" and moved(r.module), WEIGHTS,
                           key=("fsdp: moved at load", tuple(units)))
    load_at = min(load_weights, default=rw.after(0))
    shard_bytes = 0
    for comp, us in units.items():
        for u in us:
            nbytes = layouts[id(u)].shard_numel * param_itemsize
            if not offload:
                rw.add(nbytes, rw.after(load_at), None, category(u), "load", "fsdp_shard", u.full_path)
            shard_bytes += rounded(nbytes)
    if mixed:
        # parameters are already 16-bit views of the unsharded flat parameter: autocast keeps none
        rw.drop(lambda r: in_wrapped(r.module), (Category.AUTOCAST_CACHE,), key=("fsdp: wrapped", tuple(units)))

    result = FsdpResult(layouts=list(layouts.values()), shard_bytes=shard_bytes, sharded_grad_bytes=0,
                        state_bytes=0, largest_unit_bytes=max(rounded(l.padded_numel * compute_itemsize)
                                                               for l in layouts.values()))
    trained_units = _trained_units(units, layouts)
    pending: dict[str, list] = {}
    held: dict = {}
    for k, step in enumerate(rw.steps()):
        # with gradient accumulation the first of the two modelled steps is a no_sync micro-step
        sync = not (k == 0 and spec.gradient_accumulation_steps > 1)
        spans = kept(lambda: (_path_spans(rw.module_spans(step.forward), index, in_wrapped),
                              _path_spans(rw.module_spans(step.backward), index, in_wrapped)),
                     "fsdp spans", k, mixed, tuple(units))
        shards, root_at = _one_step(rw, step, spec, units, index, layouts, roots, in_wrapped, category,
                                    param_itemsize, compute_itemsize, sharding, offload, mixed, sync, held, spans)
        # zero_grad(set_to_none=True) clears only the original parameters' views; the
        # FlatParameter's `.grad` (the sharded gradient) goes at the root's next pre-forward
        # (_runtime_utils.py `_root_pre_forward` -> `_reset_flat_param_grad_info_if_needed`)
        for comp, at in root_at.items():
            for rec in pending.pop(comp, []):
                rec.free_at = at
        for comp, recs in shards.items():
            pending.setdefault(comp, []).extend(recs)
    result.sharded_grad_bytes = sum(rounded(layouts[id(u)].shard_numel * param_itemsize) for u in trained_units)
    result.state_bytes = _optimizer(rw, spec, layouts, trained_units, param_itemsize, rank, offload)
    if offload:
        result.host_pinned_bytes = 2 * shard_bytes        # _local_shard and _cpu_grad, both pinned
        result.host_state_bytes = result.state_bytes
        result.state_bytes = 0
        result.sharded_grad_bytes = 0
    return result


def fsdp_layouts(units: dict, trainable: dict, world: int, compute_itemsize: int) -> dict:
    """id(unit) -> its FlatLayout, every wrapped component's units."""
    return {id(u): flat_layout(u, world, compute_itemsize, trainable.get(comp, set()))
            for comp, us in units.items() for u in us}


def _trained_units(units: dict, layouts: dict) -> list:
    return [u for us in units.values() for u in us if layouts[id(u)].entries and
            any(t for *_, t in layouts[id(u)].entries)]


def wrapped_by(units: dict):
    """Is a record's module inside one of the wrapped components?"""
    components = tuple(units)
    return lambda module: module.split(".", 1)[0] in components


def moved_at_load(units: dict):
    """Which of the step's weights (by name: a load-phase record's module) become shards: every
    wrapped component's."""
    return wrapped_by(units)


def fsdp_resident(spec: TrainingSpec, units: dict, trainable: dict, param_itemsize: int,
                  compute_itemsize: int, world: int, rank: int = 0) -> tuple[int, int]:
    """(bytes the rewrite adds at load and never frees: the shards; the optimizer states it adds
    in the first step and never frees), as `fsdp_rewrite` lays them out: what fit's bound
    (`vramplan.distributed.floor`) counts without rewriting. Both 0 with the CPU offload."""
    if spec.offload is Offload.PARAMS:
        return 0, 0
    layouts = fsdp_layouts(units, trainable, world, compute_itemsize)
    shards = sum(rounded(layout.shard_numel * param_itemsize) for layout in layouts.values())
    states = _states(spec, layouts, _trained_units(units, layouts), param_itemsize, rank)[1]
    return shards, sum(rounded(s.nbytes) for s in states if not s.on_host)


_INDEXES: list = []      # [(units, UnitIndex)], the last few: a search asks with the same units


def _index(units: dict) -> UnitIndex:
    """The units' UnitIndex, whose memos serve every candidate with these units."""
    return kept_by_identity(_INDEXES, (units,), lambda: UnitIndex([u for us in units.values() for u in us]))


def _path_spans(modules: dict, index: UnitIndex, in_wrapped) -> dict[str, tuple[int, int]]:
    """unit path -> (first, last) scaled event of records inside the unit (nested units included),
    from each module's first and last (`Rewriter.module_spans`): a unit has many modules."""
    spans: dict[str, list[int]] = {}
    for module, (start, end) in modules.items():
        if not in_wrapped(module):
            continue
        for unit in index.enclosing(module):
            widen(spans, unit.full_path, start, end)
    return {path: (first, last) for path, (first, last) in spans.items()}


def _one_step(rw: Rewriter, step: StepWindows, spec, units, index: UnitIndex, layouts, roots, in_wrapped,
              category, param_itemsize, compute_itemsize, sharding, offload, mixed,
              sync: bool = True, held: dict | None = None, spans: tuple | None = None):
    """One step's unshards, reshards and gradient reductions. `sync` False is a micro-step under
    `no_sync()` (accelerate's `accumulate` with gradient accumulation): `_post_backward_hook`
    returns before reducing, so each unit keeps its unsharded gradient (`held`, by unit) into the
    next micro-step, which accumulates into it. `spans`: the units' forward and backward spans
    (`_path_spans`), when the caller has them."""
    held = {} if held is None else held
    by_id = {id(u): u for us in units.values() for u in us}
    by_path = {u.full_path: id(u) for u in by_id.values()}
    if spans is None:
        spans = (_path_spans(rw.module_spans(step.forward), index, in_wrapped),
                 _path_spans(rw.module_spans(step.backward), index, in_wrapped))
    spans_f, spans_b = ({by_path[path]: span for path, span in made.items()} for made in spans)
    full_bytes = {uid: layouts[uid].padded_numel * compute_itemsize for uid in by_id}
    shard_numel = {uid: layouts[uid].shard_numel for uid in by_id}
    phase_f, phase_b = step.prefix + "forward", step.prefix + "backward"
    live: dict[int, object] = {}

    def unshard(uid: int, at: int, phase: str) -> None:
        if mixed or offload:
            # pre_unshard: `_mp_shard` (16-bit copy of the shard; with offload, the H2D copy)
            mp = rw.add(shard_numel[uid] * compute_itemsize, at, None, Category.TEMPORARIES, phase,
                        "fsdp_mp_shard", by_id[uid].full_path)
            live[uid] = rw.add(full_bytes[uid], rw.after(at), None, category(by_id[uid]), phase,
                               "fsdp_unsharded", by_id[uid].full_path)
            mp.free_at = rw.after(at)
        else:
            live[uid] = rw.add(full_bytes[uid], at, None, category(by_id[uid]), phase, "fsdp_unsharded",
                               by_id[uid].full_path)

    def reshard(uid: int, at: int) -> None:
        rec = live.pop(uid, None)
        if rec is not None:
            rec.free_at = at

    # -- forward ---------------------------------------------------------------------------------
    order_f = sorted(spans_f, key=lambda uid: (spans_f[uid][0], by_id[uid].full_path.count(".")))
    frees = []
    root_unshard = {}
    for uid in order_f:
        first, last = spans_f[uid]
        at = rw.before(first)
        if uid in roots:
            root_unshard[uid] = at
        unshard(uid, at, phase_f)
        if uid not in roots and sharding is not FsdpSharding.SHARD_GRAD_OP:
            frees.append((uid, last))
    for uid, last in frees:
        reshard(uid, rw.after(last))

    # -- backward --------------------------------------------------------------------------------
    grads: dict[int, list] = {}
    for r in rw.of_categories((Category.GRADIENTS,), step.backward):
        if in_wrapped(r.module):
            owner = index.innermost(r.module)
            if owner is not None:
                grads.setdefault(id(owner), []).append(r)
    order_b = sorted(spans_b, key=lambda uid: (spans_b[uid][0], by_id[uid].full_path.count(".")))
    events = []
    for k, uid in enumerate(order_b):
        events.append((spans_b[uid][0], 0, k, uid))
        done = max((r.alloc_at for r in grads.get(uid, [])), default=spans_b[uid][1])
        events.append((done, 1, k, uid))
    events.sort()
    posted = set()
    shards: dict[str, list] = {}
    for event, kind, k, uid in events:
        if kind == 0:
            at = rw.before(event)
            if uid not in live:
                unshard(uid, at, phase_b)
            # BACKWARD_PRE: the next unit in backward order is all-gathered now too
            for nxt in order_b[k + 1:]:
                if nxt not in live and nxt not in posted:
                    unshard(nxt, rw.before(event), phase_b)
                    break
            continue
        posted.add(uid)
        unit_grads = grads.get(uid, [])
        if not unit_grads:
            reshard(uid, rw.after(event))
            continue
        if mixed:
            for r in unit_grads:    # gradients of 16-bit parameter views are 16-bit
                r.nbytes = rounded(r.nbytes * compute_itemsize // param_itemsize)
        flat = held.pop(uid, None)  # accumulated into in place when a no_sync step left one
        if flat is None:
            flat = rw.add(full_bytes[uid], rw.after(event), None, Category.GRADIENTS, phase_b,
                          "fsdp_unsharded_grad", by_id[uid].full_path)
        at = rw.after(event)
        for r in unit_grads:
            r.free_at = at
        if not sync:
            held[uid] = flat
            if sharding is not FsdpSharding.SHARD_GRAD_OP:   # `_should_free_in_backward`
                reshard(uid, rw.after(event))
            continue
        reshard(uid, rw.after(event))
        sharded = rw.add(shard_numel[uid] * compute_itemsize, rw.after(event), None, Category.GRADIENTS,
                         phase_b, "fsdp_sharded_grad", by_id[uid].full_path)
        if mixed:
            cast = rw.add(shard_numel[uid] * param_itemsize, rw.after(event), None, Category.GRADIENTS,
                          phase_b, "fsdp_sharded_grad", by_id[uid].full_path)
            sharded.free_at = rw.after(event)
            sharded = cast
        flat.free_at = rw.after(event)
        if offload:
            sharded.free_at = rw.after(event)     # copied into the pinned `_cpu_grad`
        else:
            shards.setdefault(by_id[uid].component, []).append(sharded)
    for uid in list(live):
        reshard(uid, rw.after(step.backward[1] - 1))
    root_at = {by_id[uid].component: root_unshard[uid] for uid in root_unshard}
    return shards, root_at


def _optimizer(rw: Rewriter, spec, layouts, trained_units, param_itemsize, rank, offload) -> int:
    """States over the local slices of the trained parameters; transients and clip scalars.

    A parameter with no element in this rank's shard gets no gradient view
    (`_use_sharded_grad_views` sets it to None), so neither an optimizer state nor a norm."""
    slices, states = _states(spec, layouts, trained_units, param_itemsize, rank)
    state_bytes = sum(rounded(s.nbytes) for s in states if not s.on_host)
    rw.drop(None, (Category.OPTIMIZER_STATES,))
    for step in rw.steps():
        start, end = step.optimizer
        phase = step.prefix + "optimizer"
        rw.drop(optimizer_temporary, (Category.TEMPORARIES,), (start, end), key=optimizer_temporary)
        if offload:
            continue                                   # the step runs on the CPU
        add_step(rw, spec, start, phase, states if not step.prefix else [], slices, param_itemsize)
    return state_bytes


def _states(spec, layouts, trained_units, param_itemsize, rank) -> tuple[list, list]:
    """(the local slices of the trained parameters, the optimizer's states over them)."""
    slices = []
    for u in trained_units:
        for name, local, trainable in layouts[id(u)].local_slices(rank):
            if trainable and local > 0:
                slices.append((local,))
    return slices, optimizer_state_tensors(spec.optimizer, slices, param_itemsize, spec.momentum)


def add_step(rw: Rewriter, spec, start: int, phase: str, states: list, slices: list, itemsize: int) -> None:
    """The optimizer phase as step.py lays it out: clip scalars, first-step states, the step's
    transients (e.g. AdamW foreach's exp_avg_sq sqrt), the EMA update's two temporaries."""
    at = rw.after(start)
    scalars = [rw.add(n, at, None, Category.TEMPORARIES, phase, "clip_grad_norm")
               for n in clip_scalars(len(slices))]
    done = rw.after(start)
    for rec in scalars:
        rec.free_at = done
    at = rw.after(start)
    for s in states:
        if not s.on_host:
            rw.add(s.nbytes, at, None, Category.OPTIMIZER_STATES, phase, "optimizer_state")
    waves = step_transients(spec.optimizer, [(n[0], itemsize) for n in slices])
    if spec.ema:
        largest = max((n[0] for n in slices), default=0) * 4
        waves.append([largest, largest])
    for wave in waves:
        at = rw.after(start)
        recs = [rw.add(n, at, None, Category.TEMPORARIES, phase, "optimizer_step") for n in wave]
        done = rw.after(start)
        for rec in recs:
            rec.free_at = done

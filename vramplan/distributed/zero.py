"""DeepSpeed ZeRO stages 1, 2 and 3 (DeepSpeed 0.19, as accelerate launches it) on one rank.

Under DeepSpeed accelerate runs no autocast (`Accelerator.__init__`: native_amp is off for
DistributedType.DEEPSPEED) and the engine casts the model to the config's 16-bit dtype
(`fp16.enabled` / `bf16.enabled`, set from --precision): the forward and backward are those of
a pure 16-bit model, so the timeline is the analytic tier's "pure" one. The optimizer keeps
fp32 master weights and its states on fp32 partitions: the ZeRO paper's 2Ψ (16-bit params) +
2Ψ (16-bit grads) + 12Ψ (fp32 master 4 + Adam momentum 4 + variance 4), divided by N where the
stage partitions it. What DeepSpeed allocates on top, from deepspeed/runtime/zero/:

stage_1_and_2.py (`DeepSpeedZeroOptimizer`):
  * `bit16_groups_flat`: the trained parameters flattened into one 16-bit buffer, padded to a
    multiple of `nccl_start_alignment_factor` (2) x world size; the parameters become views of it.
  * `single_partition_of_fp32_groups`: the fp32 master of this rank's partition (numel / N).
  * `setup_buckets`: with contiguous_gradients (default) an ipg bucket of `reduce_bucket_size`
    elements in the 16-bit dtype, two when `overlap_comm` (default off below stage 3).
  * stage 2 (`reduce_independent_p_g_buckets_and_remove_grads`): each gradient is copied into the
    bucket as soon as autograd produces it and the parameter's own storage is dropped; reduced
    partitions land in `grads_in_partition` (16-bit, numel / N). Stage 1 keeps full gradients.
  * `step`: `single_grad_partition = flat_grad_partition.to(fp32)` -- an fp32 copy of this rank's
    gradient partition while the optimizer steps (the "4_grads_32bit" of the estimator).
  * offload_optimizer=cpu: master, states and that fp32 gradient live on the CPU, pinned
    (`cpu_offload_pin_memory`), the step runs there (DeepSpeedCPUAdam); no gradient partition on
    the GPU.
stage3.py (`DeepSpeedZeroOptimizer_Stage3`) and partitioned_param_coordinator.py:
  * every parameter of the model is partitioned (`ds_tensor`, ceil(numel / N) elements); the
    trained ones are defragmented into one flat 16-bit buffer.
  * parameters are gathered per submodule just before it runs and released after it, except
    "persistent" ones (numel <= `stage3_param_persistence_threshold`, 1e5), which stay gathered
    once fetched. After the first step the trace is complete and two rules apply
    (`__params_to_release`, `fetch_sub_module`): a parameter is not released if it is used again
    within `stage3_max_reuse_distance` (1e9) elements of the trace -- in forward, the way back
    through backward -- and up to `stage3_prefetch_bucket_size` (5e7) elements of the modules
    that come next are gathered ahead, within `stage3_max_live_parameters` (1e9).
  * `grad_partitions_flat_buffer` (16-bit, numel / N, allocated at init) and one ipg bucket of
    `reduce_bucket_size` elements (allocated at init) receive the gradients, which autograd
    produces in full and the reduce hook drops after copying.
  * fp32 master partitions and an fp32 copy of the gradient partition during the step, as above.
  * offload_param=cpu keeps the 16-bit partitions on the CPU (pinned); offload_optimizer=cpu moves
    master, states and the gradient partition buffer there.

The numbers are DeepSpeed's defaults (deepspeed/runtime/zero/config.py), which vramplan's emitted
JSON writes out explicitly (`configs.py`): accelerate's "auto" for the bucket sizes needs
`model.config.hidden_size`, which diffusers models do not have.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

from vramplan.distributed.fsdp import add_step
from vramplan.distributed.rewrite import (Rewriter, WEIGHTS, kept_by_identity, made_afresh, optimizer_temporary,
                                         rounded, widen)
from vramplan.estimate.optimizer import optimizer_state_tensors
from vramplan.footprint import Category
from vramplan.models.inventory import Inventory, numel
from vramplan.spec import Offload, Strategy, TrainingSpec

NCCL_START_ALIGNMENT_FACTOR = 2   # stage_1_and_2.py: "4-byte alignment/sizeof(fp16) = 2"


@dataclass(frozen=True)
class ZeroConfig:
    """The zero_optimization values vramplan writes (DeepSpeed's own defaults)."""

    reduce_bucket_size: int = 500_000_000
    allgather_bucket_size: int = 500_000_000
    contiguous_gradients: bool = True
    prefetch_bucket_size: int = 50_000_000
    param_persistence_threshold: int = 100_000
    max_live_parameters: int = 1_000_000_000
    max_reuse_distance: int = 1_000_000_000
    sub_group_size: int = 1_000_000_000

    def overlap_comm(self, stage: int) -> bool:
        # config.py `overlap_comm_valid`: None -> True for stage 3 only
        return stage == 3


@dataclass
class ZeroResult:
    stage: int
    trainable_numel: int
    partition_numel: int            # this rank's share of the trained parameters
    param_bytes: int                # 16-bit parameters resident on the GPU
    grad_bytes: int                 # gradient partition / full gradients kept on the GPU
    master_bytes: int
    state_bytes: int
    bucket_bytes: int               # ipg reduce bucket(s)
    persistent_bytes: int = 0       # ZeRO-3 params that stay gathered
    host_pinned_bytes: int = 0
    host_state_bytes: int = 0
    notes: list = field(default_factory=list)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class ZeroSizes:
    """What the engine allocates for one rank, in elements and bytes: the rewrite adds these, and
    `resident_bytes` / `state_bytes` are what fit's bound (`vramplan.distributed.floor`) counts of
    them without rewriting."""

    stage: int
    offload_opt: bool
    offload_params: bool
    itemsize: int                   # the model's (16-bit, or fp32)
    padded: int                     # stages 1-2: the flat 16-bit buffer's elements
    partition: int                  # this rank's share of the trained parameters
    frozen: tuple                   # stage 3: (name, numel) of the component's frozen parameters
    world: int
    bucket: int                     # one ipg bucket, bytes
    bucket_count: int
    states: tuple                   # optimizer_state_tensors of the fp32 partition

    @property
    def partition_bytes(self) -> int:
        """Stage 3: the 16-bit partitions of every parameter of the component."""
        return rounded(self.partition * self.itemsize) + sum(
            rounded(-(-k // self.world) * self.itemsize) for _, k in self.frozen)

    @property
    def resident_bytes(self) -> int:
        """Bytes the rewrite adds at load and never frees."""
        if self.stage < 3:
            flat = rounded(self.padded * self.itemsize)
        else:
            flat = (0 if self.offload_params else self.partition_bytes) + rounded(self.bucket) + (
                0 if self.offload_opt else rounded(self.partition * self.itemsize))
        return flat + (0 if self.offload_opt else rounded(self.partition * 4))

    @property
    def states_on_device(self) -> int:
        """The states' bytes the optimizer keeps on its device: the GPU, or the host when offloaded."""
        return sum(rounded(s.nbytes) for s in self.states if not s.on_host)

    @property
    def state_bytes(self) -> int:
        """Optimizer states on the GPU, added in the first step and never freed."""
        return 0 if self.offload_opt else self.states_on_device


def zero_sizes(spec: TrainingSpec, component: str, inventory: Inventory, trained: list, model_itemsize: int,
               world: int, config: ZeroConfig = ZeroConfig()) -> ZeroSizes:
    stage = {Strategy.ZERO1: 1, Strategy.ZERO2: 2, Strategy.ZERO3: 3}[spec.strategy]
    trainable_numel = sum(t.numel for t in trained)
    padded = round_up(trainable_numel, NCCL_START_ALIGNMENT_FACTOR * world)
    if stage < 3:
        partition, frozen = padded // world, ()
    else:
        partition = sum(-(-t.numel // world) for t in trained)
        names = {t.name for t in trained}
        frozen = tuple((n, numel(s)) for n, s in inventory.params if n not in names)
    states = optimizer_state_tensors(spec.optimizer, [(partition,)], 4, spec.momentum)
    return ZeroSizes(stage, spec.offload in (Offload.OPTIMIZER, Offload.PARAMS), spec.offload is Offload.PARAMS,
                     model_itemsize, padded, partition, frozen, world, config.reduce_bucket_size * model_itemsize,
                     2 if (config.overlap_comm(stage) and stage < 3) else 1, tuple(states))


def moved_at_load(stage: int, component: str, trained_names: set):
    """Which of the step's weights (by name: a load-phase record's module) the engine takes over
    (into its flat buffer, or partitions): the trained parameters, or under stage 3 the whole
    component."""
    prefix = component + "."
    if stage < 3:
        return trained_names.__contains__
    return lambda name: name.startswith(prefix)


def zero_rewrite(rw: Rewriter, spec: TrainingSpec, component: str, inventory: Inventory,
                 trained: list, model_itemsize: int, world: int, config: ZeroConfig = ZeroConfig(),
                 kept=made_afresh) -> ZeroResult:
    """Rewrite the pure 16-bit (or fp32) single-GPU timeline into one rank's under ZeRO.

    `kept(make, *parts)`: `make()`, or what it made for the same step records and `parts` (ZeRO-3's
    fetch trace, which only the step's records and the trained tensors decide)."""
    sizes = zero_sizes(spec, component, inventory, trained, model_itemsize, world, config)
    stage, offload_opt, offload_params = sizes.stage, sizes.offload_opt, sizes.offload_params
    padded, partition = sizes.padded, sizes.partition
    prefix = component + "."
    result = ZeroResult(stage, sum(t.numel for t in trained), partition, 0, 0, 0, 0, 0)
    trained_names = {prefix + t.name for t in trained}

    # -- load ------------------------------------------------------------------------------------
    moved = moved_at_load(stage, component, trained_names)
    dropped = rw.drop(lambda r: r.phase == "load" and moved(r.module), WEIGHTS,
                      key=("zero: moved at load", component, frozenset(trained_names) if stage < 3 else None))
    at = min(dropped, default=rw.after(0))
    if stage < 3:
        rw.add(padded * model_itemsize, rw.after(at), None, Category.TRAINABLE_WEIGHTS, "load",
               "zero_flat_params", component)
        result.param_bytes = rounded(padded * model_itemsize) + rw.nbytes_of(
            lambda r: r.phase == "load" and r.module.startswith(prefix), WEIGHTS, key=("zero: loaded", prefix))
    else:
        if not offload_params:
            slot = rw.after(at)
            rw.add(partition * model_itemsize, slot, None, Category.TRAINABLE_WEIGHTS, "load",
                   "zero3_partitions", component)
            for name, k in sizes.frozen:
                rw.add(-(-k // world) * model_itemsize, slot, None, Category.FROZEN_WEIGHTS, "load",
                       "zero3_partitions", prefix + name)
            result.param_bytes = sizes.partition_bytes
        else:
            result.host_pinned_bytes += sizes.partition_bytes
    master = partition * 4
    if offload_opt:
        result.host_pinned_bytes += rounded(master)
    else:
        rw.add(master, rw.after(at), None, Category.MASTER_WEIGHTS, "load", "zero_fp32_partition", component)
        result.master_bytes = rounded(master)
    bucket_count, bucket = sizes.bucket_count, sizes.bucket
    if stage == 3:
        # ipg bucket and the gradient partition buffer are allocated when the optimizer is built
        rw.add(bucket, rw.after(at), None, Category.GRADIENTS, "load", "zero_ipg_bucket", component)
        if offload_opt:
            result.host_pinned_bytes += rounded(partition * model_itemsize)
        else:
            rw.add(partition * model_itemsize, rw.after(at), None, Category.GRADIENTS, "load",
                   "zero3_grad_partitions", component)
            result.grad_bytes = rounded(partition * model_itemsize)
    result.bucket_bytes = bucket_count * rounded(bucket)

    # -- steps -----------------------------------------------------------------------------------
    states = list(sizes.states)
    result.state_bytes = sizes.states_on_device
    if offload_opt:
        result.host_state_bytes = result.state_bytes
        result.host_pinned_bytes += rounded(partition * 4)        # the fp32 gradient, pinned
        result.state_bytes = 0
    rw.drop(None, (Category.OPTIMIZER_STATES,))
    persisted: set = set()
    for k, step in enumerate(rw.steps()):
        grads = [r for r in rw.of_categories((Category.GRADIENTS,), step.backward) if r.module.startswith(prefix)]
        first_grad = min((r.alloc_at for r in grads), default=step.backward[0])
        opt_start, opt_end = step.optimizer
        zero_grad = min((r.free_at for r in grads if r.free_at is not None), default=opt_end - 1)
        if stage >= 2:
            for r in grads:                       # copied into the ipg bucket, storage dropped
                r.free_at = rw.after(r.alloc_at)
        if stage < 3:
            buckets = [rw.add(bucket, rw.before(first_grad), None, Category.GRADIENTS, step.prefix + "backward",
                              "zero_ipg_bucket", component) for _ in range(bucket_count)]
            for b in buckets:
                b.free_at = zero_grad
            if stage == 2 and not offload_opt:
                part = rw.add(partition * model_itemsize, rw.after(first_grad), None, Category.GRADIENTS,
                              step.prefix + "backward", "zero_grads_in_partition", component)
                part.free_at = zero_grad
                result.grad_bytes = rounded(partition * model_itemsize)
            elif stage == 1:
                result.grad_bytes = sum(r.nbytes for r in grads)
        rw.drop(optimizer_temporary, (Category.TEMPORARIES,), (opt_start, opt_end), key=optimizer_temporary)
        if stage == 3:
            trace = kept(lambda: _stage3_trace(rw, step, component, inventory, trained, config), "zero3 trace",
                         k, component, config)
            _stage3_working_set(rw, step, k, trace, model_itemsize, config, result, persisted)
        if offload_opt:
            continue
        phase = step.prefix + "optimizer"
        fp32_grad = rw.add(partition * 4, rw.after(opt_start), None, Category.GRADIENTS, phase,
                           "zero_fp32_grad_partition", component)
        add_step(rw, spec, opt_start, phase, states if k == 0 else [], [(partition,)], 4)
        fp32_grad.free_at = rw.after(opt_start)
    return result


def _fetch_units(inventory: Inventory, trained: list, component: str) -> dict[str, list[int]]:
    """Submodule path (component-prefixed) -> numel of each parameter it owns directly."""
    units: dict[str, list[int]] = {}
    for m in inventory.modules:
        units.setdefault(f"{component}.{m.name}", []).extend(numel(s) for _, s in m.param_shapes)
    known = {n for n, _ in inventory.params}
    for t in trained:
        if t.name not in known:
            units.setdefault(f"{component}.{t.name.rsplit('.', 1)[0]}", []).append(t.numel)
    return units


@dataclass(frozen=True)
class _Trace:
    """One step's submodule fetches, in order (forward, then backward), as `_stage3_working_set`
    reads them: what the step's records and the model decide, the same for every ZeRO-3
    candidate of one shared step (kept with it, `zero_rewrite`'s `kept`)."""

    paths: tuple                    # the submodule each entry fetches for
    forward: tuple                  # entry is in the forward
    spans: tuple                    # (first, last) scaled event of the entry's records
    reach: tuple                    # reach[j]: the elements fetched by entries before j
    nearest: tuple                  # the next entry fetching the same submodule (None: none)
    fetching: tuple                 # the entries whose submodule has large parameters
    small: dict                     # submodule -> elements of its persistent parameters
    large: dict                     # submodule -> elements of the others
    trained_paths: frozenset


@dataclass(frozen=True)
class _Fetching:
    """What fetches for a record's module under ZeRO-3, made once per model and trained tensors:
    the submodules with parameters (`_fetch_units`), their persistent and other elements, and the
    module -> submodule map, filled as traces read modules."""

    units: dict
    small: dict
    large: dict
    trained_paths: frozenset
    unit_of: dict                   # record module -> the submodule that fetches for it ("" none)

    def unit(self, module: str) -> str:
        mod = self.unit_of.get(module)
        if mod is None:
            mod, units = module, self.units
            while mod and mod not in units:
                mod = mod.rpartition(".")[0]
            self.unit_of[module] = mod
        return mod


_FETCHING: list = []     # ((inventory, trained, component, threshold), _Fetching): the last few


def _fetching(inventory: Inventory, trained: list, component: str, threshold: int) -> _Fetching:
    """`_Fetching` for these objects (by identity: a search asks with the same ones)."""
    def make() -> _Fetching:
        units = _fetch_units(inventory, trained, component)
        return _Fetching(units, {p: sum(n for n in ns if n <= threshold) for p, ns in units.items()},
                         {p: sum(n for n in ns if n > threshold) for p, ns in units.items()},
                         frozenset(f"{component}.{t.name.rsplit('.', 1)[0]}" for t in trained), {})

    return kept_by_identity(_FETCHING, (inventory, trained, component, threshold), make)


def _stage3_trace(rw: Rewriter, step, component: str, inventory: Inventory, trained: list,
                  config: ZeroConfig) -> _Trace:
    fetching = _fetching(inventory, trained, component, config.param_persistence_threshold)
    units, large, unit = fetching.units, fetching.large, fetching.unit

    def spans(window):
        found: dict[str, list[int]] = {}
        for module, (first, last) in rw.module_spans(window).items():
            mod = unit(module)
            if mod:
                widen(found, mod, first, last)
        return found

    fwd, bwd = spans(step.forward), spans(step.backward)
    trace = [(p, True, tuple(fwd[p])) for p in sorted(fwd, key=lambda p: fwd[p][0])] + \
            [(p, False, tuple(bwd[p])) for p in sorted(bwd, key=lambda p: bwd[p][0])]
    paths = tuple(p for p, _, _ in trace)
    nearest: list = [None] * len(trace)
    seen: dict[str, int] = {}
    for i in range(len(trace) - 1, -1, -1):
        nearest[i] = seen.get(paths[i])
        seen[paths[i]] = i
    return _Trace(paths, tuple(f for _, f, _ in trace), tuple(s for _, _, s in trace),
                  tuple(itertools.accumulate((sum(units[p]) for p in paths), initial=0)), tuple(nearest),
                  tuple(j for j, p in enumerate(paths) if large[p]), fetching.small, large, fetching.trained_paths)


def _stage3_working_set(rw: Rewriter, step, k: int, trace: _Trace, itemsize: int, config: ZeroConfig,
                        result: ZeroResult, persisted: set) -> None:
    """Gathered parameters per submodule, with DeepSpeed's persistence, reuse and prefetch rules.

    `persisted`: submodules whose persistent parameters are already gathered (kept across steps)."""
    small, large, trained_paths, paths = trace.small, trace.large, trace.trained_paths, trace.paths
    if k == 0:
        result.persistent_bytes = sum(rounded(n * itemsize) for n in small.values() if n)
    complete = k > 0              # the trace is recorded during the first step
    live: dict[str, object] = {}
    live_large = [0]              # sum(large[p] for p in live), kept as `live` changes
    phase = {True: step.prefix + "forward", False: step.prefix + "backward"}
    trainable, frozen = Category.TRAINABLE_WEIGHTS, Category.FROZEN_WEIGHTS

    def gather(path: str, at: int, ph: str) -> None:
        if path not in persisted and small[path]:
            rw.add(small[path] * itemsize, at, None, trainable if path in trained_paths else frozen, ph,
                   "zero3_persistent", path)
            persisted.add(path)
        if path not in live and large[path]:
            live[path] = rw.add(large[path] * itemsize, at, None, trainable if path in trained_paths else frozen,
                                ph, "zero3_gathered", path)
            live_large[0] += large[path]
            waiting.gathered(path)

    reach, nearest = trace.reach, trace.nearest
    waiting = Waiting(paths, trace.fetching)
    positions = waiting.positions       # changed in place as submodules are gathered and released
    prefetch = complete and config.prefetch_bucket_size > 0
    before = rw.before
    for i, (path, forward, (first, last)) in enumerate(zip(paths, trace.forward, trace.spans)):
        at = before(first)
        if (small[path] and path not in persisted) or (large[path] and path not in live):
            gather(path, at, phase[forward])
        if prefetch and positions and positions[-1] > i:
            budget = min(config.prefetch_bucket_size, config.max_live_parameters - live_large[0])
            for nxt in prefetched(paths, positions, i, large, budget):
                gather(nxt, at, phase[forward])
        if path not in live:
            continue
        # kept when the next fetch of the same submodule comes before `max_reuse_distance`
        # elements of other fetches: walked one by one, what lies between i and that fetch
        keep = complete and nearest[i] is not None and reach[nearest[i]] - reach[i + 1] < config.max_reuse_distance
        if not keep:
            live.pop(path).free_at = rw.after(last)
            live_large[0] -= large[path]
            waiting.released(path)
    for rec in live.values():
        rec.free_at = rw.after(step.backward[1] - 1)


class Waiting:
    """The trace's entries that would gather large parameters not gathered now (`positions`,
    ascending), kept as submodules are gathered and released: a prefetch reads only those. In a
    complete trace most submodules stay gathered (their reuse distance is within
    `max_reuse_distance`), and walking past them at every entry made a ZeRO-3 step quadratic in
    its trace."""

    def __init__(self, paths: list, fetching: list):
        self.positions = list(fetching)
        self._of: dict[str, list[int]] = {}
        for j in fetching:
            self._of.setdefault(paths[j], []).append(j)

    def gathered(self, path: str) -> None:
        for j in self._of.get(path, ()):
            k = bisect.bisect_left(self.positions, j)
            if k < len(self.positions) and self.positions[k] == j:
                del self.positions[k]

    def released(self, path: str) -> None:
        for j in self._of.get(path, ()):
            k = bisect.bisect_left(self.positions, j)
            if k == len(self.positions) or self.positions[k] != j:
                self.positions.insert(k, j)


def prefetched(paths: list, waiting: list, i: int, large: dict, budget: int) -> list:
    """The submodules gathered ahead when trace entry `i` runs: the next ones in the trace
    (`paths`) with large parameters that are not gathered yet (`waiting`: their entries,
    ascending, `Waiting.positions`), until `budget` elements are."""
    out, taken, ahead = [], set(), 0
    for j in itertools.islice(waiting, bisect.bisect_right(waiting, i), None):
        if ahead >= budget:
            break
        path = paths[j]
        if path not in taken:
            out.append(path)
            taken.add(path)
            ahead += large[path]
    return out

"""`estimate_distributed(spec)`: one GPU's memory under the spec's strategy, and host RAM per node.

The result is an `Estimate` whose footprint is one rank's (rank 0; ranks differ only by a
shard's padding), so that the verdict, the headroom and the grid are per GPU, as `fit` and the
renderers expect; `Estimate.distributed` carries the rest (`DistributedPlan`): the strategy,
model states, what an offload saves, host RAM, and the published formulas to compare with.

`distributed_options(spec)` lists the strategy / offload combinations the spec's method can run,
in the order `fit` should try them (cheapest communication first).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from vramplan.distributed import formulas
from vramplan.distributed.ddp import ddp_rewrite
from vramplan.distributed.fsdp import fsdp_rewrite
from vramplan.distributed.host import HostRam
from vramplan.distributed.rewrite import Rewriter
from vramplan.distributed.units import wrap_units
from vramplan.distributed.zero import ZeroConfig, zero_rewrite
from vramplan.errors import UsageError
from vramplan.estimate.allocator import replay_allocator
from vramplan.estimate.core import component_parameters
from vramplan.estimate.result import Estimate
from vramplan.estimate.step import build_timeline, kept_for_shared_timeline, kept_for_trained, trained_tensors
from vramplan.footprint_build import add_workspaces, build_footprint
from vramplan.methods import get_method
from vramplan.models.inventory import load_model_inventories
from vramplan.precision import ITEMSIZE, trainable_dtype
from vramplan.spec import FsdpSharding, Offload, Precision, Strategy, TrainingSpec
from vramplan.timeline import analyse

PER_GPU_BATCH = ("batch size is per GPU, as accelerate counts it: {n} GPUs x {b} images x {a} "
                 "accumulation steps = {total} images per optimizer step; activations are one GPU's")


@dataclass(frozen=True)
class DistributedPlan:
    strategy: Strategy
    fsdp_sharding: FsdpSharding | None
    offload: Offload
    num_gpus: int
    gpus_per_node: int
    shard_group: int                       # ranks a shard is split over
    rank: int
    batch_size_per_gpu: int
    images_per_optimizer_step: int
    model_states: dict                     # name -> bytes per GPU (see `details`)
    single_gpu_peak_allocated_bytes: int   # the same spec on one GPU without a strategy
    host: HostRam
    offload_saved_gpu_bytes: int | None = None
    published: dict = field(default_factory=dict)
    rules: tuple = ()

    def per_gpu_json(self, estimate: Estimate) -> dict:
        fp = estimate.footprint
        return {
            "strategy": self.strategy.value,
            "fsdp_sharding": None if self.fsdp_sharding is None else self.fsdp_sharding.torch_name,
            "offload": self.offload.value,
            "num_gpus": self.num_gpus,
            "gpus_per_node": self.gpus_per_node,
            "shard_group_size": self.shard_group,
            "rank": self.rank,
            "batch_size_per_gpu": self.batch_size_per_gpu,
            "images_per_optimizer_step": self.images_per_optimizer_step,
            "peak_allocated_bytes": fp.peak_allocated_bytes,
            "peak_reserved_bytes": fp.peak_reserved_bytes,
            "device_used_bytes": fp.device_used_bytes,
            "categories": fp.categories_json(),
            "model_states": dict(self.model_states),
            "single_gpu_peak_allocated_bytes": self.single_gpu_peak_allocated_bytes,
            "offload_saved_gpu_bytes": self.offload_saved_gpu_bytes,
            "published": dict(self.published),
            "rules": list(self.rules),
        }


def graph_spec(spec: TrainingSpec) -> TrainingSpec:
    """The spec whose single-GPU step the strategy starts from: under DeepSpeed the engine casts
    the model to 16 bits and accelerate runs no autocast, i.e. the pure 16-bit step."""
    if spec.strategy is not None and spec.strategy.is_deepspeed and spec.precision.autocast:
        pure = Precision.FP16_PURE if spec.precision is Precision.FP16 else Precision.BF16_PURE
        return spec.replace(precision=pure)
    return spec


def single_gpu_spec(spec: TrainingSpec) -> TrainingSpec:
    return spec.replace(strategy=None, fsdp_sharding=None, offload=Offload.NONE, num_gpus=1)


class _UnitsTrainAsOne:
    """A method seen through FSDP1 with use_orig_params: the original parameters are views of
    their unit's FlatParameter, which requires grad when any of them does
    (`FlatParamHandle._use_unsharded_views`: `nn.Parameter(view, requires_grad=flat_param.
    requires_grad)`), so autograd saves inputs for, and computes gradients of, every parameter of
    a unit that holds an adapter. Everything but `parameter_filter` is the method's own."""

    def __init__(self, method, widened: dict):
        self._method, self._widened = method, widened
        # what the step's caches key a replay by beside the spec (`step._replay_key`): the
        # parameters widened (today decided by the spec and the inventories the key holds too)
        self.reuse_key = ("units train as one",) + tuple(
            (comp, tuple(sorted(names))) for comp, names in sorted(widened.items()))

    def __getattr__(self, name):
        return getattr(self._method, name)

    def parameter_filter(self, spec, component, inventories):
        own = self._method.parameter_filter(spec, component, inventories)
        names = self._widened.get(component, frozenset())
        prefix = component + "."
        return lambda name: own(name) or (name.startswith(prefix) and name[len(prefix):] in names)


@contextlib.contextmanager
def _method_seen_as(method):
    """Let the analytic step replay `method` in place of the registered one (FSDP adapters).

    The step builder looks the method up by name (`vramplan.estimate.step.get_method`); this swaps
    that lookup for the duration of one timeline build."""
    from vramplan.estimate import step as step_module

    original = step_module.get_method
    step_module.get_method = lambda m: method if m is method.method else original(m)
    try:
        yield
    finally:
        step_module.get_method = original


def step_seen_as(spec: TrainingSpec, units: dict | None):
    """The context the strategy's single-GPU step is built in (`graph_spec(spec)`): FSDP with
    adapters sees its method through `_UnitsTrainAsOne` over the units' widened names."""
    if spec.strategy is Strategy.FSDP and spec.method.is_adapter:
        widened = {comp: frozenset(name for u in us if u.trainable_numel for name, _ in u.params)
                   for comp, us in units.items()}
        return _method_seen_as(_UnitsTrainAsOne(get_method(spec.method), widened))
    return contextlib.nullcontext()


def fsdp_itemsizes(spec: TrainingSpec) -> tuple[int, int]:
    """(parameter, compute) element sizes under FSDP: the flat parameters in the trainable dtype,
    gathered in 16 bits under accelerate's MixedPrecision (--precision fp16/bf16)."""
    param = ITEMSIZE[trainable_dtype(spec)]
    return param, 2 if spec.precision.autocast else param


def zero_model_itemsize(spec: TrainingSpec) -> int:
    """The engine casts the model to the config's 16-bit dtype, unless the run is fp32."""
    return 4 if spec.precision is Precision.FP32 else 2


def _fsdp_units(spec: TrainingSpec, inventories: dict, trained: dict):
    """(component -> its wrap units, component -> trained names): kept for the candidates with
    the same trained tensors (read-only: a search asks for them once per FSDP candidate)."""
    return kept_for_trained(spec, inventories, lambda: _wrapped_units(inventories, trained), "fsdp units")


def _wrapped_units(inventories: dict, trained: dict):
    units, trainable = {}, {}
    for comp, tensors in trained.items():
        known = {n for n, _ in inventories[comp].params}
        names = {t.name for t in tensors}
        extra = [(t.name, t.numel, True) for t in tensors if t.name not in known]
        us = wrap_units(comp, inventories[comp], extra)
        for u in us:
            u.trainable_numel = sum(n for name, n in u.params if name in names)
        units[comp], trainable[comp] = us, names
    return units, trainable


def per_gpu_records(spec: TrainingSpec, inventories: dict, rank: int = 0):
    """(records, phases, model_states, host, rules) of one rank under `spec.strategy`."""
    trained = trained_tensors(spec, inventories)       # kept for fit's candidates (read-only)
    units = trainable = None
    if spec.strategy is Strategy.FSDP:
        units, trainable = _fsdp_units(spec, inventories, trained)
    with step_seen_as(spec, units):
        timeline = build_timeline(graph_spec(spec), inventories)
    rw = Rewriter(timeline.records, timeline.clock.phases, timeline.clock.now)

    def kept(make, *parts):
        """What a rewrite reads of the step's records alone, kept with the shared step (keyed as
        the build is: FSDP with adapters sees its method through the wrapper)."""
        with step_seen_as(spec, units):
            return kept_for_shared_timeline(graph_spec(spec), inventories, make, *parts)

    components = tuple(trained)
    world = spec.num_gpus
    gpus_per_node = spec.num_gpus
    param_itemsize = ITEMSIZE[trainable_dtype(spec)]
    rules = []
    host = HostRam(gpus_per_node=gpus_per_node)
    strategy = spec.strategy
    if strategy is Strategy.DDP:
        ddp = ddp_rewrite(rw, components, param_itemsize)
        states = {"ddp_gradient_buckets": ddp.bucket_bytes, "ddp_bucket_count": ddp.bucket_count,
                  "ddp_broadcast_bucket": ddp.broadcast_bytes}
        rules.append("DDP: weights, gradients and optimizer states replicated; the Reducer's flat "
                     "gradient buckets (25 MiB, first 1 MiB, after one bucket of everything in the "
                     "first step) hold a second copy of the gradients (gradient_as_bucket_view=False): "
                     "torch/nn/parallel/distributed.py, torch/csrc/distributed/c10d/reducer.cpp")
    elif strategy is Strategy.FSDP:
        sharding = spec.fsdp_sharding or FsdpSharding.FULL_SHARD
        compute_itemsize = fsdp_itemsizes(spec)[1]
        fsdp = fsdp_rewrite(rw, spec, units, trainable, param_itemsize, compute_itemsize, world, rank, kept=kept)
        states = {"sharded_parameters": fsdp.shard_bytes, "sharded_gradients": fsdp.sharded_grad_bytes,
                  "optimizer_states": fsdp.state_bytes, "largest_unsharded_unit": fsdp.largest_unit_bytes,
                  "units": sum(len(us) for us in units.values())}
        host = HostRam(fsdp.host_pinned_bytes, fsdp.host_state_bytes, gpus_per_node)
        rules.append(f"FSDP1 {sharding.torch_name}: flat parameters sharded 1/{world} per unit "
                     f"(transformer-based wrap on the blocks), each unit all-gathered in "
                     f"{'16 bits' if compute_itemsize == 2 else 'fp32'} while it runs, the next one "
                     f"prefetched in backward (BACKWARD_PRE); gradients reduce-scattered to 1/{world}: "
                     f"torch/distributed/fsdp/_flat_param.py, _runtime_utils.py")
        if spec.gradient_accumulation_steps > 1:
            rules.append("FSDP1 with gradient accumulation: accelerate's accumulate() runs the "
                         "micro-steps under no_sync(), where each unit keeps its unsharded gradient "
                         "(compute dtype) until the synchronizing step (_post_backward_hook returns "
                         "before the reduce-scatter)")
        if spec.method.is_adapter:
            rules.append("FSDP1 with adapters: frozen and trainable tensors share each FlatParameter "
                         "(use_orig_params=True), so the frozen base is stored and sharded in the "
                         "trainable dtype, and in every unit holding an adapter the frozen weights "
                         "get gradients too (their views require grad): activations and gradients "
                         "as if the whole unit trained")
    else:
        if len(components) != 1:
            raise UsageError("DeepSpeed runs one model per accelerate run")
        comp = components[0]
        model_itemsize = zero_model_itemsize(spec)
        zero = zero_rewrite(rw, spec, comp, inventories[comp], trained[comp], model_itemsize, world, kept=kept)
        states = {"parameters": zero.param_bytes, "gradients": zero.grad_bytes,
                  "fp32_master_weights": zero.master_bytes, "optimizer_states": zero.state_bytes,
                  "ipg_buckets": zero.bucket_bytes}
        if zero.stage == 3:
            states["persistent_parameters"] = zero.persistent_bytes
        host = HostRam(zero.host_pinned_bytes, zero.host_state_bytes, gpus_per_node)
        rules.append(f"DeepSpeed ZeRO-{zero.stage}: the model in {'fp32' if model_itemsize == 4 else '16 bits'} "
                     f"without autocast, fp32 master weights and optimizer states on a 1/{world} partition"
                     + (", gradients partitioned" if zero.stage >= 2 else ", full gradients")
                     + (", parameters partitioned and gathered per submodule" if zero.stage == 3 else "")
                     + f"; ipg bucket of {ZeroConfig().reduce_bucket_size:.0e} elements: "
                       f"deepspeed/runtime/zero/stage_1_and_2.py, stage3.py")
    return rw, states, host, rules


def estimate_distributed(spec: TrainingSpec, rank: int = 0) -> Estimate:
    if spec.strategy is None:
        raise UsageError("estimate_distributed needs a strategy (--gpus NxCARD or --strategy)")
    inventories = load_model_inventories(spec.model)
    method = get_method(spec.method)
    rw, states, host, rules = per_gpu_records(spec, inventories, rank)
    footprint, analysis, notes = build_footprint(rw.records, rw.phases, spec.gpu, "estimate",
                                                 spec.gradient_checkpointing)
    single = build_timeline(single_gpu_spec(spec), inventories)
    add_workspaces(single.records, single.clock.phases, spec.gpu, spec.gradient_checkpointing)
    # counted as the one-GPU estimate counts it: whole blocks, as max_memory_allocated does (the
    # allocator's peak is never below the tensors', each block holding one rounded-up tensor)
    single_peak = replay_allocator(single.records).peak_allocated
    saved = None
    if spec.offload is not Offload.NONE:
        plain, *_ = per_gpu_records(spec.replace(offload=Offload.NONE), inventories, rank)
        add_workspaces(plain.records, plain.phases, spec.gpu, spec.gradient_checkpointing)
        saved = analyse(plain.records, plain.phases).peak_bytes - analysis.peak_bytes
    trained = sum(t.numel for ts in method.trainable_tensors(spec, inventories).values() for t in ts)
    published = _published(spec, inventories, trained)
    plan = DistributedPlan(
        strategy=spec.strategy, fsdp_sharding=spec.fsdp_sharding, offload=spec.offload,
        num_gpus=spec.num_gpus, gpus_per_node=spec.num_gpus, shard_group=spec.num_gpus, rank=rank,
        batch_size_per_gpu=spec.batch_size,
        images_per_optimizer_step=spec.images_per_step * spec.num_gpus * spec.gradient_accumulation_steps,
        model_states=states, single_gpu_peak_allocated_bytes=single_peak, host=host,
        offload_saved_gpu_bytes=saved, published=published, rules=tuple(rules))
    notes = [PER_GPU_BATCH.format(n=spec.num_gpus, b=spec.images_per_step, a=spec.gradient_accumulation_steps,
                                  total=plan.images_per_optimizer_step)] + list(rules) + notes
    if spec.fsdp_sharding is FsdpSharding.HYBRID_SHARD:
        notes.append("HYBRID_SHARD on one node shards over its GPUs exactly as FULL_SHARD does")
    return Estimate(spec=spec, parameters=component_parameters(spec, inventories), footprint=footprint,
                    adapter_file_bytes=method.adapter_file_bytes(spec, inventories), notes=tuple(notes),
                    distributed=plan)


def _published(spec: TrainingSpec, inventories: dict, trained: int) -> dict:
    """The engines' own model-state figures for this many trained parameters (no activations)."""
    n = spec.num_gpus
    out = {"trained_parameters": trained,
           "zero_paper_mixed_adam_bytes": {f"stage{k}": int(formulas.zero_paper_bytes(trained, k, n))
                                           for k in range(4)}}
    offload_opt = spec.offload is not Offload.NONE
    cpu, gpu = formulas.deepspeed_zero2(trained, n, 1, cpu_offload=offload_opt)
    out["deepspeed_zero2_estimate"] = {"gpu_bytes": gpu, "cpu_bytes_per_node": cpu}
    trained_components = get_method(spec.method).trainable_tensors(spec, inventories)
    largest = max((m.params for c in trained_components if c in inventories for m in inventories[c].modules),
                  default=0)
    cpu, gpu, _ = formulas.deepspeed_zero3(trained, largest, n, 1, cpu_offload=offload_opt,
                                           cpu_offload_params=spec.offload is Offload.PARAMS)
    out["deepspeed_zero3_estimate"] = {"gpu_bytes": gpu, "cpu_bytes_per_node": cpu, "largest_layer_params": largest}
    return out


@dataclass(frozen=True)
class Option:
    """One way to spread a spec over its GPUs, for `fit` to try."""

    strategy: Strategy
    offload: Offload = Offload.NONE
    fsdp_sharding: FsdpSharding | None = None

    def apply(self, spec: TrainingSpec) -> TrainingSpec:
        """`spec` with this option, validated again (raises UsageError if the method cannot)."""
        from vramplan.spec import spec_from_json

        data = {k: v for k, v in spec.to_json().items() if v is not None}
        data.update(strategy=self.strategy.value, offload=self.offload.value)
        data.pop("fsdp_sharding", None)
        if self.fsdp_sharding is not None:
            data["fsdp_sharding"] = self.fsdp_sharding.value
        return spec_from_json(data)


# Least communication and host traffic first: what fit tries when one card is not enough.
OPTIONS = (
    Option(Strategy.DDP),
    Option(Strategy.ZERO1),
    Option(Strategy.ZERO2),
    Option(Strategy.FSDP, fsdp_sharding=FsdpSharding.SHARD_GRAD_OP),
    Option(Strategy.FSDP, fsdp_sharding=FsdpSharding.FULL_SHARD),
    Option(Strategy.ZERO3),
    Option(Strategy.ZERO2, Offload.OPTIMIZER),
    Option(Strategy.ZERO3, Offload.OPTIMIZER),
    Option(Strategy.FSDP, Offload.PARAMS, FsdpSharding.FULL_SHARD),
    Option(Strategy.ZERO3, Offload.PARAMS),
)


def distributed_options(spec: TrainingSpec) -> list[Option]:
    """The options the spec's method and settings allow, in `OPTIONS` order; what the user fixed
    (--strategy, --offload, --fsdp-sharding) is kept."""
    out = []
    for option in OPTIONS:
        if "strategy" in spec.given and option.strategy is not spec.strategy:
            continue
        if "offload" in spec.given and option.offload is not spec.offload:
            continue
        if "fsdp_sharding" in spec.given and option.fsdp_sharding not in (None, spec.fsdp_sharding):
            continue
        try:
            option.apply(spec)
        except UsageError:
            continue
        out.append(option)
    return out

"""A real step under torch FSDP on CPU processes (gloo), measured per rank: the check of `fsdp.py`.

Each rank builds the shared training step (`vramplan.step.build.build_step`, device "cpu"),
wraps its trained components in FSDP1 exactly as accelerate does for vramplan's emitted config
(`fsdp_kwargs`), rebuilds the optimizer over the wrapped parameters, and runs two steps under the
simulator's `MemoryTracker` with `trace_step`, as `vramplan profile --device cpu` does.

One addition to the tracker: FSDP allocates and frees its unsharded flat parameters by resizing a
storage in place (torch/distributed/utils.py `_alloc_storage` / `_free_storage`, called from
torch/distributed/fsdp/_flat_param.py), which no dispatched op reports. `fsdp_storage_tracking`
wraps those two functions, as `_flat_param` imported them, to record the allocation and the free.

Imports torch: for tests and profiling only, never on the estimate path.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from vramplan.distributed.units import WRAP_CLASSES


def fsdp_kwargs(spec, module: torch.nn.Module, device: str = "cuda") -> dict:
    """The FSDP1 constructor arguments accelerate passes for vramplan's config (accelerate/utils/
    fsdp_utils.py and Accelerator.prepare_model): sharding strategy, transformer-based auto wrap
    on the named block classes, BACKWARD_PRE, use_orig_params, mixed precision from --precision."""
    from torch.distributed.fsdp import BackwardPrefetch, CPUOffload, MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    names = {name for name, _ in WRAP_CLASSES.get(type(module).__name__, ())}
    classes = {type(m) for m in module.modules() if type(m).__name__ in names}
    low = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(spec.precision.low_dtype)
    mixed = MixedPrecision(param_dtype=low, reduce_dtype=low, buffer_dtype=low) \
        if spec.precision.autocast else None
    sharding = spec.fsdp_sharding.torch_name if spec.fsdp_sharding is not None else "FULL_SHARD"
    return dict(
        sharding_strategy=ShardingStrategy[sharding],
        auto_wrap_policy=functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=classes),
        backward_prefetch=BackwardPrefetch.BACKWARD_PRE, forward_prefetch=False,
        # sync_module_states broadcasts rank 0's weights at init; FSDP1 refuses it for CPU modules,
        # and every rank builds the same weights from the same seed anyway
        use_orig_params=True, sync_module_states=device != "cpu", limit_all_gathers=True,
        mixed_precision=mixed, cpu_offload=CPUOffload(offload_params=spec.offload.value == "params"),
    )


def wrap_step(step, spec) -> None:
    """Wrap the step's trained components in FSDP and rebuild its optimizer over them."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from vramplan.step.build import trainable_parameters
    from vramplan.step.optimizers import build_optimizer

    from vramplan.precision import trainable_dtype
    from vramplan.simulate.variants import DTYPES

    for name, module in list(step.models.items()):
        if any(p.requires_grad for p in module.parameters()):
            # a FlatParameter holds one dtype: frozen base and adapters share the trainable one
            module.to(DTYPES[trainable_dtype(spec)])
            # device_id "cpu": FSDP1 otherwise refuses to run without an accelerator
            # (_init_utils.py `_init_device_handle`); on a GPU accelerate passes the local device
            step.models[name] = FSDP(module, device_id=torch.device(step.torch_device),
                                     **fsdp_kwargs(spec, module, step.torch_device))
    step.trainable = trainable_parameters(step.models)
    step.optimizer = build_optimizer(spec, step.trainable, "cpu", None)


@contextlib.contextmanager
def fsdp_storage_tracking():
    """Record FSDP's in-place storage allocations in the active MemoryTracker."""
    from torch.distributed.fsdp import _flat_param
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    from vramplan.simulate.tracker import MemoryTracker

    original_alloc, original_free = _flat_param._alloc_storage, _flat_param._free_storage

    def tracker():
        mode = _get_current_dispatch_mode()
        return mode if isinstance(mode, MemoryTracker) else None

    def forget(mode, tensor) -> None:
        storage = tensor.untyped_storage()
        sid = mode._by_storage.get(id(storage))
        if sid is not None:
            mode._free(id(storage), sid)

    def alloc(tensor, size):
        mode = tracker()
        before = tensor.untyped_storage().nbytes()
        original_alloc(tensor, size)
        if mode is not None and tensor.untyped_storage().nbytes() != before:
            forget(mode, tensor)              # a zero-size record of the freed storage, if any
            mode.track(tensor, op="fsdp_unshard")

    def free(tensor):
        mode = tracker()
        if mode is not None:
            forget(mode, tensor)
        original_free(tensor)

    _flat_param._alloc_storage, _flat_param._free_storage = alloc, free
    try:
        yield
    finally:
        _flat_param._alloc_storage, _flat_param._free_storage = original_alloc, original_free


def measure_rank(rank: int, world: int, spec_json: dict, port: int, out_dir: str) -> None:
    """One process of the measurement: write rank's peak and composition to out_dir/rank<k>.json."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from vramplan.simulate.autocast_policy import cuda_autocast_policy
        from vramplan.simulate.run import _records, trace_step
        from vramplan.spec import spec_from_json
        from vramplan.step.build import build_step
        from vramplan.timeline import analyse

        spec = spec_from_json(spec_json)
        torch.manual_seed(0)
        with cuda_autocast_policy():
            step = build_step(spec.replace(strategy=None, num_gpus=1, fsdp_sharding=None), "cpu")
            wrap_step(step, spec)
            with fsdp_storage_tracking():
                tracker = trace_step(step, 2)
        records, phases = _records(tracker)
        analysis = analyse(records, phases)
        adam_steps = sum(1 for state in step.optimizer.state.values() for key, value in state.items()
                         if key == "step" and isinstance(value, torch.Tensor))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
            "rank": rank, "peak_bytes": analysis.peak_bytes, "peak_phase": analysis.peak_phase,
            "composition": {c.value: n for c, n in analysis.composition.items()},
            "phases": {name: peak for name, peak, _ in analysis.phase_peaks},
            "optimizer_step_scalars": adam_steps,
        }))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_fsdp(spec, world: int, out_dir: str | Path) -> list[dict]:
    """Run `world` CPU processes (gloo) of the spec's step under FSDP; per-rank results."""
    import torch.multiprocessing as mp

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mp.spawn(measure_rank, args=(world, spec.to_json(), free_port(), str(out_dir)), nprocs=world, join=True)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]

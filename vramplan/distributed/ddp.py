"""torch DistributedDataParallel on one rank: everything replicated, plus the Reducer's buckets.

accelerate wraps each prepared model in `DistributedDataParallel(model, device_ids=[...],
**kwargs)`, where kwargs holds only what a `DistributedDataParallelKwargs` handler changed from
its defaults (`to_kwargs()`), so torch's defaults apply: bucket_cap_mb None (25 MiB),
find_unused_parameters False, gradient_as_bucket_view False, static_graph False.

What that allocates, from torch 2.13's sources:
  * buckets (torch/nn/parallel/distributed.py `_BucketCapacityConfig.compute_bucket_size_limits`:
    "When static_graph or not finding unused params, disable initial bucketing by using maxsize
    (put all params in one bucket initially)"): at construction the Reducer
    (torch/csrc/distributed/c10d/reducer.cpp `Reducer::initialize_buckets`) allocates one flat
    `bucket.gradients = at::empty({bucketSize}, options)` per bucket, in the parameters' dtype,
    for every parameter that requires grad: one bucket of all of them. After the first
    iteration `rebuild_buckets()` (called from DDP's pre-forward) re-assigns them in the order
    gradients became ready, with limits [1 MiB (`dist._DEFAULT_FIRST_BUCKET_BYTES`), 25 MiB]:
    `initialize_buckets` starts with `buckets_.clear()`, freeing the old flat tensor before the
    new ones are allocated. With `gradient_as_bucket_view=False` (`mark_variable_ready_dense`:
    `at::mul_out(bucket_view, grad, wrapped)`) each `param.grad` is copied into its bucket view
    and stays allocated as well: the gradients are held twice.
  * construction also broadcasts rank 0's parameters and buffers
    (`_sync_module_states` -> `_broadcast_coalesced`, `broadcast_bucket_size = 250 * 1024 * 1024`):
    one flattened bucket of at most about 250 MiB at a time, freed before training starts.
Everything else (weights, gradients, optimizer states, activations for the per-GPU batch) is the
single-GPU step's.
"""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.distributed.rewrite import Rewriter, WEIGHTS, rounded
from vramplan.footprint import Category
from vramplan.units import MIB

FIRST_BUCKET_BYTES = 1 * MIB          # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
BUCKET_CAP_BYTES = 25 * MIB           # torch/nn/parallel/distributed.py _DEFAULT_BUCKET_CAP_MB
BROADCAST_BUCKET_BYTES = 250 * MIB    # DistributedDataParallel.broadcast_bucket_size


@dataclass
class DdpResult:
    bucket_bytes: int               # all gradient buckets (after the rebuild)
    bucket_count: int
    broadcast_bytes: int            # the largest bucket of the construction-time broadcast


def assign_buckets(sizes: list[int], limits: list[int]) -> list[int]:
    """`dist._compute_bucket_assignment_by_size` for one dtype: a bucket closes once it reaches
    its limit (the first limit, then the next, the last repeating). Returns bucket sizes."""
    buckets, current, k = [], 0, 0
    for size in sizes:
        current += size
        if current >= limits[min(k, len(limits) - 1)]:
            buckets.append(current)
            current, k = 0, k + 1
    if current:
        buckets.append(current)
    return buckets


def ddp_rewrite(rw: Rewriter, components: tuple[str, ...], grad_itemsize: int) -> DdpResult:
    """Add the Reducer's buckets and the construction broadcast to the single-GPU timeline."""
    def wrapped(module: str) -> bool:
        return module.split(".", 1)[0] in components

    steps = rw.steps()
    first = steps[0]
    grads = sorted((r for r in rw.of_categories((Category.GRADIENTS,), first.backward) if wrapped(r.module)),
                   key=lambda r: r.alloc_at)
    grad_bytes = [r.nbytes for r in grads]   # gradient-ready order = the rebuilt buckets' order
    total = sum(grad_bytes)
    weights = [r for r in rw.of_categories(WEIGHTS + (Category.BUFFERS,)) if r.phase == "load" and wrapped(r.module)]
    end_load = max((r.alloc_at for r in weights), default=0)
    broadcast = max(assign_buckets([r.nbytes for r in weights], [BROADCAST_BUCKET_BYTES]), default=0)
    if broadcast:
        rec = rw.add(broadcast, rw.after(end_load), None, Category.TEMPORARIES, "load", "ddp_broadcast")
        rec.free_at = rw.after(end_load)
    initial = rw.add(total, rw.after(end_load), None, Category.GRADIENTS, "load", "ddp_bucket")
    rebuilt = assign_buckets(grad_bytes, [FIRST_BUCKET_BYTES, BUCKET_CAP_BYTES])
    if len(steps) > 1:
        at = rw.before(steps[1].forward[0])
        initial.free_at = at
        for size in rebuilt:
            rw.add(size, rw.before(steps[1].forward[0]), None, Category.GRADIENTS,
                   steps[1].prefix + "forward", "ddp_bucket")
    return DdpResult(bucket_bytes=sum(rounded(b) for b in rebuilt), bucket_count=len(rebuilt),
                     broadcast_bytes=rounded(broadcast))

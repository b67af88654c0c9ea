"""Several GPUs: per-GPU memory under DDP, FSDP and DeepSpeed ZeRO, host RAM, launch configs.

The single-GPU step timeline of the analytic tier (`vramplan.estimate.step`) is the starting
point: activations follow the per-GPU batch (`--batch-size` is per GPU, as in accelerate), so
what changes from one GPU to several is who holds which weights, gradients and optimizer states,
and what the engines allocate to move them. Each strategy rewrites that timeline by its engine's
own rules, sources quoted next to each rule:

- `ddp`: torch DistributedDataParallel's Reducer buckets (`ddp.py`)
- `fsdp`: torch FSDP1 flat parameters, unshard/reshard, post-backward reduce-scatter (`fsdp.py`)
- `zero`: DeepSpeed ZeRO stages 1-3, buckets, prefetch, persistence, offload (`zero.py`)
- `units`: the FSDP auto-wrap units for diffusers and transformers models
- `host`: host RAM per node (pinned offload buffers)
- `formulas`: the published formulas (ZeRO paper, DeepSpeed's estimators) to check against
- `configs`: the accelerate config YAML and DeepSpeed JSON that launch the plan
- `plan`: `estimate_distributed(spec)` and `distributed_options(spec)`, what estimate and fit call

No torch here, except `measure.py`, which runs a real step under torch FSDP to check the counts.
Imports are lazy so that `vramplan.spec` can use `cards` without a cycle.
"""

from __future__ import annotations

__all__ = ["estimate_distributed", "distributed_options", "parse_gpus"]


def __getattr__(name):
    if name in ("estimate_distributed", "distributed_options"):
        from vramplan.distributed import plan

        return getattr(plan, name)
    if name == "parse_gpus":
        from vramplan.distributed.cards import parse_gpus

        return parse_gpus
    raise AttributeError(name)

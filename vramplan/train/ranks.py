"""One rank of a several-GPU run: accelerate's `Accelerator` prepares the step as the plan says.

Each process `accelerate launch` starts (vramplan.train.launch) builds the same shared step
(`build_step`, same seed, so every rank starts from the same weights), then hands its trained
components to accelerate, which wraps them as the launch config (the plan's) asks:

* ddp: `DistributedDataParallel` (accelerate's MULTI_GPU, or MULTI_CPU with gloo on a machine
  without CUDA). Mixed precision stays the step's own (its autocast and GradScaler, as on one
  GPU): accelerate is told "no", so it adds neither a second autocast nor a second scaler.
  Gradients are all-reduced in backward; the update (unscale, clip to norm 1, step) is the
  step's, on identical gradients on every rank.
* fsdp: torch FSDP1 from accelerate's plugin (the launch config: sharding, auto-wrap classes,
  BACKWARD_PRE, use_orig_params, mixed precision as an FSDP MixedPrecision policy). As FSDP
  keeps one dtype per flat parameter, a trained component is cast to the trainable dtype first
  (what the estimate counts); the optimizer is built again over the wrapped parameters; fp16
  uses torch's ShardedGradScaler; gradients are clipped by FSDP's own `clip_grad_norm_` (the
  norm over all shards).
* zero1/2/3: a DeepSpeed engine from accelerate's DeepSpeed plugin (the launch config's JSON).
  The step is built in pure 16 bits, as DeepSpeed runs it (the engine keeps the fp32 master
  weights; `vramplan.distributed.plan.graph_spec`); the backward goes through
  `accelerator.backward`, i.e. the engine's, which also steps at the accumulation boundary; with
  an offload the optimizer is DeepSpeedCPUAdam, which DeepSpeed requires for it.

Gradient accumulation is accelerate's: each micro-step runs under `accelerator.accumulate()`,
which skips the gradient synchronisation until the last one (no_sync), as the estimate assumes.

Data: every rank reads the same step-determined order (vramplan.train.data.Sampler); rank r of
W takes micro-batch m*W + r, so one optimizer step sees W different batches -- the sharding a
prepared DataLoader would do, and resumable from the step number alone. Noise and timesteps
come from a generator reseeded from (seed, step, rank) each step, so ranks draw different noise
and a resumed run draws what the uninterrupted one would have.

Only rank 0 writes: the run file, checkpoints, the result, the profile, the report. Checkpoints
and --resume cover ddp, where every rank holds the whole (identical) state; under fsdp and zero*
the optimizer states are sharded and vramplan writes no checkpoints yet (train says so), the
result being gathered for the save (FSDP summon_full_params on rank 0, DeepSpeed
GatheredParameters for ZeRO-3).

What could be run without GPUs: ddp on two CPU processes (tests/train). fsdp and zero* follow
accelerate's and DeepSpeed's documented use and need GPUs to run.
"""

from __future__ import annotations

import contextlib
import dataclasses

from vramplan.errors import UsageError
from vramplan.spec import Offload, Strategy, TrainingSpec

_DISTRIBUTED_TYPES = {None: ("MULTI_GPU", "MULTI_CPU", "NO"), Strategy.DDP: ("MULTI_GPU", "MULTI_CPU", "NO"),
                      Strategy.FSDP: ("FSDP",), Strategy.ZERO1: ("DEEPSPEED",), Strategy.ZERO2: ("DEEPSPEED",),
                      Strategy.ZERO3: ("DEEPSPEED",)}


class _Backward:
    """Stands in for the step's GradScaler under DeepSpeed: `scale(loss).backward()`, which the
    shared step calls, becomes `accelerator.backward(loss)`, the engine's backward (loss scaling
    and gradient partitioning included, and the engine's step at an accumulation boundary)."""

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def scale(self, loss):
        accelerator = self.accelerator

        class _Loss:
            def backward(self):
                accelerator.backward(loss)

        return _Loss()


def _forward_attributes(wrapper, inner) -> None:
    """DDP hides its module's attributes (`unet.config`, which the Flux step reads): look them up
    on the module when DDP has none. (FSDP and DeepSpeed's engine forward them themselves.)"""
    cls = type(wrapper)

    def __getattr__(self, name):
        try:
            return cls.__getattr__(self, name)
        except AttributeError:
            return getattr(inner, name)

    wrapper.__class__ = type(cls.__name__, (cls,), {"__getattr__": __getattr__})


class Rank:
    """This process's place in the job and the accelerate objects that run it."""

    def __init__(self, spec: TrainingSpec, accelerator):
        self.spec, self.accelerator = spec, accelerator
        self.strategy = spec.strategy or Strategy.DDP
        self.index = accelerator.process_index
        self.world = accelerator.num_processes
        self.device = "cuda" if accelerator.device.type == "cuda" else "cpu"
        self.wrapped: dict = {}          # component -> the wrapper accelerate made
        self.inner: dict = {}            # component -> the module inside it

    @property
    def is_main(self) -> bool:
        return self.index == 0

    @property
    def sharded(self) -> bool:
        return self.strategy is not Strategy.DDP

    @property
    def deepspeed(self) -> bool:
        return self.strategy.is_deepspeed

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    # -- the step ------------------------------------------------------------------------------
    def build_spec(self, train_spec: TrainingSpec) -> TrainingSpec:
        """The spec the step is built from: pure 16 bits under DeepSpeed (the engine's cast)."""
        if self.deepspeed:
            from vramplan.distributed.plan import graph_spec

            return graph_spec(train_spec)
        return train_spec

    def prepare(self, built, spec: TrainingSpec) -> None:
        """Hand the trained components (and, where the engine needs it, the optimizer) to
        accelerate; `built` is changed in place to use the wrapped ones."""
        import torch

        from vramplan.precision import trainable_dtype
        from vramplan.simulate.variants import DTYPES
        from vramplan.step.build import trainable_parameters
        from vramplan.step.optimizers import build_optimizer

        acc = self.accelerator
        names = [n for n, m in built.models.items() if any(p.requires_grad for p in m.parameters())]
        if self.strategy is Strategy.DDP:
            for name in names:
                inner = built.models[name]
                wrapper = acc.prepare_model(inner)
                _forward_attributes(wrapper, inner)
                built.models[name], self.wrapped[name], self.inner[name] = wrapper, wrapper, inner
            return
        if self.strategy is Strategy.FSDP:
            if built.ema is not None:
                raise UsageError("--ema under fsdp: vramplan train keeps the EMA of whole weights, which FSDP "
                                 "shards; use ddp or zero*, or train without --ema")
            for name in names:
                inner = built.models[name]
                inner.to(DTYPES[trainable_dtype(spec)])     # one dtype per FlatParameter
                wrapper = acc.prepare_model(inner)
                built.models[name], self.wrapped[name], self.inner[name] = wrapper, wrapper, inner
            built.trainable = trainable_parameters(built.models)
            built.optimizer = build_optimizer(spec, built.trainable, self.device, None)
            if built.scaler is not None:
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

                built.scaler = ShardedGradScaler(self.device)
            return
        # DeepSpeed: one trained model per run (the spec refuses a second)
        if len(names) != 1:
            raise UsageError(f"DeepSpeed runs one trained model per accelerate run, this plan trains {names}")
        if built.ema is not None:
            raise UsageError("--ema under DeepSpeed: vramplan train keeps the EMA of whole weights, which "
                             "ZeRO partitions; use ddp, or train without --ema")
        name = names[0]
        inner = built.models[name]
        optimizer = built.optimizer
        if spec.offload is not Offload.NONE:
            # DeepSpeed refuses a client optimizer other than its own CPU Adam with an offload
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(built.trainable, lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                                         weight_decay=1e-2, adamw_mode=True)
        engine, optimizer = acc.prepare(inner, optimizer)
        built.models[name], self.wrapped[name], self.inner[name] = engine, engine, inner
        built.optimizer = optimizer
        built.scaler = _Backward(acc)
        del torch

    def accumulate(self, built):
        """The context of one micro-step: no gradient synchronisation but on the last."""
        return self.accelerator.accumulate(*self.wrapped.values())

    @property
    def step_accumulation(self) -> int:
        """What the step divides the loss by: the engine does it under DeepSpeed."""
        return 1 if self.deepspeed else self.spec.gradient_accumulation_steps

    def update(self, built) -> None:
        """The optimizer step after the last micro-step: the step's own update (FSDP clipping
        by its own norm over all shards), or the engine's under DeepSpeed."""
        if self.deepspeed:
            built.steps_done += 1
            return
        clip = None
        if self.strategy is Strategy.FSDP:
            def clip(max_norm):
                for wrapper in self.wrapped.values():
                    wrapper.clip_grad_norm_(max_norm)
        built.update(clip)

    def seed_step(self, seed: int, step: int) -> None:
        """Noise for (seed, step, rank): different on every rank, the same after a resume."""
        import torch

        torch.manual_seed((seed * 1_000_003 + step * self.world + self.index) % 2**63)

    def mean(self, value: float) -> float:
        """A loss averaged over the ranks."""
        import torch

        tensor = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(tensor, reduction="mean")[0])

    def gather(self, value) -> list:
        """One picklable value from every rank, in rank order (on every rank)."""
        from accelerate.utils import gather_object

        return gather_object([value])

    def summary(self, built, seen: list[int]) -> dict:
        """What this rank did, for the run file: the examples it trained on, in order, and under ddp a
        checksum of its trained weights (every rank's must be the same: DDP keeps them equal)."""
        out = {"rank": self.index, "device": self.device, "examples": list(seen),
               "micro_batches": len(seen) // max(self.spec.batch_size, 1)}
        if not self.sharded:
            import torch

            with torch.no_grad():
                out["weights_checksum"] = float(sum(p.detach().double().sum() for p in built.trainable))
        return out

    # -- what rank 0 writes --------------------------------------------------------------------
    def unwrapped(self, built):
        """`built` with the modules inside the wrappers (the names checkpoints and saves use)."""
        models = dict(built.models)
        models.update(self.inner)
        return dataclasses.replace(built, models=models)

    @contextlib.contextmanager
    def full_parameters(self):
        """Every rank enters; inside, rank 0's modules hold whole parameters."""
        if self.strategy is Strategy.FSDP:
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

            with contextlib.ExitStack() as stack:
                for wrapper in self.wrapped.values():
                    stack.enter_context(FSDP.summon_full_params(wrapper, writeback=False, rank0_only=True,
                                                                offload_to_cpu=self.device == "cuda"))
                yield
        elif self.strategy is Strategy.ZERO3:
            import deepspeed

            params = [p for wrapper in self.wrapped.values() for p in wrapper.module.parameters()]
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield
        else:
            yield

    def finish(self) -> None:
        self.wait()
        self.accelerator.end_training()


def _forget() -> None:
    """Drop accelerate's process-wide state after a refused start (the error ends the process
    when launched; in a test or a notebook the next Accelerator starts clean)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def start_rank(spec: TrainingSpec, device: str) -> Rank:
    """Join the job: accelerate's Accelerator, checked against the plan (process count, engine)."""
    try:
        from accelerate import Accelerator
    except ImportError:
        raise UsageError("several GPUs need accelerate (pip install accelerate)") from None
    from vramplan.distributed.configs import mixed_precision

    strategy = spec.strategy or Strategy.DDP
    cpu = device == "cpu"
    # (fsdp and zero* never get here on the CPU: vramplan.train.launch refuses them, as accelerate
    # selects FSDP and DeepSpeed only with CUDA)
    # DDP: the step keeps its own mixed precision (autocast, GradScaler); the sharded engines
    # take the plan's (FSDP's MixedPrecision policy, DeepSpeed's fp16/bf16 section)
    precision = "no" if strategy is Strategy.DDP else mixed_precision(spec)
    accelerator = Accelerator(cpu=cpu, mixed_precision=precision,
                              gradient_accumulation_steps=spec.gradient_accumulation_steps)
    rank = Rank(spec, accelerator)
    if rank.world != spec.num_gpus:
        _forget()
        raise UsageError(f"the plan is for {spec.num_gpus} GPU(s) but accelerate started {rank.world} "
                         f"process(es): let 'vramplan train' launch it, or 'accelerate launch "
                         f"--num_processes {spec.num_gpus}'")
    kind = accelerator.distributed_type.value if hasattr(accelerator.distributed_type, "value") \
        else str(accelerator.distributed_type)
    if kind not in _DISTRIBUTED_TYPES[spec.strategy]:
        _forget()
        raise UsageError(f"the plan's strategy is {strategy.value} but accelerate runs {kind}: launch with the "
                         f"plan's config ('vramplan train' does; 'vramplan fit --emit accelerate' writes it)")
    return rank


__all__ = ["Rank", "start_rank"]

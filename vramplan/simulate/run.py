"""`vramplan simulate`: run the spec's real training step twice on fake tensors and measure it.

The step is `vramplan.step.build.build_step(spec, "fake")` -- the same code profile and train
run -- under CUDA's autocast policy. A `MemoryTracker` sees every storage; afterwards each is
labelled: weights, buffers, EMA and batch inputs when created, gradients when they are found in
`param.grad` before the optimizer step, optimizer states when found in `optimizer.state`,
autocast casts when made from a weight, activations when autograd saved them (a saved-tensor
hook), temporaries otherwise. The result has the same categories and totals as `estimate`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from vramplan.footprint import Category, Footprint
from vramplan.spec import TrainingSpec
from vramplan.timeline import Analysis, Record

STEPS = 2


@dataclass
class Simulation:
    spec: TrainingSpec
    footprint: Footprint
    analysis: Analysis
    records: list
    phases: list
    parameters: dict
    top_layers: list = field(default_factory=list)   # (module, saved activation bytes)
    seconds: float = 0.0
    notes: tuple = ()

    def to_json(self) -> dict:
        from vramplan.estimate.result import Estimate

        est = Estimate(spec=self.spec, parameters=self.parameters, footprint=self.footprint,
                       notes=self.notes).to_json()
        est["source"] = "simulate"
        est["top_layers"] = [{"module": m, "saved_bytes": b} for m, b in self.top_layers]
        est["seconds"] = round(self.seconds, 2)
        return est


def simulate(spec: TrainingSpec, progress=None) -> Simulation:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from vramplan.estimate.core import component_parameters
    from vramplan.footprint_build import build_footprint
    from vramplan.simulate.autocast_policy import cuda_autocast_policy
    from vramplan.step.build import build_step

    started = time.time()
    say = progress or (lambda message: None)
    fake_mode = FakeTensorMode()
    from vramplan.simulate.bnb_paths import cuda_bitsandbytes

    # bitsandbytes only where the frozen base is quantized: its import alone takes about a second
    bnb = cuda_bitsandbytes() if spec.base_quant.value != "none" else contextlib.nullcontext()
    with cuda_autocast_policy(), bnb:
        say("building the model on the meta device")
        step = build_step(spec, "fake", fake_mode=fake_mode)
        with fake_mode:
            tracker = trace_step(step, STEPS, say, conv_workspaces=True)
    records, phases = _records(tracker)
    footprint, analysis, notes = build_footprint(records, phases, spec.gpu, "simulate",
                                               spec.gradient_checkpointing)
    top: dict = {}
    for r in records:
        if r.category is Category.ACTIVATIONS and not r.phase.startswith("step 2"):
            top[r.module] = top.get(r.module, 0) + r.nbytes
    top_layers = sorted(top.items(), key=lambda kv: -kv[1])[:10]
    parameters = component_parameters(spec, step.inventories)
    return Simulation(spec=spec, footprint=footprint, analysis=analysis, records=records, phases=phases,
                      parameters=parameters, top_layers=top_layers, seconds=time.time() - started,
                      notes=tuple(notes))


def trace_step(step, steps: int = STEPS, say=None, conv_workspaces: bool = False) -> "MemoryTracker":
    """Run `steps` training steps of a built step under a MemoryTracker and label what it saw.

    Works on fake tensors (simulate; call inside the step's FakeTensorMode) and on real CPU
    tensors (profile --device cpu; and the test that the two traces agree). `conv_workspaces`:
    count the cuDNN workspaces a CUDA run's convolutions borrow (simulate's fake CUDA step)."""
    from vramplan.simulate.tracker import MemoryTracker
    from vramplan.step.quantize import quant_tensors

    say = say or (lambda message: None)
    tracker = MemoryTracker(conv_workspaces=conv_workspaces)
    tracker.set_phase("load")
    for module in step.models.values():
        for p in module.parameters():
            tracker.track(p, Category.TRAINABLE_WEIGHTS if p.requires_grad else Category.FROZEN_WEIGHTS)
            for extra in quant_tensors(p).values():
                tracker.track(extra, Category.FROZEN_WEIGHTS)
        for b in module.buffers():
            tracker.track(b, Category.BUFFERS)
    if step.ema is not None:
        for p in step.ema.shadow_params:
            tracker.track(p, Category.EMA)
    if step.scaler is not None:
        for value in vars(step.scaler).values():
            if isinstance(value, torch.Tensor):
                tracker.track(value, Category.TEMPORARIES)

    def mark_saved(t):
        tracker.mark_saved(t)
        return t

    with contextlib.ExitStack() as stack:
        stack.enter_context(tracker)
        stack.enter_context(tracker.module_hooks(step.models))
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(mark_saved, lambda t: t))
        accumulation = step.spec.gradient_accumulation_steps
        micro_steps = min(accumulation, 2)   # a third micro-step repeats the second
        for i in range(steps):
            prefix = "" if i == 0 else f"step {i + 1} "
            say(f"step {i + 1} of {steps}")
            for micro in range(micro_steps):
                micro_prefix = prefix + (f"micro {micro + 1} " if micro else "")

                def hook(phase, prefix=micro_prefix):
                    if phase == "optimizer":
                        for p in step.trainable:
                            if p.grad is not None:
                                tracker.track(p.grad, Category.GRADIENTS)
                        tracker.set_phase(prefix.split("micro")[0] + phase)
                        return
                    tracker.set_phase(prefix + phase)

                tracker.set_phase(micro_prefix + "encode")
                batch = step.make_batch()
                for t in _batch_tensors(batch):
                    tracker.track(t, Category.INPUTS)
                step.run_step(batch, hook=hook, update=micro == micro_steps - 1, accumulation=accumulation)
                if micro == 0 and micro_steps > 1:
                    for p in step.trainable:
                        if p.grad is not None:
                            tracker.track(p.grad, Category.GRADIENTS)
                del batch
            for state in step.optimizer.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor):
                        tracker.track(value, Category.OPTIMIZER_STATES)
        tracker.set_phase("end")
    return tracker


def _batch_tensors(batch):
    out = [batch.pixel_values, batch.latents, *batch.input_ids.values(), *batch.cached_text.values()]
    return [t for t in out if t is not None]


def _records(tracker) -> tuple[list, list]:
    records = []
    for s in tracker.records.values():
        category = s.category or (Category.ACTIVATIONS if s.saved else Category.TEMPORARIES)
        records.append(Record(s.nbytes, s.alloc_at, s.free_at, category, s.phase, s.module, s.op, s.saved))
    phases = [(name, event) for name, event in tracker.timeline.phases if name != "end"]
    return records, phases

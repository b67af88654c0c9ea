"""Assemble an `Estimate`: the step timeline, its peak, the allocator's reserve, the overheads."""

from __future__ import annotations

from vramplan.estimate.allocator import replay_allocator
from vramplan.estimate.overheads import (CUDA_CONTEXT_SOURCE, CUBLAS_THREADS, cublas_workspace_bytes,
                                         cuda_context_bytes)
from vramplan.estimate.result import Estimate
from vramplan.estimate.step import build_timeline
from vramplan.footprint import Category, ComponentParams, Footprint, PhasePeak
from vramplan.methods import get_method
from vramplan.models.inventory import load_model_inventories
from vramplan.spec import TrainingSpec
from vramplan.timeline import analyse


def run_estimate(spec: TrainingSpec) -> Estimate:
    inventories = load_model_inventories(spec.model)
    method = get_method(spec.method)
    trained = method.trainable(spec, inventories)
    parameters = {name: ComponentParams(inv.total_params, trained.get(name, 0))
                  for name, inv in inventories.items()}
    for name, count in trained.items():
        if name not in parameters:
            parameters[name] = ComponentParams(0, count)

    timeline = build_timeline(spec, inventories)
    clock = timeline.clock
    # cuBLAS workspaces: the first matmul of the forward (main thread) and of the backward
    # (autograd's thread) each create one, kept for the life of the process.
    forward_start = next(e for name, e in clock.phases if name == "forward")
    backward_start = next(e for name, e in clock.phases if name == "backward")
    ws = cublas_workspace_bytes(spec.gpu)
    from vramplan.timeline import Record

    for start in (forward_start, backward_start)[:CUBLAS_THREADS]:
        clock.records.append(Record(ws, start, None, Category.WORKSPACES, "workspace"))

    analysis = analyse(clock.records, clock.phases)
    allocator = replay_allocator(clock.records)
    context = cuda_context_bytes(spec.gpu)
    composition = dict(analysis.composition)
    reserve = max(allocator.peak_reserved - analysis.peak_bytes, 0)
    composition[Category.ALLOCATOR_RESERVE] = reserve
    composition[Category.CUDA_CONTEXT] = context
    peak_reserved = analysis.peak_bytes + reserve
    phases = tuple(PhasePeak(name, peak, comp) for name, peak, comp in analysis.phase_peaks)
    footprint = Footprint(
        categories=composition,
        peak_allocated_bytes=analysis.peak_bytes,
        peak_reserved_bytes=peak_reserved,
        device_used_bytes=peak_reserved + context,
        peak_phase=analysis.peak_phase,
        phases=phases,
        source="estimate",
    )
    notes = [f"CUDA context {context / 2**20:.0f} MiB is provisional: {CUDA_CONTEXT_SOURCE}"]
    if timeline.unknown_ops:
        notes.append("ops without an autograd rule (counted as saving all inputs): "
                     + ", ".join(sorted(timeline.unknown_ops)))
    return Estimate(spec=spec, parameters=parameters, footprint=footprint,
                    adapter_file_bytes=method.adapter_file_bytes(spec, inventories),
                    notes=tuple(notes))

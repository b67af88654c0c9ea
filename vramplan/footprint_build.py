"""From allocation records to a `Footprint`: peak, composition, reserve, overheads.

Shared by the analytic tier (records replayed from graphs) and the fake-tensor tier (records
measured by the tracker), so that both add exactly the same things PyTorch's tensors do not show:
cuBLAS workspaces, the caching allocator's reserve (replayed by its own algorithm) and the CUDA
context.
"""

from __future__ import annotations

from vramplan.estimate.allocator import replay_allocator
from vramplan.estimate.overheads import (CUDA_CONTEXT_SOURCE, CUBLAS_THREADS, cublas_workspace_bytes,
                                         cuda_context_bytes)
from vramplan.footprint import Category, Footprint, PhasePeak
from vramplan.gpus import Gpu
from vramplan.timeline import Analysis, Record, analyse, gc_paused


def add_workspaces(records: list, phases: list, gpu: Gpu | None) -> None:
    """cuBLAS workspaces: the first matmul of the forward (main thread) and of the backward
    (autograd's thread) each create one, kept for the life of the process."""
    starts = [e for name, e in phases if name in ("forward", "backward")][:CUBLAS_THREADS]
    for start in starts:
        records.append(Record(cublas_workspace_bytes(gpu), start, None, Category.WORKSPACES, "workspace"))


@gc_paused()
def build_footprint(records: list, phases: list, gpu: Gpu | None, source: str) -> tuple[Footprint, Analysis, list]:
    from vramplan import native

    add_workspaces(records, phases, gpu)
    columns = native.columns(records)      # read by both: made into C arrays once
    analysis = analyse(records, phases, columns=columns)
    allocator = replay_allocator(records, columns)
    context = cuda_context_bytes(gpu)
    composition = dict(analysis.composition)
    reserve = max(allocator.peak_reserved - analysis.peak_bytes, 0)
    composition[Category.ALLOCATOR_RESERVE] = reserve
    composition[Category.CUDA_CONTEXT] = context
    peak_reserved = analysis.peak_bytes + reserve
    phases_out = tuple(PhasePeak(name, peak, comp) for name, peak, comp in analysis.phase_peaks)
    footprint = Footprint(categories=composition, peak_allocated_bytes=analysis.peak_bytes,
                          peak_reserved_bytes=peak_reserved, device_used_bytes=peak_reserved + context,
                          peak_phase=analysis.peak_phase, phases=phases_out, source=source)
    notes = [f"CUDA context {context / 2**20:.0f} MiB is provisional: {CUDA_CONTEXT_SOURCE}"]
    return footprint, analysis, notes

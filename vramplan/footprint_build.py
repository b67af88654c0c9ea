"""From allocation records to a `Footprint`: peak, composition, reserve, overheads.

Shared by the analytic tier (records replayed from graphs) and the fake-tensor tier (records
measured by the tracker), so that both add exactly the same things PyTorch's tensors do not show:
cuBLAS workspaces, the caching allocator's reserve (replayed by its own algorithm) and the CUDA
context.
"""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.estimate.allocator import replay_allocator
from vramplan.estimate.overheads import (CUBLAS_THREADS, CUBLASLT_WORKSPACE_BYTES, CUDA_CONTEXT_SOURCE,
                                         cublas_workspace_bytes, cuda_context_bytes)
from vramplan.footprint import Category, Footprint, PhasePeak
from vramplan.gpus import Gpu
from vramplan.timeline import Analysis, Record, analyse, gc_paused


# aten's matrix products, as the estimate names ops ("mm.default") and as the tracker does ("mm")
MATMULS = frozenset({"mm", "addmm", "bmm", "baddbmm", "mm.default", "addmm.default", "bmm.default",
                     "baddbmm.default"})
ADDMMS = frozenset({"addmm", "addmm.default"})


def workspace_records(records: list, phases: list, gpu: Gpu | None, checkpointing: bool = False) -> list:
    """cuBLAS and cuBLASLt workspaces, created by a thread's first matrix product and kept for
    the life of the process (profiles/h200 traces, scripts/gpu_trace.py: 32 MiB at the first
    product on the main thread -- the VAE's or text encoder's in the encode phase, the denoiser's
    when both are cached -- and 32 MiB at the start of backward on autograd's thread; 1 MiB more
    for cuBLASLt at the first addmm (a Linear with bias), on autograd's thread only where
    checkpointing reruns forwards there). `records`: the step's, in event order, searched for
    those products (fit calls this for every candidate: generators that stop at the first)."""
    backward = next((e for name, e in phases if name == "backward"), None)
    after = next((e for name, e in phases if backward is not None and e > backward), None)
    forward = next((e for name, e in phases if name == "forward"), None)
    limit = backward if backward is not None else float("inf")
    main = first_alloc(records, MATMULS)
    main = main if main is not None and main < limit else forward
    lt_main = first_alloc(records, ADDMMS)
    lt_main = lt_main if lt_main is not None and lt_main < limit else None
    lt_backward = None
    if checkpointing and backward is not None:
        lt_backward = first_alloc(records, ADDMMS, backward, after)
    cublas = cublas_workspace_bytes(gpu)
    out = [Record(cublas, at, None, Category.WORKSPACES, "workspace", op="cuBLAS workspace")
           for at in (main, backward) if at is not None][:CUBLAS_THREADS]
    out += [Record(CUBLASLT_WORKSPACE_BYTES, at, None, Category.WORKSPACES, "workspace", op="cuBLASLt workspace")
            for at in (lt_main, lt_backward) if at is not None]
    return out


def first_alloc(records, ops: frozenset, lo: int | None = None, hi: int | None = None) -> int | None:
    """The allocation event of the first record (in record order) whose op is in `ops`,
    allocated in [lo, hi) (None: unbounded). A step's `RecordLog` finds it run by run."""
    find = getattr(records, "first_alloc", None)
    if find is not None:
        return find(ops, lo, hi)
    return next((r.alloc_at for r in records if r.op in ops and (lo is None or lo <= r.alloc_at)
                 and (hi is None or r.alloc_at < hi)), None)


def add_workspaces(records: list, phases: list, gpu: Gpu | None, checkpointing: bool = False) -> None:
    records.extend(workspace_records(records, phases, gpu, checkpointing))


@dataclass
class Prepared:
    """A step's records made ready for `build_footprint`: its workspaces, and the records with
    them as C arrays (None without `vramplan.native`). fit's lower bound makes these for each
    candidate and hands them to the estimate of the same candidate, which would make them again;
    fit's decision (`device_used_bytes`) adds the allocator's replay of them, and reads the
    peak the lower bound found."""

    workspaces: list
    columns: object
    allocator: object = None
    peak: int | None = None          # the tensors' peak over them, once fit's lower bound took it


def prepare(records: list, phases: list, gpu: Gpu | None, checkpointing: bool = False) -> Prepared:
    from vramplan import native

    workspaces = workspace_records(records, phases, gpu, checkpointing)
    return Prepared(workspaces, native.columns(records, workspaces))


def allocator_overheads(peak_bytes: int, allocator) -> tuple[int, int]:
    """(block slack, reserve): what the caching allocator adds over the tensors' peak.

    torch counts whole blocks as allocated: a large block is not split when 1 MiB or less would
    remain, so max_memory_allocated is above the tensors' peak (by 37 MiB for SD 1.5's weights
    alone, matched to the MiB by this replay in the profiles/h200 traces). The reserve is what
    the allocator keeps beyond that, cached but free."""
    slack = max(allocator.peak_allocated - peak_bytes, 0)
    return slack, max(allocator.peak_reserved - peak_bytes - slack, 0)


def device_used_bytes(records, phases: list, gpu: Gpu | None, checkpointing: bool = False,
                      prepared: Prepared | None = None) -> int:
    """`build_footprint(...)`'s device used alone -- the peak, the allocator's slack and reserve,
    the CUDA context -- without the composition and the phases' peaks it also finds. fit decides
    whether a candidate fits by this, and builds the whole footprint of the plans it lists.
    The records are left as they are (`build_footprint` adds the workspaces to them)."""
    from vramplan import native

    prepared = prepared or prepare(records, phases, gpu, checkpointing)
    columns = prepared.columns
    peak = prepared.peak
    if peak is None and columns is not None:
        peak = native.peak_live_bytes(columns)
    if peak is None or columns is None:      # the Python versions read the workspaces as records
        records = list(records) + list(prepared.workspaces)
        if peak is None:
            peak = analyse(records, phases).peak_bytes
    if prepared.allocator is None:
        prepared.allocator = replay_allocator(records, columns)
    slack, reserve = allocator_overheads(peak, prepared.allocator)
    return peak + slack + reserve + cuda_context_bytes(gpu)


@gc_paused()
def build_footprint(records: list, phases: list, gpu: Gpu | None, source: str,
                    checkpointing: bool = False, prepared: Prepared | None = None) -> tuple[Footprint, Analysis, list]:
    """`prepared`: `prepare(records, ...)` of these very records, when the caller has it (with
    their allocator's replay, when `device_used_bytes` made it)."""
    prepared = prepared or prepare(records, phases, gpu, checkpointing)
    records.extend(prepared.workspaces)
    columns = prepared.columns      # read by both: made into C arrays once
    analysis = analyse(records, phases, columns=columns)
    allocator = prepared.allocator if prepared.allocator is not None else replay_allocator(records, columns)
    context = cuda_context_bytes(gpu)
    composition = dict(analysis.composition)
    slack, reserve = allocator_overheads(analysis.peak_bytes, allocator)
    peak_allocated = analysis.peak_bytes + slack
    composition[Category.BLOCK_SLACK] = slack
    composition[Category.ALLOCATOR_RESERVE] = reserve
    composition[Category.CUDA_CONTEXT] = context
    peak_reserved = peak_allocated + reserve
    phases_out = tuple(PhasePeak(name, peak, comp) for name, peak, comp in analysis.phase_peaks)
    footprint = Footprint(categories=composition, peak_allocated_bytes=peak_allocated,
                          peak_reserved_bytes=peak_reserved, device_used_bytes=peak_reserved + context,
                          peak_phase=analysis.peak_phase, phases=phases_out, source=source)
    notes = [f"CUDA context and kernels {context / 2**20:.0f} MiB: {CUDA_CONTEXT_SOURCE}"]
    return footprint, analysis, notes

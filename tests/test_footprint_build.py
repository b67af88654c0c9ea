"""From records to a footprint: where the library workspaces go, and the allocator's whole blocks."""

from vramplan.estimate.overheads import CUBLASLT_WORKSPACE_BYTES, cublas_workspace_bytes
from vramplan.footprint import Category
from vramplan.footprint_build import build_footprint, workspace_records
from vramplan.gpus import CATALOG
from vramplan.timeline import Record

H200 = CATALOG["h200"]
PHASES = [("load", 1), ("encode", 10), ("forward", 20), ("backward", 30), ("optimizer", 40)]


def rec(at, op, free=None, nbytes=4096):
    return Record(nbytes, at, free, Category.TEMPORARIES, "forward", "m", op)


def test_the_main_threads_workspaces_come_with_its_first_products():
    records = [rec(12, "convolution.default"), rec(14, "bmm.default"), rec(16, "addmm.default"),
               rec(25, "mm.default"), rec(31, "addmm.default"), rec(33, "mm")]
    made = workspace_records(records, PHASES, H200)
    cublas = cublas_workspace_bytes(H200)
    assert cublas == 32 * 2**20
    # the VAE's attention in the encode phase is the first product; backward's handle at its start
    assert [(r.nbytes, r.alloc_at, r.free_at) for r in made] == [
        (cublas, 14, None), (cublas, 30, None), (CUBLASLT_WORKSPACE_BYTES, 16, None)]
    assert all(r.category is Category.WORKSPACES for r in made)
    # checkpointing reruns forwards (an addmm) on autograd's thread: its own cuBLASLt workspace
    made = workspace_records(records, PHASES, H200, checkpointing=True)
    assert [(r.nbytes, r.alloc_at) for r in made][-1] == (CUBLASLT_WORKSPACE_BYTES, 31)


def test_without_products_before_backward_the_forward_start_is_used():
    made = workspace_records([rec(31, "mm")], PHASES, None)
    assert [r.alloc_at for r in made] == [20, 30]
    assert workspace_records([], [("load", 1)], None) == []


def test_the_tracker_names_count_too():
    made = workspace_records([rec(21, "addmm")], PHASES, H200)
    assert [r.alloc_at for r in made] == [21, 30, 21]


def test_peak_allocated_counts_whole_blocks():
    # 19 MiB + 600 KiB: its 20 MiB segment is not split (under 1 MiB would remain), so the
    # allocator counts 20 MiB allocated, as torch.cuda.max_memory_allocated does
    size = 19 * 2**20 + 600 * 1024
    fp, analysis, _ = build_footprint([Record(size, 1, None, Category.FROZEN_WEIGHTS, "load")],
                                      [("load", 1)], None, "estimate")
    assert analysis.peak_bytes == size
    assert fp.peak_allocated_bytes == 20 * 2**20
    assert fp.category_bytes(Category.BLOCK_SLACK) == 20 * 2**20 - size
    assert fp.peak_reserved_bytes == 20 * 2**20 and fp.category_bytes(Category.ALLOCATOR_RESERVE) == 0
    # 10 MiB + 600 KiB in a 20 MiB segment: split, no slack, the rest reserved
    size = 10 * 2**20 + 600 * 1024
    fp, _, _ = build_footprint([Record(size, 1, None, Category.FROZEN_WEIGHTS, "load")], [("load", 1)],
                               None, "estimate")
    assert fp.peak_allocated_bytes == size and fp.category_bytes(Category.BLOCK_SLACK) == 0

"""The caching-allocator replay against hand-worked cases of PyTorch's rules
(c10/cuda/CUDACachingAllocator.cpp, as the module docstring states them): 512-byte rounding; a
small pool of 2 MiB segments for requests up to 1 MiB; large segments of 20 MiB below 10 MiB,
else the request rounded up to 2 MiB; best fit; split when the rest is >= 512 B (small) or
> 1 MiB (large); freed blocks merge with free neighbours of the same segment only.
"""

import pytest

from vramplan.estimate.allocator import CachingAllocator, allocation_size, replay_allocator, round_size
from vramplan.timeline import Record

KIB, MIB = 1 << 10, 1 << 20


@pytest.mark.parametrize("size, rounded", [(0, 512), (1, 512), (511, 512), (512, 512), (513, 1024),
                                           (MIB + 1, MIB + 512)])
def test_round_size(size, rounded):
    assert round_size(size) == rounded


@pytest.mark.parametrize("size, segment", [(512, 2 * MIB), (MIB, 2 * MIB), (MIB + 512, 20 * MIB),
                                           (10 * MIB - 512, 20 * MIB), (10 * MIB, 10 * MIB),
                                           (30 * MIB, 30 * MIB), (31 * MIB, 32 * MIB)])
def test_allocation_size(size, segment):
    assert allocation_size(size) == segment


def test_a_100_byte_tensor_reserves_a_2_mib_segment():
    a = CachingAllocator()
    block = a.malloc(100)
    assert block.size == 512
    assert a.reserved == a.peak_reserved == 2 * MIB
    assert a.allocated == 512


def test_a_5_mib_tensor_reserves_20_mib_and_shares_it():
    a = CachingAllocator()
    a.malloc(5 * MIB)
    assert a.reserved == 20 * MIB
    for _ in range(3):                  # the split-off rest serves the next three
        a.malloc(5 * MIB)
    assert a.reserved == 20 * MIB and a.allocated == 20 * MIB
    a.malloc(5 * MIB)
    assert a.reserved == 40 * MIB


def test_a_30_mib_tensor_reserves_30_mib():
    a = CachingAllocator()
    a.malloc(30 * MIB)
    assert a.reserved == 30 * MIB


def test_free_then_alloc_reuses_the_block():
    a = CachingAllocator()
    block = a.malloc(30 * MIB)
    a.free(block)
    assert a.allocated == 0 and a.reserved == 30 * MIB   # segments are kept, not returned
    a.malloc(30 * MIB)
    assert a.reserved == a.peak_reserved == 30 * MIB


def test_small_pool_packs_a_segment_and_splits_down_to_512_bytes():
    a = CachingAllocator()
    first = a.malloc(MIB - 512)
    assert first.size == MIB - 512 and first.next is not None and first.next.size == MIB + 512
    a.malloc(MIB)                        # the rest (1 MiB + 512) is split again: 512 B stay free
    a.malloc(512)                        # ... and take a 512-byte request
    assert a.reserved == 2 * MIB and a.allocated == 2 * MIB
    a.malloc(1)
    assert a.reserved == 4 * MIB


def test_large_pool_splits_only_above_1_mib():
    a = CachingAllocator()
    # 11 MiB -> a 12 MiB segment; the 1 MiB rest is not > 1 MiB, so the block keeps it
    block = a.malloc(11 * MIB)
    assert a.reserved == 12 * MIB and block.size == 12 * MIB and a.allocated == 12 * MIB
    # 9 MiB -> a 20 MiB segment whose 11 MiB rest is split off and serves an 11 MiB request
    a.malloc(9 * MIB)
    assert a.reserved == 32 * MIB
    a.malloc(11 * MIB)
    assert a.reserved == 32 * MIB


def test_small_requests_never_use_large_blocks():
    a = CachingAllocator()
    a.free(a.malloc(5 * MIB))            # a free 20 MiB large segment
    a.malloc(4 * KIB)
    assert a.reserved == 22 * MIB
    a.free(a.malloc(100))
    a.malloc(MIB + 512)                  # large request: not from the free small segment
    assert a.reserved == 22 * MIB        # ... but from the large one


def test_best_fit_takes_the_smallest_block_that_fits():
    a = CachingAllocator()
    x = a.malloc(3 * MIB)
    a.malloc(17 * MIB)                   # fills segment 1 exactly
    z = a.malloc(6 * MIB)
    a.malloc(14 * MIB)                   # fills segment 2 exactly
    assert a.reserved == 40 * MIB
    a.free(x)
    a.free(z)
    a.malloc(3 * MIB)                    # best fit: the 3 MiB hole, not a split of the 6 MiB one
    a.malloc(6 * MIB)
    assert a.reserved == 40 * MIB


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_neighbours_merge(order):
    a = CachingAllocator()
    blocks = [a.malloc(5 * MIB) for _ in range(3)]   # and a free 5 MiB rest
    for i in order:
        a.free(blocks[i])
    a.malloc(10 * MIB)                   # only the merged 10 MiB hole fits
    assert a.reserved == 20 * MIB


def test_freeing_the_middle_block_merges_both_sides():
    a = CachingAllocator()
    blocks = [a.malloc(5 * MIB) for _ in range(3)]
    a.free(blocks[0])
    a.free(blocks[2])                    # merges with the free rest
    a.free(blocks[1])                    # merges with both: the whole segment is one block
    a.malloc(20 * MIB)
    assert a.reserved == 20 * MIB


def test_blocks_of_different_segments_never_merge():
    a = CachingAllocator()
    first, second = a.malloc(20 * MIB), a.malloc(20 * MIB)
    a.free(first)
    a.free(second)
    a.malloc(40 * MIB)
    assert a.reserved == 80 * MIB


def test_replay_over_records():
    records = [
        Record(100, 1, 2),               # small segment: 2 MiB
        Record(30 * MIB, 3, 5),          # 30 MiB segment
        Record(30 * MIB, 6, None),       # reuses it
        Record(0, 7, None),              # nothing to allocate
    ]
    a = replay_allocator(records)
    assert a.peak_reserved == 32 * MIB
    assert a.allocated == 30 * MIB


def test_replay_frees_before_allocating_at_the_same_event():
    records = [Record(30 * MIB, 1, 2), Record(30 * MIB, 2, None)]
    assert replay_allocator(records).peak_reserved == 30 * MIB


def test_peak_reserved_never_falls():
    a = CachingAllocator()
    blocks = [a.malloc(12 * MIB) for _ in range(3)]
    for b in blocks:
        a.free(b)
    assert a.reserved == a.peak_reserved == 36 * MIB and a.allocated == 0


def test_equal_free_blocks_tie_on_the_drivers_addresses():
    """Best fit among equal sizes takes the lowest address. The driver placed each new large
    segment below the last and each 2 MiB one above it (H200 traces, estimate/allocator.py), so
    the newest large segment wins a tie and the oldest small one does."""
    a = CachingAllocator()
    first, second = a.malloc(30 * MIB), a.malloc(30 * MIB)
    assert second.addr < first.addr
    a.free(first)
    a.free(second)
    assert a.malloc(30 * MIB) is second
    small = [a.malloc(MIB) for _ in range(4)]       # two per 2 MiB segment: two segments
    assert small[2].addr > small[0].addr
    a.free(small[0])
    a.free(small[2])
    assert a.malloc(MIB).addr == small[0].addr

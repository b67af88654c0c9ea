"""PyTorch's CUDA caching allocator, replayed over an allocation timeline: reserved bytes.

`torch.cuda.max_memory_reserved` is what the allocator took from the driver: segments it never
gives back (outside `empty_cache` and out-of-memory retries), carved into blocks. The rules below
are those of c10/cuda/CUDACachingAllocator.cpp (constants quoted in
docs/research/cuda-overheads.md): requests round up to 512 bytes; requests of at most 1 MiB come
from a small pool of 2 MiB segments, larger ones from a large pool whose new segments are 20 MiB
for requests under 10 MiB and the request rounded up to 2 MiB otherwise; a free block is found
best-fit (smallest that fits, then lowest address); a block is split when what remains is at
least 512 bytes (small pool) or more than 1 MiB (large pool); freed blocks merge with free
neighbours of the same segment. Defaults assumed: no expandable segments, no max_split_size,
no garbage-collection threshold, one stream.
"""

from __future__ import annotations

import bisect

from vramplan.timeline import Record

MIB = 1 << 20
K_MIN_BLOCK = 512
K_SMALL_SIZE = MIB          # kSmallSize: largest "small" request
K_SMALL_BUFFER = 2 * MIB    # kSmallBuffer: small-pool segment size
K_LARGE_BUFFER = 20 * MIB   # kLargeBuffer: segment for requests in (1 MiB, 10 MiB)
K_MIN_LARGE_ALLOC = 10 * MIB
K_ROUND_LARGE = 2 * MIB
# Where new segments land matters where best fit ties on size (equal-sized free blocks, common in
# a model's repeated layers): the driver's own addresses break the tie. Traced on an H200
# (docs/research/h200/trace-*.json.gz, driver 580.159.04): new large segments mostly came below
# the one before (27 of 42 steps in the SD 1.5 trace, 7 of 7 in SDXL's), 2 MiB ones above it
# (56 of 59 and 180 of 181). Replayed that way the 34 profiles' peak reserved errs by 0.84% at most;
# with every segment rising, SDXL full fine-tuning at batch 8 was 9.4% over.
LARGE_TOP = 1 << 60


def round_size(size: int) -> int:
    if size < K_MIN_BLOCK:
        return K_MIN_BLOCK
    return -(-size // K_MIN_BLOCK) * K_MIN_BLOCK


def allocation_size(size: int) -> int:
    if size <= K_SMALL_SIZE:
        return K_SMALL_BUFFER
    if size < K_MIN_LARGE_ALLOC:
        return K_LARGE_BUFFER
    return -(-size // K_ROUND_LARGE) * K_ROUND_LARGE


class _Block:
    __slots__ = ("addr", "size", "segment", "small", "free", "prev", "next")

    def __init__(self, addr, size, segment, small, free=True, prev=None, next=None):
        self.addr, self.size, self.segment, self.small = addr, size, segment, small
        self.free, self.prev, self.next = free, prev, next


class CachingAllocator:
    def __init__(self):
        self.pools = {True: [], False: []}   # small? -> sorted [(size, addr, id)] of free blocks
        self.blocks: dict[int, _Block] = {}
        self.reserved = 0
        self.peak_reserved = 0
        self.allocated = 0
        self.peak_allocated = 0
        self._next_addr = 0             # small pool: segments at rising addresses
        self._large_top = LARGE_TOP     # large pool: segments at falling addresses
        self._segments = 0

    def _insert(self, block: _Block, small: bool) -> None:
        bisect.insort(self.pools[small], (block.size, block.addr, block))

    def _remove(self, block: _Block, small: bool) -> None:
        pool = self.pools[small]
        i = bisect.bisect_left(pool, (block.size, block.addr))
        while pool[i][2] is not block:
            i += 1
        pool.pop(i)

    def malloc(self, nbytes: int) -> _Block:
        size = K_MIN_BLOCK if nbytes < K_MIN_BLOCK else -(-nbytes // K_MIN_BLOCK) * K_MIN_BLOCK
        small = size <= K_SMALL_SIZE
        pool = self.pools[small]
        i = bisect.bisect_left(pool, (size, -1))
        if i < len(pool):
            block = pool.pop(i)[2]
        else:
            seg_size = allocation_size(size)
            self._segments += 1
            if small:
                block = _Block(self._next_addr, seg_size, self._segments, small)
                self._next_addr += seg_size
            else:
                self._large_top -= seg_size
                block = _Block(self._large_top, seg_size, self._segments, small)
            self.reserved += seg_size
            if self.reserved > self.peak_reserved:
                self.peak_reserved = self.reserved
        remaining = block.size - size
        if (small and remaining >= K_MIN_BLOCK) or (not small and remaining > K_SMALL_SIZE):
            rest = _Block(block.addr + size, remaining, block.segment, small, True, block, block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            bisect.insort(pool, (remaining, rest.addr, rest))
        block.free = False
        self.allocated += block.size
        if self.allocated > self.peak_allocated:
            self.peak_allocated = self.allocated
        return block

    def free(self, block: _Block) -> None:
        small = block.small
        block.free = True
        self.allocated -= block.size
        prev, nxt = block.prev, block.next
        if prev is not None and prev.free and prev.segment == block.segment:
            self._remove(prev, small)
            prev.size += block.size
            prev.next = nxt
            if nxt is not None:
                nxt.prev = prev
            block = prev
        if nxt is not None and nxt.free and nxt.segment == block.segment:
            self._remove(nxt, small)
            block.size += nxt.size
            block.next = nxt.next
            if nxt.next is not None:
                nxt.next.prev = block
        bisect.insort(self.pools[small], (block.size, block.addr, block))


def replay_allocator(records: list[Record], columns=None):
    """Run the allocator over the records' allocations and frees in event order (at one event,
    frees before allocations; within each, record order): the C build of these rules where one
    is at hand (`vramplan.native`: its peak and totals; `columns`, the records as its arrays, when
    the caller has them), else `replay_in_python`."""
    from vramplan import native

    columns = columns or native.columns(records)
    done = native.replay_allocator(columns) if columns is not None else None
    return done if done is not None else replay_in_python(records)


def replay_in_python(records: list[Record]) -> CachingAllocator:
    """The reference replay: the allocator above, block by block."""
    shift = max(len(records), 1).bit_length()
    mask = (1 << shift) - 1
    keys = []
    append = keys.append
    for i, r in enumerate(records):
        if r.nbytes <= 0:
            continue
        append((((r.alloc_at << 1) | 1) << shift) | i)
        if r.free_at is not None:
            append(((r.free_at << 1) << shift) | i)
    keys.sort()
    alloc = CachingAllocator()
    malloc, free = alloc.malloc, alloc.free
    live: dict[int, _Block] = {}
    pop = live.pop
    for key in keys:
        i = key & mask
        if (key >> shift) & 1:
            live[i] = malloc(records[i].nbytes)
        else:
            block = pop(i, None)
            if block is not None:
                free(block)
    return alloc

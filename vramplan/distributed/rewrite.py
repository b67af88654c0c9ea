"""Rewrite the single-GPU step timeline into one rank's: drop, resize, free early, insert records.

The analytic tier's timeline (`vramplan.estimate.step.build_timeline`) is a list of `Record`s
(bytes, allocation event, free event, category, phase, module) over integer events, and the
phases' first events. A strategy needs to insert allocations between two existing events (an
FSDP all-gather just before a unit's first op, a reduce-scatter output right after its last
gradient): every event `e` becomes `e * SCALE`, and insertions take the free slots around it in
the order they are made.
"""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.estimate.allocator import round_size
from vramplan.footprint import Category
from vramplan.timeline import Record

SCALE = 1 << 16
WEIGHTS = (Category.TRAINABLE_WEIGHTS, Category.FROZEN_WEIGHTS)


def rounded(nbytes: int) -> int:
    """What the CUDA caching allocator hands out for a request (512-byte blocks)."""
    return round_size(nbytes) if nbytes > 0 else 0


@dataclass
class StepWindows:
    """First and last+1 scaled events of one training step's phases."""

    prefix: str
    forward: tuple[int, int]
    backward: tuple[int, int]
    optimizer: tuple[int, int]


class Rewriter:
    def __init__(self, records: list[Record], phases: list[tuple[str, int]], end: int):
        # built directly: dataclasses.replace costs ten times more, and a fit over several GPUs
        # rescales ~10^5 records per candidate; a step's RecordLog makes them from its runs' rows
        scaled = getattr(records, "scaled", None)
        self.records = scaled(SCALE) if scaled is not None else [
            Record(r.nbytes, r.alloc_at * SCALE, None if r.free_at is None else r.free_at * SCALE,
                   r.category, r.phase, r.module, r.op, r.saved) for r in records]
        self.phases = [(name, event * SCALE) for name, event in phases]
        self.end = (end + 1) * SCALE
        self._before: dict[int, int] = {}
        self._after: dict[int, int] = {}
        self.prepared = None    # footprint_build.Prepared of the rewritten records, made by fit's lower bound

    # -- time ------------------------------------------------------------------------------------
    def before(self, event: int) -> int:
        """A fresh slot just before scaled event `event`; later calls come later."""
        n = self._before.get(event, 0)
        self._before[event] = n + 1
        if n >= SCALE // 2 - 1:
            raise RuntimeError("too many insertions before one event")
        return event - SCALE // 2 + n

    def after(self, event: int) -> int:
        """A fresh slot just after scaled event `event`; later calls come later."""
        n = self._after.get(event, 0)
        self._after[event] = n + 1
        if n >= SCALE // 2 - 1:
            raise RuntimeError("too many insertions after one event")
        return event + 1 + n

    def phase_start(self, name: str) -> int | None:
        for phase, event in self.phases:
            if phase == name:
                return event
        return None

    def steps(self) -> list[StepWindows]:
        out = []
        starts = sorted(self.phases, key=lambda p: p[1])
        for prefix in ("", "step 2 "):
            fwd, bwd, opt = (self.phase_start(prefix + n) for n in ("forward", "backward", "optimizer"))
            if fwd is None or bwd is None or opt is None:
                continue
            after = [e for _, e in starts if e > opt]
            out.append(StepWindows(prefix, (fwd, bwd), (bwd, opt), (opt, after[0] if after else self.end)))
        return out

    # -- records ---------------------------------------------------------------------------------
    def add(self, nbytes: int, at: int, free_at: int | None, category: Category, phase: str,
            op: str, module: str = "") -> Record:
        rec = Record(rounded(nbytes), at, free_at, category, phase, module, op)
        if rec.nbytes > 0:
            self.records.append(rec)
        return rec

    def drop(self, predicate, categories: tuple, window: tuple[int, int] | None = None) -> list[Record]:
        """Take out the records of `categories` (allocated within `window`, [first, end) scaled
        events, when given) that `predicate` holds for, in one pass (the rest keep their order);
        the dropped ones, in order. The category and the window are tested first, inline: a
        several-GPU fit drops from some 10^5 records a few times per candidate."""
        kept, dropped = [], []
        keep, drop = kept.append, dropped.append
        lo, hi = window if window is not None else (-(1 << 62), 1 << 62)
        for r in self.records:
            if r.category in categories and lo <= r.alloc_at < hi and predicate(r):
                drop(r)
            else:
                keep(r)
        self.records = kept
        return dropped

    def within(self, window: tuple[int, int]) -> list[Record]:
        start, end = window
        return [r for r in self.records if start <= r.alloc_at < end]

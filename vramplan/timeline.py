"""Allocations over time, and what was live at the peak: shared by every tier.

Each tier reduces a training step to storage records (bytes, when allocated, when freed, which
category, which phase); `analyse()` turns them into the peak, the per-phase peaks and the
composition at the peak. No torch: the analytic tier uses it. Its loops over the records run in C
where `vramplan.native` could be built, in Python otherwise, with the same results.
"""

from __future__ import annotations

import bisect
import gc
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import accumulate

from vramplan.footprint import Category


@contextmanager
def gc_paused(freeze: bool = False):
    """Run a block with Python's cyclic garbage collector off (as it was, after).

    An estimate builds some 10^5 acyclic objects (graph data, records, allocator blocks) that
    live until it returns; the collector, triggered every 700 allocations, would rescan them
    again and again for nothing: a fifth of the run. Reference counting still frees garbage.

    `freeze`: what is alive when the block ends (after a fit search, its kept replays and graphs,
    some 7 * 10^5 objects) is moved to the collector's permanent generation (`gc.freeze`) before
    it is turned back on. Else the first collection after the block scans all of it, young as it
    is: 0.2-0.3 s after an SDXL search, which leaves no cyclic garbage to find (tests/test_timeline.py
    checks). Frozen objects are still freed by reference counting when dropped, but a cycle
    through one is never collected: for a process about to end (the CLI), not a library call.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            if freeze:
                gc.freeze()
            gc.enable()


@dataclass(slots=True)   # tens of thousands per estimate: slots make them cheaper to build and read
class Record:
    nbytes: int
    alloc_at: int
    free_at: int | None = None       # event index; None = still live at the end
    category: Category | None = None
    phase: str = ""
    module: str = ""
    op: str = ""
    saved: bool = False


@dataclass
class Analysis:
    peak_bytes: int
    peak_event: int
    peak_phase: str
    composition: dict                           # Category -> bytes live at the peak
    phase_peaks: list = field(default_factory=list)   # (phase, bytes, composition)


def analyse(records: list[Record], phases: list[tuple[str, int]], constant: dict | None = None,
            columns=None) -> Analysis:
    """Peak of live bytes over the events. `phases` is [(name, first event)], in order.

    `constant` adds bytes present throughout (e.g. weights the trace does not hold). `columns`:
    the records as `vramplan.native.Columns`, when the caller has them already.
    """
    base = sum((constant or {}).values())
    # lives[j]: bytes live after events[j - 1] (lives[0]: before any); maxima are taken over runs
    # of it in C, the first of equal values winning as a scan with `>` would have it
    from vramplan import native

    columns = columns or native.columns(records)
    curve = native.live_curve(columns, base) if columns is not None else None
    events, lives = curve if curve is not None else _live_curve(records, base)
    peak = max(lives)
    at = lives.index(peak)
    peak_event = events[at - 1] if at else 0
    bounds = sorted(phases, key=lambda p: p[1])
    phase_best: dict[str, tuple[int, int]] = {}

    def run(name: str, first: int, stop: int) -> None:
        """The events events[first:stop], all in phase `name`."""
        if first < stop:
            best = max(lives[first + 1:stop + 1])
            if best > phase_best.get(name, (-1, 0))[0]:
                phase_best[name] = (best, events[lives.index(best, first + 1, stop + 1) - 1])

    firsts = [bisect.bisect_left(events, start) for _, start in bounds]   # first event of each phase
    run("", 0, firsts[0] if bounds else len(events))
    for k, (name, start) in enumerate(bounds):
        first = firsts[k]
        if first == len(events):
            # no event from here on: what is live at the end counts for the phases not reached
            for name, start in bounds[k:]:
                phase_best.setdefault(name, (lives[-1], start))
            break
        # entering a phase: what is live when it starts counts for it
        if lives[first] > phase_best.get(name, (-1, 0))[0]:
            phase_best[name] = (lives[first], max(start - 1, 0))
        run(name, first, firsts[k + 1] if k + 1 < len(bounds) else len(events))
    peak_phase = ""
    for name, start in bounds:
        if start <= peak_event:
            peak_phase = name
    wanted = [phase_best[name][1] for name, _ in bounds] + [peak_event]
    compositions = compositions_at(records, wanted, constant, columns)
    phase_peaks = [(name, phase_best[name][0], compositions[phase_best[name][1]]) for name, _ in bounds]
    return Analysis(peak, peak_event, peak_phase, compositions[peak_event], phase_peaks)


def _live_curve(records: list[Record], base: int) -> tuple[list, list]:
    """The events some record touches, ascending, and the bytes live before the first and after
    each (native.live_curve is the same in C)."""
    deltas: dict[int, int] = {}
    get = deltas.get
    for r in records:
        nbytes, at, free = r.nbytes, r.alloc_at, r.free_at
        deltas[at] = get(at, 0) + nbytes
        if free is not None:
            deltas[free] = get(free, 0) - nbytes
    events = sorted(deltas)
    return events, list(accumulate([deltas[e] for e in events], initial=base))


def compositions_at(records: list[Record], events: list[int], constant: dict | None = None,
                    columns=None) -> dict:
    """`composition_at` for several events in one pass over the records (in C where
    `vramplan.native` is built: `columns`, or the records made into them)."""
    from vramplan import native

    targets = sorted(set(events))
    columns = columns or native.columns(records)
    if columns is not None:
        sums = native.compositions(columns, targets, Category.TEMPORARIES)
        out = {}
        for target, found in zip(targets, sums):
            comp = dict(constant or {})
            for key, nbytes in found.items():
                comp[key] = comp.get(key, 0) + nbytes
            out[target] = comp
        return out
    comps = [dict(constant or {}) for _ in targets]
    n = len(targets)
    bisect_left = bisect.bisect_left
    temporaries = Category.TEMPORARIES
    for r in records:
        lo = bisect_left(targets, r.alloc_at)
        if lo == n:
            continue
        free = r.free_at
        if free is None:
            hi = n
        elif targets[lo] >= free:
            continue   # freed before the next target: most records
        else:
            hi = bisect_left(targets, free, lo)
        key = r.category or temporaries
        nbytes = r.nbytes
        for k in range(lo, hi):
            comp = comps[k]
            comp[key] = comp.get(key, 0) + nbytes
    return dict(zip(targets, comps))


def composition_at(records: list[Record], event: int, constant: dict | None = None) -> dict:
    out = dict(constant or {})
    for r in records:
        if r.alloc_at <= event and (r.free_at is None or r.free_at > event):
            key = r.category or Category.TEMPORARIES
            out[key] = out.get(key, 0) + r.nbytes
    return out

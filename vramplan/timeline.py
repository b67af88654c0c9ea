"""Allocations over time, and what was live at the peak: shared by every tier.

Each tier reduces a training step to storage records (bytes, when allocated, when freed, which
category, which phase); `analyse()` turns them into the peak, the per-phase peaks and the
composition at the peak. Pure Python: the analytic tier uses it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vramplan.footprint import Category


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


def analyse(records: list[Record], phases: list[tuple[str, int]], constant: dict | None = None) -> Analysis:
    """Peak of live bytes over the events. `phases` is [(name, first event)], in order.

    `constant` adds bytes present throughout (e.g. weights the trace does not hold).
    """
    base = sum((constant or {}).values())
    deltas: dict[int, int] = {}
    for r in records:
        deltas[r.alloc_at] = deltas.get(r.alloc_at, 0) + r.nbytes
        if r.free_at is not None:
            deltas[r.free_at] = deltas.get(r.free_at, 0) - r.nbytes
    live, peak, peak_event = base, base, 0
    bounds = sorted(phases, key=lambda p: p[1])
    phase_best: dict[str, tuple[int, int]] = {}
    pi = -1
    for event in sorted(deltas):
        # entering a phase: what is live when it starts counts for it
        while pi + 1 < len(bounds) and bounds[pi + 1][1] <= event:
            pi += 1
            name = bounds[pi][0]
            if live > phase_best.get(name, (-1, 0))[0]:
                phase_best[name] = (live, max(bounds[pi][1] - 1, 0))
        live += deltas[event]
        name = bounds[pi][0] if pi >= 0 else ""
        if live > phase_best.get(name, (-1, 0))[0]:
            phase_best[name] = (live, event)
        if live > peak:
            peak, peak_event = live, event
    for name, start in bounds[pi + 1:]:
        phase_best.setdefault(name, (live, start))
    peak_phase = ""
    for name, start in bounds:
        if start <= peak_event:
            peak_phase = name
    wanted = [phase_best[name][1] for name, _ in bounds] + [peak_event]
    compositions = compositions_at(records, wanted, constant)
    phase_peaks = [(name, phase_best[name][0], compositions[phase_best[name][1]]) for name, _ in bounds]
    return Analysis(peak, peak_event, peak_phase, compositions[peak_event], phase_peaks)


def compositions_at(records: list[Record], events: list[int], constant: dict | None = None) -> dict:
    """`composition_at` for several events in one pass over the records."""
    import bisect

    targets = sorted(set(events))
    out = {e: dict(constant or {}) for e in targets}
    for r in records:
        lo = bisect.bisect_left(targets, r.alloc_at)
        hi = len(targets) if r.free_at is None else bisect.bisect_left(targets, r.free_at)
        if lo >= hi:
            continue
        key = r.category or Category.TEMPORARIES
        for e in targets[lo:hi]:
            comp = out[e]
            comp[key] = comp.get(key, 0) + r.nbytes
    return out


def composition_at(records: list[Record], event: int, constant: dict | None = None) -> dict:
    out = dict(constant or {})
    for r in records:
        if r.alloc_at <= event and (r.free_at is None or r.free_at > event):
            key = r.category or Category.TEMPORARIES
            out[key] = out.get(key, 0) + r.nbytes
    return out

"""A lower bound of one rank's device used under a strategy, counted without the rewrite.

`fit` rules most several-GPU candidates out by their device floor (`fit.walk.device_floor`:
the rewritten step's peak of live bytes plus the CUDA context), but that floor needs the
strategy's rewrite, 15-120 ms a candidate for SDXL (ZeRO-3's working set, FSDP's units). This
bound needs only the single-GPU step, which the candidates of every strategy share, and the
strategy's model-state sizes:

* kept: the step's records that no rewrite drops or changes. A rewrite drops the load-phase
  weights the engine takes over (`zero.moved_at_load`, `fsdp.moved_at_load`: the rules the
  rewrites apply), optimizer states, the optimizer phase's temporaries and the autocast cache,
  and changes gradients; the rest it keeps as it is and adds to (DDP only adds). Taken out here:
  every gradient, state and autocast cast, every temporary of an optimizer phase (the
  "unchanged" records), and the moved weights, which the step loads before its first forward
  and never frees: from the first forward on, their bytes come off every event's live bytes
  (before it, at most those bytes).
* added: what the rewrite allocates at load and never frees (`resident`: ZeRO's flat buffer or
  partitions, fp32 master, stage 3's bucket and gradient partition; FSDP's shards), and the
  optimizer states it adds in the first step's optimizer phase and never frees (`states`).

The rewritten records hold, at every event, the kept ones as they were, those additions from
when they are made, and more besides: so the most bytes live at once over the kept records,
with `resident` from the first forward and `states` after the first optimizer phase starts,
plus the CUDA context, never exceeds the device floor, nor the estimate
(tests/distributed/test_floor.py checks both, and that each rewrite's drops and changes are
within what is taken out here).

The unchanged records' peaks before, during and after those two points are made once per
shared step (`step.kept_for_shared_timeline`): a candidate then costs its sizes and a sum.
"""

from __future__ import annotations

import bisect

from vramplan import native
from vramplan.distributed import fsdp, zero
from vramplan.distributed.plan import _fsdp_units, fsdp_itemsizes, graph_spec, step_seen_as, zero_model_itemsize
from vramplan.distributed.rewrite import WEIGHTS, Rewriter
from vramplan.estimate.overheads import cuda_context_bytes
from vramplan.estimate.replay import cuda_rounded
from vramplan.estimate.step import (build_timeline, kept_for_shared_timeline, kept_for_tensors, step_tensors,
                                    trained_tensors)
from vramplan.footprint import Category
from vramplan.spec import Strategy, TrainingSpec
from vramplan.timeline import _live_curve

CHANGED = (Category.GRADIENTS, Category.OPTIMIZER_STATES, Category.AUTOCAST_CACHE)


def strategy_floor(spec: TrainingSpec, inventories: dict) -> int:
    """A lower bound of `spec`'s device used per GPU (see the module's docstring); 0 when the
    spec's step has no optimizer phase to place the states after, or is not one DeepSpeed runs."""
    trained = trained_tensors(spec, inventories)
    units = None
    strategy = spec.strategy
    if strategy is Strategy.DDP:
        moved, resident, states, family = None, 0, 0, None
    elif strategy is Strategy.FSDP:
        units, trainable = _fsdp_units(spec, inventories, trained)
        moved, family = fsdp.moved_at_load(units), ("fsdp",)
        resident, states = fsdp.fsdp_resident(spec, units, trainable, *fsdp_itemsizes(spec), spec.num_gpus)
    elif len(trained) != 1:
        return 0        # DeepSpeed runs one model: the rewrite says so (a UsageError), not this bound
    else:
        comp, = trained
        sizes = zero.zero_sizes(spec, comp, inventories[comp], trained[comp], zero_model_itemsize(spec),
                                spec.num_gpus)
        moved = zero.moved_at_load(sizes.stage, comp, {f"{comp}.{t.name}" for t in trained[comp]})
        family = ("zero", sizes.stage == 3)
        resident, states = sizes.resident_bytes, sizes.state_bytes
    step_spec = graph_spec(spec)
    unchanged = moved is not None
    with step_seen_as(spec, units):
        peaks = kept_for_shared_timeline(step_spec, inventories,
                                         lambda: kept_peaks(build_timeline(step_spec, inventories), unchanged),
                                         "strategy floor", unchanged)
        # the moved weights' bytes, kept per weights and strategy (the rule reads nothing else)
        gone = kept_for_tensors(step_spec, inventories, lambda: sum(
            cuda_rounded(t.nbytes) for t in step_tensors(step_spec, inventories)[1]
            if t.category in WEIGHTS and moved(t.name)), "strategy floor, moved", family) if unchanged else 0
    if peaks is None:
        return 0
    before, between, after = peaks
    return max(before - gone, between - gone + resident, after - gone + resident + states, 0) + \
        cuda_context_bytes(spec.gpu)


def kept_peaks(timeline, unchanged: bool) -> tuple[int, int, int] | None:
    """The most bytes live at once over the timeline's records (`unchanged`: less every record
    of the CHANGED categories and every temporary of an optimizer phase): before the first
    step's forward, from it through the first optimizer phase's first event, after that (scaled
    events, as the rewrite counts them). None without an optimizer phase."""
    rw = Rewriter(timeline.records, timeline.clock.phases, timeline.clock.now)
    steps = rw.steps()
    if not steps:
        return None
    windows = [step.optimizer for step in steps]
    cuts = [steps[0].forward[0], steps[0].optimizer[0] + 1]
    made = rw.base_columns() if native.library() is not None else None
    if made is not None:
        nbytes, alloc_at, free_at, codes = made
        if unchanged:
            index = native.category_codes(Category.TEMPORARIES)[0]
            nbytes = nbytes[:]
            native.zero_where(nbytes, codes, alloc_at, [index[c] for c in CHANGED], index[Category.TEMPORARIES],
                              windows)
        peaks = native.live_peaks(native.Columns.of_arrays(nbytes, alloc_at, free_at, codes,
                                                           default=Category.TEMPORARIES, records=None), cuts)
        if peaks is not None:
            return tuple(peaks)
    records = list(rw.records)
    if unchanged:
        records = [r for r in records if r.category not in CHANGED and not (
            r.category in (Category.TEMPORARIES, None) and any(lo <= r.alloc_at < hi for lo, hi in windows))]
    events, lives = _live_curve(records, 0)
    i, j = bisect.bisect_left(events, cuts[0]), bisect.bisect_left(events, cuts[1])
    after = lives[1:]          # lives[k + 1]: after events[k]
    return max(after[:i], default=0), max(after[i:j], default=0), max(after[j:], default=0)

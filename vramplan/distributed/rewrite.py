"""Rewrite the single-GPU step timeline into one rank's: drop, resize, free early, insert records.

The analytic tier's timeline (`vramplan.estimate.step.build_timeline`) is a list of `Record`s
(bytes, allocation event, free event, category, phase, module) over integer events, and the
phases' first events. A strategy needs to insert allocations between two existing events (an
FSDP all-gather just before a unit's first op, a reduce-scatter output right after its last
gradient): every event `e` becomes `e * SCALE`, and insertions take the free slots around it in
the order they are made.

The step's records are read where they are (`_Base`: the timeline's runs and their columns),
not copied: a several-GPU fit rewrites some 10^5 records per candidate, and a strategy touches a
few categories of them (weights at load, gradients, optimizer states, the optimizer's
temporaries). A record the rewrite reads becomes its own `Record`, made once (`_own`): the
rewrite may change its bytes and its free event -- never its allocation, category, phase, module
or op -- and the result reads that object. `records` is the result: the step's records less the
dropped ones, in their order, then the added ones; as C arrays made from the runs' columns
(`RewrittenRecords.columns`), as `Record`s only for a reader that iterates.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from vramplan import native
from vramplan.estimate.allocator import round_size
from vramplan.estimate.record_log import _CODE, ReadAsList, RecordLog, _run_columns, _scaled
from vramplan.footprint import Category
from vramplan.native import NEVER
from vramplan.timeline import Record

SCALE = 1 << 16
WEIGHTS = (Category.TRAINABLE_WEIGHTS, Category.FROZEN_WEIGHTS)
_UNBOUNDED = (-(1 << 62), 1 << 62)


def made_afresh(make, *parts):
    """A rewrite's `kept` when nothing is kept: `make()`."""
    return make()


def optimizer_temporary(r) -> bool:
    """A temporary of the optimizer step itself (the step's optimizer rows name no op, no module):
    what the strategies replace with their own step. A module-level function, so that it keys
    itself (`Rewriter.drop`'s `key`)."""
    return r.op == "" and r.module == ""


def kept_by_identity(cache: list, pins: tuple, make, size: int = 4):
    """`make()`, or what it made for the same `pins`: objects by identity, ints and strings by
    value. `cache` holds the last `size`: what a rewrite derives from the model and the trained
    tensors alone, which a search passes as the same objects candidate after candidate."""
    for known, made in cache:
        if len(known) == len(pins) and all(a is b or (type(a) in (int, str) and a == b) for a, b in zip(known, pins)):
            return made
    made = make()
    cache.insert(0, (pins, made))
    del cache[size:]
    return made


def widen(spans: dict, key, first: int, last: int) -> None:
    """spans[key], a [first, last] pair of events, widened to hold first..last (made if absent):
    the module and unit spans every strategy reads."""
    span = spans.get(key)
    if span is None:
        spans[key] = [first, last]
    else:
        if first < span[0]:
            span[0] = first
        if last > span[1]:
            span[1] = last


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


class _Base:
    """The step's records as the rewrite found them, read in place: the timeline's runs (lists
    of Records, `record_log.Shifted` windows, the log's tail) with their first index, events
    read times SCALE."""

    def __init__(self, records):
        runs = getattr(records, "runs", None)
        if runs is not None and getattr(records, "_flat", None) is None:
            runs = list(runs) + [records.tail]
        else:                              # a list, or a log already read as one
            runs = [records if isinstance(records, list) else list(records)]
        self.runs, self.starts, start = [], [], 0
        for run in runs:
            if len(run):
                self.runs.append(run)
                self.starts.append(start)
                start += len(run)
        self.n = start
        self._columns = False
        self._groups: dict = {}
        self._ranges: list = [None] * len(self.runs)

    def columns(self) -> tuple | None:
        """(nbytes, alloc_at, free_at, codes) of every record, events scaled (made once; the
        caller copies before changing them); None without the C library or where a category is
        not a `Category`."""
        if self._columns is False:
            made = _run_columns(self.runs) if native.library() is not None else None
            if made is not None:
                native.scale(made[1], made[2], SCALE)
            self._columns = made
        return self._columns

    def of_category(self, category, k: int) -> list[int]:
        """Run k's records that may be of `category`, ascending: a window's rows by their kept
        groups, its handles and list runs by their Record (the caller checks each record's
        category itself). Made once per run and category, for the runs a caller reads (a
        window's temporaries are most of its rows)."""
        known = self._groups.get((category, k))
        if known is not None:
            return known
        run = self.runs[k]
        if isinstance(run, list):
            found = [j for j, r in enumerate(run) if r.category is category]
        else:
            handles = run.handles
            found = run.rows.of_category(category)
            if handles:
                found = sorted([j for j in found if j not in handles] +
                               [j for j, r in handles.items() if r.category is category])
        self._groups[(category, k)] = found
        return found

    def alloc_range(self, k: int) -> tuple[int, int]:
        """[first, last + 1) scaled allocation events of run k's records."""
        known = self._ranges[k]
        if known is None:
            run = self.runs[k]
            if isinstance(run, list):
                first, last = min(r.alloc_at for r in run), max(r.alloc_at for r in run)
            else:
                first, last = (a + run.offset for a in run.rows.alloc_bounds())
            known = self._ranges[k] = (first * SCALE, (last + 1) * SCALE)
        return known

    def record(self, k: int, j: int) -> Record:
        """Record j of run k as a fresh Record, scaled."""
        run = self.runs[k]
        return _scaled(run[j], SCALE) if isinstance(run, list) else run.scaled_record(j, SCALE)

    def alloc_at(self, k: int, j: int) -> int:
        """Record j of run k's scaled allocation event."""
        columns = self.columns()
        if columns is not None:
            return columns[1][self.starts[k] + j]
        run = self.runs[k]
        if isinstance(run, list):
            return run[j].alloc_at * SCALE
        return (run.rows.row(j)[1] + run.offset) * SCALE


class _Fields:
    """What a drop's predicate reads of a window's row (one object, filled row by row)."""

    __slots__ = ("category", "phase", "module", "op", "saved")


class Rewriter:
    def __init__(self, records, phases: list[tuple[str, int]], end: int):
        self._base = _Base(records)
        self._dropped = bytearray(self._base.n)      # base index -> 1 once dropped
        self._dropped_in: dict[int, list[int]] = {}   # run -> its records dropped
        self._owned: dict[int, Record] = {}           # base index -> the rewrite's own Record
        self._added: list[Record] = []
        self._version = 0
        self._view = None
        self.phases = [(name, event * SCALE) for name, event in phases]
        self.end = (end + 1) * SCALE
        self._before: dict[int, int] = {}
        self._after: dict[int, int] = {}
        self.prepared = None    # footprint_build.Prepared of the rewritten records, made by fit's lower bound

    def base_columns(self) -> tuple | None:
        """(nbytes, alloc_at, free_at, codes) of the step's records as found, events scaled:
        read-only (`_Base.columns`)."""
        return self._base.columns()

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
    def _own(self, k: int, j: int) -> Record:
        """Record j of run k as the rewrite's own (made once): what it changes and reads back."""
        i = self._base.starts[k] + j
        r = self._owned.get(i)
        if r is None:
            r = self._owned[i] = self._base.record(k, j)
            self._version += 1        # a view made before holds a copy of it, not it
        return r

    def _candidates(self, categories: tuple, window: tuple[int, int] | None) -> list[tuple[int, list[int]]]:
        """(run, its records) of the records not dropped that may be of `categories`, allocated
        within `window` (scaled [first, end); None: any), in record order."""
        base, dropped = self._base, self._dropped
        lo, hi = window if window is not None else _UNBOUNDED
        out = []
        for k, start in enumerate(base.starts):
            first, end = base.alloc_range(k) if window is not None else _UNBOUNDED
            if end <= lo or first >= hi:
                continue
            found = [group for group in (base.of_category(category, k) for category in categories) if group]
            if not found:
                continue
            found = found[0] if len(found) == 1 else list(heapq.merge(*found))
            if lo <= first and end <= hi:          # the whole run is within the window
                found = [j for j in found if not dropped[start + j]]
            elif base.columns() is not None:
                alloc = base.columns()[1]
                found = [j for j in found if not dropped[start + j] and lo <= alloc[start + j] < hi]
            else:
                found = [j for j in found if not dropped[start + j] and lo <= base.alloc_at(k, j) < hi]
            if found:
                out.append((k, found))
        return out

    def add(self, nbytes: int, at: int, free_at: int | None, category: Category, phase: str,
            op: str, module: str = "") -> Record:
        rec = Record(rounded(nbytes), at, free_at, category, phase, module, op)
        if rec.nbytes > 0:
            self._added.append(rec)
            self._version += 1
        return rec

    def of_categories(self, categories: tuple, window: tuple[int, int] | None = None) -> list[Record]:
        """The records of `categories` (allocated within `window`, scaled [first, end), when
        given), in record order: the rewrite's own, to change."""
        lo, hi = window if window is not None else _UNBOUNDED
        out = [r for k, found in self._candidates(categories, window) for r in (self._own(k, j) for j in found)
               if r.category in categories]
        out += [r for r in self._added if r.category in categories and lo <= r.alloc_at < hi]
        return out

    def _matching(self, predicate, categories: tuple, window: tuple[int, int] | None, key=None):
        """(run, its records of `categories` allocated within `window` that `predicate` holds
        for, ascending) for each run holding some, not dropped. `predicate` sees a window's rows
        through one `_Fields`, none made into a Record; with a `key` that names it, what it
        found in a window's rows is kept with them (`Rows.matching`)."""
        base, owned = self._base, self._owned
        fields = _Fields()
        # a window's rows are grouped by their category codes, exact but for TEMPORARIES (a row
        # without a category counts there): with no predicate the others need no reading
        unread = predicate is None and Category.TEMPORARIES not in categories
        for k, found in self._candidates(categories, window):
            run, start = base.runs[k], base.starts[k]
            listed = isinstance(run, list)
            handles = {} if listed else run.handles
            if unread and not listed:
                fields.category = categories[0]        # a row's: one of its group's
                taken = [j for j in found if (owned.get(start + j) or handles.get(j) or fields).category in categories]
            elif key is not None and not listed:
                matches = run.rows.matching(key, run.prefix, categories, predicate, fields)
                taken = []
                for j in found:
                    r = owned.get(start + j) or handles.get(j)
                    if r is None:
                        if j in matches:
                            taken.append(j)
                    elif r.category in categories and predicate(r):
                        taken.append(j)
            else:
                # the rows as tuples, made once per window and kept with it (its other readers too)
                rows, prefix, taken = None if listed else run.rows.rows, None if listed else run.prefix, []
                for j in found:
                    r = owned.get(start + j) or (run[j] if listed else handles.get(j))
                    if r is None:
                        _, _, _, fields.category, phase, fields.module, fields.op, fields.saved = rows[j]
                        fields.phase = prefix + phase
                        r = fields
                    if r.category in categories and (predicate is None or predicate(r)):
                        taken.append(j)
            if taken:
                yield k, taken

    def _added_matching(self, predicate, categories: tuple, window: tuple[int, int] | None):
        lo, hi = window if window is not None else _UNBOUNDED
        return [r for r in self._added
                if r.category in categories and lo <= r.alloc_at < hi and (predicate is None or predicate(r))]

    def nbytes_of(self, predicate, categories: tuple, window: tuple[int, int] | None = None, key=None) -> int:
        """The bytes of the records `drop(predicate, categories, window, key)` would take out,
        read without making them the rewrite's own."""
        base, owned, total = self._base, self._owned, 0
        for k, taken in self._matching(predicate, categories, window, key):
            run, start = base.runs[k], base.starts[k]
            if isinstance(run, list):
                total += sum((owned.get(start + j) or run[j]).nbytes for j in taken)
                continue
            rows, handles = run.rows.rows, run.handles
            for j in taken:
                r = owned.get(start + j) or handles.get(j)
                total += rows[j][0] if r is None else r.nbytes
        return total + sum(r.nbytes for r in self._added_matching(predicate, categories, window))

    def drop(self, predicate, categories: tuple, window: tuple[int, int] | None = None, key=None) -> list[int]:
        """Take out the records of `categories` (allocated within `window`, [first, end) scaled
        events, when given) that `predicate` holds for (None: all of them; the rest keep their
        order); the dropped ones' allocation events, in order. `predicate` reads a record's
        category, phase, module, op and saved, never its bytes or events (a several-GPU fit
        drops some 10^4 of its 10^5 records per candidate: `_matching` makes none of them).
        `key`: a hashable name of the predicate, the same only for the same predicate (what it
        holds for in a window's rows is then kept with them)."""
        base, dropped = self._base, []
        mask = self._dropped
        for k, taken in self._matching(predicate, categories, window, key):
            start = base.starts[k]
            for j in taken:
                mask[start + j] = 1
            columns = base.columns()
            if columns is not None:
                alloc = columns[1]
                dropped += [alloc[start + j] for j in taken]
            else:
                dropped += [base.alloc_at(k, j) for j in taken]
            self._dropped_in.setdefault(k, []).extend(taken)
        gone = self._added_matching(predicate, categories, window)
        if gone:
            dropped += [r.alloc_at for r in gone]
            gone = {id(r) for r in gone}
            self._added = [r for r in self._added if id(r) not in gone]
        self._version += 1
        return dropped

    def module_spans(self, window: tuple[int, int]) -> dict[str, list[int]]:
        """{module: [first, last] scaled allocation event} over the records allocated within
        `window` (scaled [first, end)), those without a module left out. A window's rows are
        spanned once per relative window and rows dropped (`Rows.module_spans`)."""
        lo, hi = window
        first_event, end_event = -(-lo // SCALE), -(-hi // SCALE)    # the unscaled events inside
        spans: dict[str, list[int]] = {}
        dropped = self._dropped
        for k, (start, run) in enumerate(zip(self._base.starts, self._base.runs)):
            first, end = self._base.alloc_range(k)
            if end <= lo or first >= hi:
                continue
            if isinstance(run, list):
                for j, r in enumerate(run):
                    at = r.alloc_at * SCALE
                    if r.module and lo <= at < hi and not dropped[start + j]:
                        widen(spans, r.module, at, at)
                continue
            off = run.offset
            skip = frozenset(self._dropped_in.get(k, ()))
            for module, (first, last) in run.rows.module_spans(first_event - off, end_event - off, skip).items():
                widen(spans, module, (first + off) * SCALE, (last + off) * SCALE)
        for r in self._added:
            if r.module and lo <= r.alloc_at < hi:
                widen(spans, r.module, r.alloc_at, r.alloc_at)
        return spans

    @property
    def records(self) -> "RewrittenRecords":
        """The rewritten records: the step's less the dropped ones, in their order, then the
        added ones (the same object until the rewrite changes again)."""
        if self._view is None or self._view.version != self._version:
            self._view = RewrittenRecords(self)
        return self._view


class RewrittenRecords(ReadAsList):
    """A rewrite's records as a reader takes them: iterated, indexed, counted and extended like
    a list (`Record`s made on first use), or as C arrays (`columns`) and searched by op
    (`first_alloc`) without making them."""

    def __init__(self, rw: Rewriter):
        # what it reads of the rewrite, not the rewrite itself, which keeps it: no reference
        # cycle, which the CLI's frozen collector would never free (tests/test_timeline.py)
        self.version = rw._version
        self._base, self._owned = rw._base, rw._owned
        self._dropped = bytes(rw._dropped)
        self._any_dropped = bool(rw._dropped_in)
        self._added = list(rw._added)
        self.tail: list = []
        self._flat = None

    # -- as a list -------------------------------------------------------------------------------
    def _list(self) -> list:
        if self._flat is None:
            owned, dropped = self._owned, self._dropped
            out = [owned.get(i, r) for i, r in enumerate(RecordLog(self._base.runs).scaled(SCALE)) if not dropped[i]]
            out.extend(self._added)
            out.extend(self.tail)
            self._flat = out
        return self._flat

    def __len__(self) -> int:
        return self._base.n - self._dropped.count(1) + len(self._added) + len(self.tail)

    # -- without making them ---------------------------------------------------------------------
    def first_alloc(self, ops: frozenset, lo: int | None = None, hi: int | None = None) -> int | None:
        """The allocation event of the first record, in record order, whose op is in `ops` and
        whose allocation is in [lo, hi) (None: unbounded)."""
        def wanted(at):
            return (lo is None or lo <= at) and (hi is None or at < hi)

        base, dropped = self._base, self._dropped
        for start, run in zip(base.starts, base.runs):
            if isinstance(run, list):
                found = next((r.alloc_at * SCALE for j, r in enumerate(run)
                              if r.op in ops and not dropped[start + j] and wanted(r.alloc_at * SCALE)), None)
            else:
                off = run.offset
                found = next(((a + off) * SCALE for j, a in run.rows.allocs_of(ops)
                              if not dropped[start + j] and wanted((a + off) * SCALE)), None)
            if found is not None:
                return found
        return next((r.alloc_at for r in self._added + self.tail if r.op in ops and wanted(r.alloc_at)), None)

    def columns(self, extra=()):
        """The records and `extra` as `native.Columns`, made from the runs' columns (None
        without the C library)."""
        if native.library() is None:
            return None
        made = self._base.columns()
        if made is None:                  # a category from outside the enum: record by record
            return native.Columns(list(self), extra)
        nbytes, alloc_at, free_at, codes = (column[:] for column in made)
        for i, r in self._owned.items():
            nbytes[i] = r.nbytes
            free_at[i] = NEVER if r.free_at is None else r.free_at
        if self._any_dropped:
            native.keep(self._dropped, [nbytes, alloc_at, free_at, codes])
        rest = self._added + self.tail + list(extra)
        try:
            codes.extend([_CODE[r.category] for r in rest])
        except KeyError:
            return native.Columns(list(self), extra)
        nbytes.extend([r.nbytes for r in rest])
        alloc_at.extend([r.alloc_at for r in rest])
        free_at.extend([NEVER if r.free_at is None else r.free_at for r in rest])
        return native.Columns.of_arrays(nbytes, alloc_at, free_at, codes, default=Category.TEMPORARIES,
                                        records=lambda: list(self) + list(extra))

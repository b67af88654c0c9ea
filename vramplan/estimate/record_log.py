"""A step's records as runs: records made one by one, and re-applied windows kept as columns.

Why: fit builds the step of every candidate it looks at, and most of an SDXL step (some 50 000
of its 57 000 records) is windows re-applied at another clock (`step._Window`) and the second
step copied from the first. Making those into `Record` objects and then into C arrays took about
45 ms per candidate, more than everything else a candidate's step needs once its replays are
kept. Here a re-applied run is its rows (`Rows`, made once per window) and where they go
(`Shifted`: an offset, a free limit, a phase prefix): the C arrays of a step are shifted copies
of the rows' arrays (`vramplan.native`), and `Record` objects are made only for a reader that
iterates (the distributed rewrite, validate, the Python versions where C is not built). Either
way a reader sees the same records, in the same order, as if each had been made one by one.
"""

from __future__ import annotations

from array import array
from itertools import chain

from vramplan import native
from vramplan.footprint import Category
from vramplan.native import NEVER
from vramplan.timeline import Record

# category codes, as `native.Columns.codes(Category.TEMPORARIES)` numbers them, and back
_CODE, _KINDS = native.category_codes(Category.TEMPORARIES)


class Rows:
    """Records relative to an event, as tuples (nbytes, alloc_at, free_at or None, category,
    phase, module, op, saved) in record order, with their columns made on first use."""

    __slots__ = ("_rows", "n", "_columns", "_ops", "op_names", "_groups", "_spans", "_bounds", "_matches")

    def __init__(self, rows: tuple, op_names: frozenset | None = None):
        self._rows = rows
        self.n = len(rows)
        self._columns = None
        self._ops: dict = {}
        self.op_names = op_names     # every row's op is one of these (None: not known)
        self._groups = None
        self._spans: dict = {}
        self._bounds = None
        self._matches: dict = {}

    @property
    def rows(self) -> tuple:
        return self._rows

    def row(self, i: int) -> tuple:
        return self.rows[i]

    @classmethod
    def of(cls, records, base: int = 0) -> "Rows":
        return cls(tuple((r.nbytes, r.alloc_at - base, None if r.free_at is None else r.free_at - base,
                          r.category, r.phase, r.module, r.op, r.saved) for r in records))

    def columns(self) -> tuple | None:
        """(nbytes, alloc_at, free_at with NEVER, category codes) as arrays; None when a row's
        category is not a `Category` (then readers take the records)."""
        if self._columns is None:
            rows = self.rows
            try:
                codes = array("q", [_CODE[r[3]] for r in rows])
            except KeyError:
                codes = None
            self._columns = (array("q", [r[0] for r in rows]), array("q", [r[1] for r in rows]),
                             array("q", [NEVER if r[2] is None else r[2] for r in rows]), codes)
        return self._columns if self._columns[3] is not None else None

    def allocs_of(self, ops: frozenset) -> list:
        """(row, alloc_at) of the rows whose op is in `ops`, in row order."""
        found = self._ops.get(ops)
        if found is None and self.op_names is not None and self.op_names.isdisjoint(ops):
            found = self._ops[ops] = []
        if found is None:
            found = self._ops[ops] = self._allocs_of(ops)
        return found

    def _allocs_of(self, ops: frozenset) -> list:
        return [(i, r[1]) for i, r in enumerate(self.rows) if r[6] in ops]

    def of_category(self, category) -> list:
        """The rows of `category`, ascending. Kept: the distributed rewrite asks for a few
        categories of the same windows' rows for every candidate of a several-GPU fit."""
        if self._groups is None:
            self._groups = {}
        known = self._groups.get(category)
        if known is not None:
            return known
        columns = self.columns()
        if columns is not None and native.library() is not None:
            # one category's rows found in C: a window's rows are mostly temporaries and
            # activations, which the rewrite seldom asks for
            code = _CODE.get(category) if isinstance(category, Category) else None
            found = [] if code is None else native.indices_of(columns[3], code)
        else:
            groups: dict = {}
            if columns is not None:
                for i, code in enumerate(columns[3]):
                    groups.setdefault(_KINDS[code], []).append(i)
            else:
                for i, r in enumerate(self.rows):
                    groups.setdefault(r[3], []).append(i)
            self._groups = groups
            found = groups.get(category, [])
        self._groups[category] = found
        return found

    def matching(self, key, prefix: str, categories: tuple, predicate, fields) -> frozenset:
        """The rows of `categories` that `predicate` holds for, read through `fields` (an object
        with category, phase -- `prefix` in front --, module, op and saved), kept under `key`,
        which names the predicate: the distributed rewrite drops the same rows of the same
        windows for every candidate that shares them."""
        known = self._matches.get((key, prefix, categories))
        if known is None:
            found = []
            for category in categories:
                for j in self.of_category(category):
                    _, _, _, fields.category, phase, fields.module, fields.op, fields.saved = self.row(j)
                    fields.phase = prefix + phase
                    if fields.category in categories and predicate(fields):
                        found.append(j)
            known = self._matches[(key, prefix, categories)] = frozenset(found)
        return known

    def alloc_bounds(self) -> tuple[int, int]:
        """The first and last allocation event of the rows (kept)."""
        if self._bounds is None:
            columns = self.columns()
            events = columns[1] if columns is not None else [r[1] for r in self.rows]
            self._bounds = (min(events), max(events))
        return self._bounds

    def module_spans(self, lo: int, hi: int, skip: frozenset = frozenset()) -> dict:
        """{module: (first, last) allocation} over the rows allocated in [lo, hi) but those in
        `skip`, rows without a module left out; kept per (lo, hi, skip), like `of_category`."""
        key = (lo, hi, skip)
        found = self._spans.get(key)
        if found is None:
            found = {}
            for i, r in enumerate(self.rows):
                at, module = r[1], r[5]
                if not module or not lo <= at < hi or (skip and i in skip):
                    continue
                span = found.get(module)
                if span is None:
                    found[module] = (at, at)
                elif at < span[0]:
                    found[module] = (at, span[1])
                elif at > span[1]:
                    found[module] = (span[0], at)
            if len(self._spans) >= 16:
                self._spans.clear()
            self._spans[key] = found
        return found


class ColumnRows(Rows):
    """Rows kept as their columns (made in C, or another window's rows resized), the tuples made
    only if the whole of them is read (`make()`): a step reads its replays' rows through the
    columns, and a few rows (its handles) through `row(i)`. Why: the tuples of an SDXL denoiser
    replay are some 50 000 objects, made for nothing when only the C arrays read them."""

    __slots__ = ("_make", "_row", "_allocs")

    def __init__(self, n: int, columns: tuple | None, make, row=None, op_names: frozenset | None = None,
                 allocs=None):
        super().__init__((), op_names)
        self._rows, self.n, self._columns = None, n, columns
        self._make, self._row, self._allocs = make, row, allocs

    @property
    def rows(self) -> tuple:
        if self._rows is None:
            self._rows = self._make()
        return self._rows

    def row(self, i: int) -> tuple:
        return self._row(i) if self._rows is None and self._row is not None else self.rows[i]

    def _allocs_of(self, ops: frozenset) -> list:
        return self._allocs(ops) if self._allocs is not None and self._rows is None else super()._allocs_of(ops)


class Shifted:
    """`rows` placed on a clock: events + `offset`; a row freed after `limit` (relative; None: no
    limit) is live at the end, as a copied step leaves what the first one freed later; phases
    with `prefix`. `handles`: {row: Record} for the rows the step still frees or changes after
    placing them (gradients, inputs, the batch): those Record objects are the rows' records."""

    __slots__ = ("rows", "offset", "limit", "prefix", "handles", "_records")

    def __init__(self, rows: Rows, offset: int, limit: int | None = None, prefix: str = "",
                 handles: dict | None = None):
        self.rows, self.offset, self.limit, self.prefix = rows, offset, limit, prefix
        self.handles = handles or {}
        self._records = None

    def __len__(self) -> int:
        return self.rows.n

    def record(self, i: int) -> Record:
        """Row i as a fresh Record (what the run holds there, handles aside)."""
        n, a, f, c, p, m, o, s = self.rows.row(i)
        off, limit = self.offset, self.limit
        free = None if f is None or (limit is not None and f > limit) else f + off
        return Record(n, a + off, free, c, self.prefix + p, m, o, s)

    def records(self) -> list:
        """The run as Record objects (made once; the handles are themselves)."""
        if self._records is None:
            out = self._made(1)
            for i, rec in self.handles.items():
                out[i] = rec
            self._records = out
        return self._records

    def scaled(self, scale: int) -> list:
        """The run as new Record objects with every event times `scale` (`records()` copied and
        rescaled, without making the records first; the handles' values as they are now)."""
        out = self._made(scale)
        for i, r in self.handles.items():
            out[i] = _scaled(r, scale)
        return out

    def scaled_record(self, i: int, scale: int) -> Record:
        """Row i as a fresh Record, events times `scale`: `scaled(scale)[i]` alone."""
        handle = self.handles.get(i)
        if handle is not None:
            return _scaled(handle, scale)
        n, a, f, c, p, m, o, s = self.rows.row(i)
        off, limit = self.offset, self.limit
        free = None if f is None or (limit is not None and f > limit) else (f + off) * scale
        return Record(n, (a + off) * scale, free, c, self.prefix + p, m, o, s)

    def _made(self, scale: int) -> list:
        """Every row as a fresh Record, events times `scale` (handles included, as rows)."""
        off, limit, prefix = self.offset, self.limit, self.prefix
        names = {}
        out = []
        append = out.append
        for n, a, f, c, p, m, o, s in self.rows.rows:
            name = names.get(p)
            if name is None:
                name = names[p] = prefix + p
            append(Record(n, (a + off) * scale,
                          None if f is None or (limit is not None and f > limit) else (f + off) * scale,
                          c, name, m, o, s))
        return out

    def part(self, lo: int, hi: int) -> "Shifted":
        """Rows lo..hi-1 alone (a copied range that cuts this run)."""
        if lo == 0 and hi == self.rows.n:
            return self
        return Shifted(Rows(self.rows.rows[lo:hi]), self.offset, self.limit, self.prefix,
                       {i - lo: rec for i, rec in self.handles.items() if lo <= i < hi})

    def copied(self, offset: int, end: int, prefix: str, copies: dict) -> "Shifted":
        """This run copied `offset` events later, what it frees after absolute event `end` left
        live, phases with `prefix` in front (`step._repeat_step`'s rule for every record).
        Handles are copied as Records (their values now); `copies`: id(handle) -> its copy."""
        limit = end - self.offset
        if self.limit is not None:
            limit = min(limit, self.limit)
        handles = {}
        for i, r in self.handles.items():
            copy = Record(r.nbytes, r.alloc_at + offset,
                          None if r.free_at is None or r.free_at > end else r.free_at + offset,
                          r.category, prefix + r.phase, r.module, r.op, r.saved)
            handles[i] = copies[id(r)] = copy
        return Shifted(self.rows, self.offset + offset, limit, prefix + self.prefix, handles)


class ReadAsList:
    """Records read like a list: `_list()` makes them all on first read (kept in `_flat`), and
    `tail` holds what readers add (workspaces), the made list extended too."""

    tail: list
    _flat: list | None

    def _list(self) -> list:
        raise NotImplementedError

    def __iter__(self):
        return iter(self._list())

    def __getitem__(self, index):
        return self._list()[index]

    def append(self, record: Record) -> None:
        self.extend([record])

    def extend(self, records) -> None:
        records = list(records)
        self.tail.extend(records)
        if self._flat is not None:
            self._flat.extend(records)


class RecordLog(ReadAsList):
    """A step's records: runs (lists of Records, or `Shifted`) in order, and a tail that readers
    may extend (workspaces). Iterates, indexes and counts like the list of all records; its C
    arrays are made from the runs (`columns`) without making records."""

    def __init__(self, runs: list):
        self.runs = runs
        self.tail: list = []
        self._flat = None

    def fork(self) -> "RecordLog":
        """The same records (the runs shared, read-only) with a tail of its own."""
        return RecordLog(self.runs)

    def _list(self) -> list:
        if self._flat is None:
            self._flat = list(chain.from_iterable(r if isinstance(r, list) else r.records() for r in self.runs))
            self._flat.extend(self.tail)
        return self._flat

    def __len__(self) -> int:
        return sum(len(r) for r in self.runs) + len(self.tail)

    def scaled(self, scale: int) -> list:
        """Copies of the records, in order, with every event times `scale` (the distributed
        rewrite's records, read as a list), made from the runs' rows without making their
        records first."""
        if self._flat is not None:
            return [_scaled(r, scale) for r in self._flat]
        out = []
        for run in self.runs + [self.tail]:
            out.extend([_scaled(r, scale) for r in run] if isinstance(run, list) else run.scaled(scale))
        return out

    def visible(self):
        """The Record objects the runs hold now (lists and handles): all a replay could reach."""
        for run in self.runs:
            if isinstance(run, list):
                yield from run
            else:
                yield from run.handles.values()
        yield from self.tail

    def first_alloc(self, ops: frozenset, lo: int | None = None, hi: int | None = None) -> int | None:
        """The allocation event of the first record, in record order, whose op is in `ops` and
        whose allocation is in [lo, hi) (None: unbounded)."""
        def wanted(at):
            return (lo is None or lo <= at) and (hi is None or at < hi)

        for run in chain(self.runs, [self.tail]):
            if isinstance(run, list):
                found = next((r.alloc_at for r in run if r.op in ops and wanted(r.alloc_at)), None)
            else:
                off = run.offset
                found = next((a + off for _, a in run.rows.allocs_of(ops) if wanted(a + off)), None)
            if found is not None:
                return found
        return None

    def columns(self, extra=()):
        """The records and `extra` as `native.Columns`, made run by run (None without the C
        library)."""
        if native.library() is None:
            return None
        runs = self.runs + [self.tail, list(extra)]
        made = _run_columns(runs)
        if made is None:                  # a category from outside the enum: record by record
            return native.Columns(list(self), extra)
        return native.Columns.of_arrays(*made, default=Category.TEMPORARIES,
                                        records=lambda: list(self) + list(extra))


def _scaled(r: Record, scale: int) -> Record:
    return Record(r.nbytes, r.alloc_at * scale, None if r.free_at is None else r.free_at * scale, r.category,
                  r.phase, r.module, r.op, r.saved)


def _run_columns(runs: list) -> tuple | None:
    """(nbytes, alloc_at, free_at, category codes) of the runs, in order; None when a category is
    not a `Category`."""
    if any(not isinstance(r, list) and r.rows.columns() is None for r in runs):
        return None
    total = sum(len(r) for r in runs)
    nbytes, codes = array("q"), array("q")
    alloc_at, free_at = array("q", bytes(8 * total)), array("q", bytes(8 * total))
    position = 0
    try:
        for run in runs:
            k = len(run)
            if isinstance(run, list):
                nbytes.extend([r.nbytes for r in run])
                alloc_at[position:position + k] = array("q", [r.alloc_at for r in run])
                free_at[position:position + k] = array("q", [NEVER if r.free_at is None else r.free_at
                                                             for r in run])
                codes.extend([_CODE[r.category] for r in run])
            elif k:
                n_col, a_col, f_col, c_col = run.rows.columns()
                nbytes.extend(n_col)
                codes.extend(c_col)
                native.shift(a_col, f_col, run.offset, run.limit, alloc_at, free_at, position)
                for i, r in run.handles.items():
                    j = position + i
                    nbytes[j], alloc_at[j] = r.nbytes, r.alloc_at
                    free_at[j] = NEVER if r.free_at is None else r.free_at
                    codes[j] = _CODE[r.category]
            position += k
    except KeyError:
        return None
    return nbytes, alloc_at, free_at, codes

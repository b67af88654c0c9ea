"""The loops an estimate spends its time in, in C, when a C compiler is at hand: built once into
`${VRAMPLAN_CACHE:-~/.cache/vramplan}/native/`, loaded with ctypes.

* native.c: the allocator's replay, the live-bytes curve and the compositions at chosen events.
  `fit` replays the caching allocator over each candidate it estimates (some 110 000 events for
  an SDXL step) and takes the peak of live bytes of many more; in Python those were about half
  of an SDXL search.
* native_replay.c (same library): a recorded graph's replay with autograd's rules
  (`vramplan.estimate.native_replay`).
* native_flat.c (a library of its own, `flat_library`): a graph's Python lists read as the
  columns the replay takes, through the Python C API, so it needs Python's headers too.

The Python versions (allocator.py, `vramplan.fit.walk.peak_live_bytes`, replay.py's Replayer,
native_replay's `_flat_in_python`) stay the reference and run wherever a library cannot be
built or loaded (no compiler or headers, a read-only cache, `VRAMPLAN_NATIVE=0`): the same
numbers, slower. tests/test_native.py and tests/estimate/test_native_replay.py check that they
agree.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
from array import array
from pathlib import Path

from vramplan.cache import cache_root

SOURCE = Path(__file__).with_name("native.c")
SOURCES = (SOURCE, Path(__file__).with_name("native_replay.c"))   # native_replay.c: a graph's replay
FLAT_SOURCE = Path(__file__).with_name("native_flat.c")
_STATE: dict = {}          # "lib": the loaded library or None (tried, not available)


def cache_dir() -> Path:
    return cache_root() / "native"


def _compiler() -> str | None:
    import shutil

    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def library_path(sources: tuple = SOURCES, name: str = "native") -> Path:
    """Where the build of `sources` lives: a new source (or Python, or machine) gets a new name."""
    digest = hashlib.sha256(b"".join(source.read_bytes() for source in sources)).hexdigest()[:16]
    return cache_dir() / f"{name}-{digest}-{sys.implementation.cache_tag}-{platform.machine()}.so"


def _build(target: Path, sources=SOURCES, flags: tuple = ()) -> bool:
    """Compile `sources` into `target` (atomically); False when that cannot be done here."""
    import subprocess
    import tempfile

    compiler = _compiler()
    if compiler is None:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        try:
            done = subprocess.run([compiler, "-O2", "-shared", "-fPIC", *flags, "-o", tmp, *map(str, sources)],
                                  capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            return False
        if done.returncode != 0:
            return False
        os.replace(tmp, target)      # atomic: a concurrent build or reader sees all or nothing
        return True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def library():
    """The loaded C library, or None (then callers run the Python versions)."""
    if "lib" in _STATE:
        return _STATE["lib"]
    lib = None
    if os.environ.get("VRAMPLAN_NATIVE", "1") != "0":
        try:
            import ctypes

            path = library_path()
            if path.exists() or _build(path):
                lib = ctypes.CDLL(str(path))
                p = ctypes.c_void_p
                lib.vp_replay_allocator.argtypes = [ctypes.c_int64, p, p, p, p]
                lib.vp_replay_allocator.restype = ctypes.c_int
                lib.vp_live_curve.argtypes = [ctypes.c_int64, p, p, p, ctypes.c_int64, p, p, p]
                lib.vp_live_curve.restype = ctypes.c_int64
                lib.vp_live_peaks.argtypes = [ctypes.c_int64, p, p, p, ctypes.c_int64, p, p]
                lib.vp_live_peaks.restype = ctypes.c_int64
                lib.vp_compositions.argtypes = [ctypes.c_int64, p, p, p, p, ctypes.c_int64, p, ctypes.c_int64,
                                                p, p]
                lib.vp_compositions.restype = None
                lib.vp_shift.argtypes = [ctypes.c_int64, p, p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, p, p]
                lib.vp_shift.restype = None
                lib.vp_scale.argtypes = [ctypes.c_int64, p, p, ctypes.c_int64]
                lib.vp_scale.restype = None
                lib.vp_keep.argtypes = [ctypes.c_int64, p, p]
                lib.vp_keep.restype = ctypes.c_int64
                lib.vp_zero_where.argtypes = [ctypes.c_int64, p, p, p, ctypes.c_int64, ctypes.c_int64,
                                              ctypes.c_int64, p, p]
                lib.vp_zero_where.restype = None
                lib.vp_indices_of.argtypes = [ctypes.c_int64, p, ctypes.c_int64, p]
                lib.vp_indices_of.restype = ctypes.c_int64
                # native_replay.c (vramplan/estimate/native_replay.py)
                lib.vp_graph_forward.argtypes = [p]
                lib.vp_graph_forward.restype = p
                lib.vp_graph_backward.argtypes = [p]
                lib.vp_graph_backward.restype = ctypes.c_int
                lib.vp_graph_counts.argtypes = [p, p]
                lib.vp_graph_copy.argtypes = [p, ctypes.c_int64, p]
                lib.vp_graph_free.argtypes = [p]
                for function in (lib.vp_graph_counts, lib.vp_graph_copy, lib.vp_graph_free):
                    function.restype = None
        except (OSError, AttributeError):
            lib = None
    _STATE["lib"] = lib
    return lib


def flat_library():
    """native_flat.c, loaded with ctypes.PyDLL (its functions read Python lists, holding the GIL),
    or None where it cannot be built (no compiler, no Python headers: `_Structure` flattens in
    Python) or `VRAMPLAN_NATIVE=0`."""
    if "flat" in _STATE:
        return _STATE["flat"]
    lib = None
    if os.environ.get("VRAMPLAN_NATIVE", "1") != "0":
        try:
            import ctypes
            import sysconfig

            include = sysconfig.get_paths().get("include")
            path = library_path((FLAT_SOURCE,), "native-flat")
            if include and (Path(include) / "Python.h").exists() and (
                    path.exists() or _build(path, (FLAT_SOURCE,), ("-I" + include,))):
                lib = ctypes.PyDLL(str(path))
                p, o = ctypes.c_void_p, ctypes.py_object
                lib.vp_count_ops.argtypes = [o, p]
                lib.vp_flatten_ops.argtypes = [o, o, p, p, p, p, p, p, p]
                lib.vp_lookup.argtypes = [o, o, ctypes.c_int64, p]
                lib.vp_ints.argtypes = [o, ctypes.c_int64, p]
                for function in (lib.vp_count_ops, lib.vp_flatten_ops, lib.vp_lookup, lib.vp_ints):
                    function.restype = ctypes.c_int
        except (OSError, AttributeError):
            lib = None
    _STATE["flat"] = lib
    return lib


def reset() -> None:
    """Forget the loaded library (tests switch it on and off)."""
    _STATE.clear()


NEVER = -(1 << 63)       # the free event of a record never freed (native.c's NEVER)


class Columns:
    """A list of records as C arrays (bytes, allocation and free events, NEVER: never freed),
    built once and read by every function below."""

    __slots__ = ("_records", "n", "nbytes", "alloc_at", "free_at", "_codes", "_codes_for")

    def __init__(self, records, extra=()):
        self._records = records
        self.nbytes = array("q", [r.nbytes for r in records])
        self.alloc_at = array("q", [r.alloc_at for r in records])
        self.free_at = array("q", [NEVER if r.free_at is None else r.free_at for r in records])
        if extra:
            self._records = list(records) + list(extra)
            self.nbytes.extend(r.nbytes for r in extra)
            self.alloc_at.extend(r.alloc_at for r in extra)
            self.free_at.extend(NEVER if r.free_at is None else r.free_at for r in extra)
        self.n = len(self.nbytes)
        self._codes = self._codes_for = None

    @classmethod
    def of_arrays(cls, nbytes: array, alloc_at: array, free_at: array, codes: array, default,
                  records) -> "Columns":
        """Columns made elsewhere (`RecordLog.columns`): `codes` as `codes(default)` numbers
        them (`category_codes`); `records()` gives the records, for any other default."""
        self = cls.__new__(cls)
        self._records = records
        self.nbytes, self.alloc_at, self.free_at, self.n = nbytes, alloc_at, free_at, len(nbytes)
        self._codes, self._codes_for = (codes, category_codes(default)[1]), default
        return self

    @property
    def records(self):
        if callable(self._records):
            self._records = self._records()
        return self._records

    def codes(self, default) -> tuple[array, list]:
        """Each record's category as a code, and the categories by code: the members of
        `default`'s enum (a record without one counts as `default`)."""
        if self._codes_for is not None and self._codes_for is not default:
            self._codes = self._codes_for = None
        if self._codes is None:
            index, kinds = category_codes(default)
            try:
                codes = [index[r.category] for r in self.records]
            except KeyError:         # a category from outside the enum: the next code
                for r in self.records:
                    if r.category not in index:
                        index[r.category] = len(kinds)
                        kinds.append(r.category)
                codes = [index[r.category] for r in self.records]
            self._codes = (array("q", codes), kinds)
        return self._codes


def category_codes(default) -> tuple[dict, list]:
    """({category: code}, categories by code): the members of `default`'s enum, in order, and
    None (no category) counted as `default`. Fresh objects: callers may extend them."""
    kinds = list(type(default))
    index = {kind: i for i, kind in enumerate(kinds)}
    index[None] = index[default]
    return index, kinds


def columns(records, extra=()) -> Columns | None:
    """The records as C arrays, or None when the library is not available. A record log
    (`vramplan.estimate.record_log.RecordLog`) makes them itself, run by run."""
    if library() is None:
        return None
    made = getattr(records, "columns", None)
    return made(extra) if made is not None else Columns(records, extra)


def shift(alloc_at: array, free_at: array, offset: int, limit: int | None, out_alloc: array, out_free: array,
          position: int) -> None:
    """Rows placed on a clock, into out_*[position:]: alloc_at + offset; free_at + offset, or
    NEVER where never freed or freed after `limit` (None: no limit)."""
    n = len(alloc_at)
    if position + n > len(out_alloc) or position + n > len(out_free):
        raise IndexError("shift: the output arrays are too short")
    library().vp_shift(n, _address(alloc_at), _address(free_at), offset, int(limit is not None),
                       0 if limit is None else limit, _address(out_alloc) + 8 * position,
                       _address(out_free) + 8 * position)


def scale(alloc_at: array, free_at: array, factor: int) -> None:
    """Every event times `factor`, in place; NEVER stays NEVER (the distributed rewrite's scaled
    clock). Needs the library (callers have columns only where it is built)."""
    n = len(alloc_at)
    if len(free_at) != n:
        raise IndexError("scale: the columns differ in length")
    library().vp_scale(n, _address(alloc_at), _address(free_at), factor)


def keep(dropped: bytes, columns: list) -> None:
    """Each column (an array of n int64) less its entries whose `dropped` byte is not 0, in
    order, in place."""
    # an array, not a ctypes buffer: each buffer length made a new ctypes type, and types are
    # reference cycles the CLI's frozen collector would never free (tests/test_timeline.py)
    mask = array("B", dropped)
    for column in columns:
        if len(column) != len(dropped):
            raise IndexError("keep: a column and the mask differ in length")
        k = library().vp_keep(len(dropped), _address(mask), _address(column))
        del column[k:]


def indices_of(codes: array, code: int) -> list[int]:
    """The positions of `code` in `codes`, ascending."""
    out = array("q", bytes(8 * len(codes)))
    k = library().vp_indices_of(len(codes), _address(codes), code, _address(out))
    return out[:k].tolist()


def zero_where(nbytes: array, codes: array, alloc_at: array, drop_codes: list, window_code: int,
               windows: list) -> None:
    """nbytes, in place, 0 where a record's code is in `drop_codes`, or is `window_code` and its
    allocation lies in one of `windows` ([lo, hi) events)."""
    n = len(nbytes)
    if len(codes) != n or len(alloc_at) != n:
        raise IndexError("zero_where: the columns differ in length")
    if any(not 0 <= c < 63 for c in drop_codes):
        raise ValueError("zero_where: codes are 0..62")
    lo, hi = array("q", [w[0] for w in windows] or [0]), array("q", [w[1] for w in windows] or [0])
    library().vp_zero_where(n, _address(nbytes), _address(codes), _address(alloc_at),
                            sum(1 << c for c in set(drop_codes)), window_code, len(windows),
                            _address(lo), _address(hi))


def _address(column: array) -> int:
    return column.buffer_info()[0]


class NativeReplay:
    """What `replay_allocator` returns that callers read."""

    __slots__ = ("peak_reserved", "reserved", "peak_allocated", "allocated", "segments")

    def __init__(self, values):
        self.peak_reserved, self.reserved, self.peak_allocated, self.allocated, self.segments = values


def replay_allocator(cols: Columns) -> NativeReplay | None:
    """allocator.replay_in_python's totals; None if the C replay ran out of memory."""
    out = array("q", [0] * 5)
    if library().vp_replay_allocator(cols.n, _address(cols.nbytes), _address(cols.alloc_at),
                                     _address(cols.free_at), _address(out)):
        return None
    return NativeReplay(tuple(out))


def peak_live_bytes(cols: Columns) -> int | None:
    """vramplan.fit.walk.peak_live_bytes: the most bytes live at once, never below 0. None when
    the events span too wide a range or memory ran out."""
    peak = array("q", [0])
    m = library().vp_live_curve(cols.n, _address(cols.nbytes), _address(cols.alloc_at), _address(cols.free_at),
                                0, None, None, _address(peak))
    return None if m < 0 else peak[0]


def live_curve(cols: Columns, base: int) -> tuple[list, list] | None:
    """`timeline._live_curve`: (the events some record touches, ascending; the bytes live before
    the first and after each, from `base`). None when the events span too wide a range or memory
    ran out."""
    n = cols.n
    events = array("q", bytes(8 * (2 * n)))
    lives = array("q", bytes(8 * (2 * n + 1)))
    peak = array("q", [0])
    m = library().vp_live_curve(n, _address(cols.nbytes), _address(cols.alloc_at), _address(cols.free_at),
                                base, _address(events), _address(lives), _address(peak))
    if m < 0:
        return None
    return events[:m].tolist(), lives[:m + 1].tolist()


def live_peaks(cols: Columns, cuts: list) -> list | None:
    """The most bytes live after any event of each section the ascending `cuts` make (section
    j: cuts[j-1] <= event < cuts[j]; len(cuts) + 1 of them), from 0. None when the events span
    too wide a range or memory ran out."""
    bounds = array("q", cuts or [0])
    peaks = array("q", bytes(8 * (len(cuts) + 1)))
    m = library().vp_live_peaks(cols.n, _address(cols.nbytes), _address(cols.alloc_at), _address(cols.free_at),
                                len(cuts), _address(bounds), _address(peaks))
    return None if m < 0 else peaks.tolist()


def compositions(cols: Columns, targets: list, default) -> list[dict]:
    """`timeline.compositions_at`'s sums: for each ascending target event, {category: bytes} of
    the records alive at it, in the order records first show the categories."""
    codes, kinds = cols.codes(default)
    k, c = len(targets), len(kinds)
    wanted = array("q", targets)
    sums = array("q", bytes(8 * max(k * c, 1)))
    first = array("q", bytes(8 * max(k * c, 1)))
    library().vp_compositions(cols.n, _address(cols.nbytes), _address(cols.alloc_at), _address(cols.free_at),
                              _address(codes), k, _address(wanted), c, _address(sums), _address(first))
    out = []
    for t in range(k):
        row = [(first[t * c + j], kinds[j], sums[t * c + j]) for j in range(c) if first[t * c + j] >= 0]
        row.sort(key=lambda item: item[0])
        out.append({kind: nbytes for _, kind, nbytes in row})
    return out

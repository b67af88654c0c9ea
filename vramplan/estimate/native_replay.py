"""A graph's replay in C (vramplan/native_replay.c): the records `Replayer` would make, as columns.

Why: a fresh SDXL denoiser replay took about 80 ms in Python (its forward 25-40 ms), some 50 000
`Record` objects made one by one, and fit's search on a small card replays several (one per
quantization and checkpointing it tries). The C replay follows `replay.Replayer` rule for rule
for a graph that allocates its own inputs (the denoiser's: `step._one_step`); what it gives
back is what the step keeps of a replay anyway (`step._Window`: rows relative to the replay's
first event, its result's handles as rows, its size log for `resize.py`). The Python Replayer
stays the reference, and runs wherever the C library is not built: tests/estimate/
test_native_replay.py wants the same rows, results and size logs from both.

Names become integers here, once per graph structure (shared, by identity, by a graph's
resized copies: `resize.structure`), sizes once per graph, and what the options decide (which
tensors require grad, checkpointing) once per replay.
"""

from __future__ import annotations

import ctypes
from array import array
from dataclasses import dataclass
from itertools import accumulate, chain, compress

from vramplan import native
from vramplan.estimate.autograd_rules import function_saves, held_by_ctx
from vramplan.estimate.concrete import Concrete
from vramplan.estimate.conv_workspaces import workspace_bytes
from vramplan.estimate.record_log import ColumnRows
from vramplan.estimate.replay import CAST, CONCATS, FLOATING, ReplayOptions, _op_info, convolutions
from vramplan.estimate.resize import Sizes, structure
from vramplan.footprint import Category
from vramplan.native import NEVER

# native_replay.c's category codes, in order
CATEGORIES = (Category.TEMPORARIES, Category.ACTIVATIONS, Category.AUTOCAST_CACHE, Category.INPUTS,
              Category.WORKSPACES, Category.GRADIENTS)
KINDS = ("forward", "input", "weight", "both")      # workspace kinds (conv_workspaces.backward_kind)
_STAR, _ARG, _OUT = 0, 1, 2
_DIFFERENTIABLE, _GRAD_ALIAS, _GRAD_NONE, _CAT, _TO_COPY = 1, 2, 4, 8, 16

_P = ctypes.c_void_p
_I = ctypes.c_int64


class _Graph(ctypes.Structure):
    """native_replay.c's `Graph`, field for field."""

    _fields_ = ([(n, _I) for n in ("n_ops", "n_tensors", "n_storages", "n_params", "n_roles")]
                + [(n, _P) for n in ("op_name", "op_module", "in_ptr", "in_tid", "in_arg", "out_ptr", "out_tid",
                                     "flags", "save_ptr", "save_kind", "save_value", "save_any", "trig_ptr",
                                     "trig_arg", "temp_ptr", "temp_arg", "temp_count", "t_sid", "t_float",
                                     "t_param", "t_bytes", "t_dtype", "t_role", "trainable", "role_rg", "s_alloc",
                                     "s_bytes", "s_param", "s_free")]
                + [("n_regions", _I)]
                + [(n, _P) for n in ("r_first", "r_last", "r_in_ptr", "r_in", "r_out_ptr", "r_out", "region_of",
                                     "region_end", "region_start")]
                + [("n_functions", _I)]
                + [(n, _P) for n in ("f_first", "f_last", "f_in_ptr", "f_in", "f_out_ptr", "f_out", "f_keep_ptr",
                                     "f_keep", "f_module", "f_held", "function_of", "function_end", "ws")]
                + [(n, _I) for n in ("loss", "arg_input", "arg_weight", "arg_bias")]
                + [("cat_code", _P)])


def _q(values) -> array:
    return array("q", values)


def _offsets(lists) -> list[int]:
    return list(accumulate(map(len, lists), initial=0))


def _csr(lists) -> tuple[array, array]:
    """(offsets, values) of a list of lists: list k is values[offsets[k]:offsets[k + 1]]."""
    return _q(_offsets(lists)), _q(list(chain.from_iterable(lists)))


class _Structure:
    """What the replay reads of a graph besides sizes and options, as integer arrays."""

    def __init__(self, g: Concrete):
        self.pins = structure(g)
        ops = g.ops
        args: dict = {}

        def code(name: str) -> int:
            found = args.get(name)
            if found is None:
                found = args[name] = len(args)
            return found

        flags, saves, triggers, temps = [], [], [], []
        for name in g.opnames:
            _, rule, plan, _ = _op_info(name)
            grad = {"alias": _GRAD_ALIAS, "none": _GRAD_NONE}.get(rule.grad, 0)
            flags.append((_DIFFERENTIABLE if rule.differentiable else 0) | grad
                         | (_CAT if name in CONCATS else 0) | (_TO_COPY if name == CAST else 0))
            slots = []
            for out, slot, trig in plan:
                kind, value = (_STAR, 0) if slot == "*" else (_OUT, out) if out >= 0 else (_ARG, code(slot))
                slots.append((kind, value, int(trig is None)))
                triggers.append([code(t) for t in trig or ()])
            saves.append(slots)
            temps.append([(code(slot), count) for slot, count in rule.temps])
        self.flags = _q(flags)
        self.save_ptr = _q(_offsets(saves))
        flat = [s for slots in saves for s in slots]
        self.save_kind, self.save_value, self.save_any = (_q([s[k] for s in flat]) for k in range(3))
        self.trig_ptr, self.trig_arg = _csr(triggers)
        self.temp_ptr = _q(_offsets(temps))
        self.temp_arg = _q([t[0] for ts in temps for t in ts])
        self.temp_count = _q([t[1] for ts in temps for t in ts])
        self.arg_input, self.arg_weight, self.arg_bias = code("input"), code("weight"), code("bias")
        self.param_names = sorted(set(g.t_param) - {None})
        param_index = {p: i for i, p in enumerate(self.param_names)}
        param_index[None] = -1
        # a parameter named "" is None to `any(t_param[t] ...)` but not to `is not None`: the C
        # replay has one test for both, so such a graph is left to Python
        self.usable = "" not in param_index
        dtypes = {d: k for k, d in enumerate(dict.fromkeys(g.t_dtype))}
        floating = dict.fromkeys(FLOATING, 1)
        flat = native.flat_library() if FLAT_IN_C else None
        if flat is None or not _flat_in_c(self, g, flat, args, dtypes, floating, param_index):
            _flat_in_python(self, g, args, dtypes, floating, param_index)
        self.t_sid = _q(g.t_sid)
        self.roles = list(g.inputs)
        role_of = [-1] * len(g.t_sid)
        for k, role in enumerate(self.roles):
            role_of[g.inputs[role]] = k
        self.t_role = _q(role_of)
        param_sids = set(compress(g.t_sid, map((-1).__lt__, self.t_param)))
        self.s_param = _q(list(map(param_sids.__contains__, range(len(g.s_alloc)))))

        n = len(ops)
        regions = g.regions
        self.n_regions = len(regions)
        self.r_first, self.r_last = _q([r[1] for r in regions]), _q([r[2] for r in regions])
        self.r_in_ptr, self.r_in = _csr([r[3] for r in regions])
        self.r_out_ptr, self.r_out = _csr([r[4] for r in regions])
        region_of, region_end, region_start = [0] * n, [-1] * n, [-1] * n
        for k, r in enumerate(regions):
            region_of[r[1]:r[2] + 1] = [1] * (r[2] + 1 - r[1])
            region_end[r[2]] = k
            region_start[r[1]] = k
        self.region_of, self.region_end, self.region_start = _q(region_of), _q(region_end), _q(region_start)

        functions = g.functions
        self.n_functions = len(functions)
        self.f_first, self.f_last = _q([f[1] for f in functions]), _q([f[2] for f in functions])
        self.f_in_ptr, self.f_in = _csr([f[3] for f in functions])
        self.f_out_ptr, self.f_out = _csr([f[4] for f in functions])
        keeps = []
        for f in functions:
            saves_ = function_saves(f[5] if len(f) > 5 else "")
            keeps.append(list(f[3]) if saves_ == "all" else [f[3][k] for k in saves_ if k < len(f[3])])
        self.f_keep_ptr, self.f_keep = _csr(keeps)
        self.f_module = _q([f[0] if isinstance(f[0], int) and f[0] < len(g.modules) else -1 for f in functions])
        self.f_held = _q([held_by_ctx(f[5] if len(f) > 5 else "") for f in functions])
        function_of, function_end = [-1] * n, [-1] * n
        for k, f in enumerate(functions):
            function_of[f[1]:f[2] + 1] = [k] * (f[2] + 1 - f[1])
            function_end[f[2]] = k
        self.function_of, self.function_end = _q(function_of), _q(function_end)
        self.loss = g.outputs.get("loss", -1)
        self.unknown_ops = frozenset(g.opnames[k] for k in set(self.op_name) if _op_info(g.opnames[k])[3])
        self.op_labels = list(g.opnames) + ["function_backward", "ones_like", ""]   # -3, -2, -1
        self.module_labels = list(g.modules) + [""]                                 # -1


FLAT_IN_C = True     # read the graph's lists with native_flat.c where it is built (tests compare)


def _flat_in_python(s: _Structure, g: Concrete, args: dict, dtypes: dict, floating: dict, param_index: dict) -> None:
    """The op, tensor and storage columns: each one pass at C speed (transposed with zip, mapped
    through dicts). Argument names take the next code in the order they first appear."""
    ops = g.ops
    names, modules, ins, outs = zip(*ops) if ops else ((), (), (), ())
    s.op_name, s.op_module = _q(names), _q(modules)
    s.in_ptr, s.out_ptr = _q(_offsets(ins)), _q(_offsets(outs))
    flat = list(chain.from_iterable(ins))
    arg_names, in_tid = zip(*flat) if flat else ((), ())
    for name in dict.fromkeys(arg_names):
        args.setdefault(name, len(args))
    s.in_tid, s.in_arg = _q(in_tid), _q(list(map(args.__getitem__, arg_names)))
    s.out_tid = _q(list(chain.from_iterable(outs)))
    s.t_float = _q([floating.get(d, 0) for d in g.t_dtype])
    s.t_dtype = _q(list(map(dtypes.__getitem__, g.t_dtype)))
    s.t_param = _q(list(map(param_index.__getitem__, g.t_param)))
    s.s_alloc = _q([-2 if a is None else a for a in g.s_alloc])
    # the op after which Python lets go of each storage, -1: never (native_replay.c lists them per
    # op, as Replayer.free_after)
    s.s_free = _q([-1 if f is None else f for f in g.s_free])


def _flat_in_c(s: _Structure, g: Concrete, lib, args: dict, dtypes: dict, floating: dict, param_index: dict) -> bool:
    """`_flat_in_python`'s columns, read by native_flat.c; False where the graph's fields are not
    the lists it reads."""
    if not all(isinstance(x, list) for x in (g.ops, g.t_dtype, g.t_param, g.s_alloc, g.s_free)):
        return False
    counts = array("q", [0, 0])
    lib.vp_count_ops(g.ops, counts.buffer_info()[0])
    n = len(g.ops)
    s.op_name, s.op_module = array("q", bytes(8 * n)), array("q", bytes(8 * n))
    s.in_ptr, s.out_ptr = array("q", bytes(8 * (n + 1))), array("q", bytes(8 * (n + 1)))
    s.in_tid, s.in_arg = array("q", bytes(8 * counts[0])), array("q", bytes(8 * counts[0]))
    s.out_tid = array("q", bytes(8 * counts[1]))
    lib.vp_flatten_ops(g.ops, args, *(_at(c) for c in (s.op_name, s.op_module, s.in_ptr, s.in_tid, s.in_arg,
                                                          s.out_ptr, s.out_tid)))
    n_t, n_s = len(g.t_dtype), len(g.s_alloc)
    s.t_float, s.t_dtype, s.t_param = (array("q", bytes(8 * n_t)) for _ in range(3))
    lib.vp_lookup(g.t_dtype, floating, 0, _at(s.t_float))
    lib.vp_lookup(g.t_dtype, dtypes, -1, _at(s.t_dtype))
    lib.vp_lookup(g.t_param, param_index, -1, _at(s.t_param))
    s.s_alloc, s.s_free = array("q", bytes(8 * n_s)), array("q", bytes(8 * n_s))
    lib.vp_ints(g.s_alloc, -2, _at(s.s_alloc))
    lib.vp_ints(g.s_free, -1, _at(s.s_free))
    return True


def _at(column: array) -> int:
    return column.buffer_info()[0]


_STRUCTURES: list = []     # [(_Structure)]: the last few, by the identity of their pins


def clear() -> None:
    """Forget the graphs' columns kept here (with `step.clear_reuse`)."""
    _STRUCTURES.clear()
    _WORKSPACES.clear()


def _structure_of(g: Concrete) -> _Structure:
    pins = structure(g)
    for known in _STRUCTURES:
        if all(a is b for a, b in zip(known.pins, pins)):
            return known
    made = _Structure(g)
    _STRUCTURES.insert(0, made)
    del _STRUCTURES[4:]
    return made


@dataclass(frozen=True)
class NativeReplay:
    """A replay's records and result, relative to the event before it (`step._Window`'s parts)."""

    rows: ColumnRows
    length: int                  # events taken
    backward_at: int             # the backward's first event
    saved_by_module: tuple
    param_grads: tuple           # (parameter name, row)
    input_grads: tuple           # (input role, row)
    unknown_ops: frozenset
    sizes: Sizes


def available() -> bool:
    return native.library() is not None


def replay(g: Concrete, options: ReplayOptions, check=None) -> NativeReplay | None:
    """`Replayer(g, options, clock)`'s forward(), backward() and finish() on a fresh clock, the
    graph's inputs allocated by the replay; None where the C library is not available or this
    graph is left to Python. `check(rows)`: called with the forward's rows (a `Rows` whose
    columns alone are made), before the backward; it may raise to stop the replay there."""
    lib = native.library()
    if lib is None:
        return None
    s = _structure_of(g)
    if not s.usable:
        return None
    keep = []                    # what the Graph's pointers point into, alive until the end

    def address(column: array) -> int:
        keep.append(column)
        return column.buffer_info()[0] if len(column) else 0

    trainable = _q([bool(options.trainable(name)) for name in s.param_names])
    role_rg = _q([role in options.inputs_require_grad for role in s.roles])
    graph = _Graph()
    graph.n_ops, graph.n_tensors, graph.n_storages = len(g.ops), len(g.t_sid), len(g.s_alloc)
    graph.n_params, graph.n_roles = len(s.param_names), len(s.roles)
    for name in ("op_name", "op_module", "in_ptr", "in_tid", "in_arg", "out_ptr", "out_tid", "flags", "save_ptr",
                 "save_kind", "save_value", "save_any", "trig_ptr", "trig_arg", "temp_ptr", "temp_arg", "temp_count",
                 "t_sid", "t_float", "t_param", "t_dtype", "t_role", "s_alloc", "s_param", "s_free",
                 "f_first", "f_last", "f_in_ptr", "f_in", "f_out_ptr", "f_out", "f_keep_ptr", "f_keep", "f_module",
                 "f_held", "function_of", "function_end"):
        setattr(graph, name, address(getattr(s, name)))
    graph.n_functions = s.n_functions
    if options.gradient_checkpointing:
        graph.n_regions = s.n_regions
        for name in ("r_first", "r_last", "r_in_ptr", "r_in", "r_out_ptr", "r_out", "region_of", "region_end",
                     "region_start"):
            setattr(graph, name, address(getattr(s, name)))
    graph.t_bytes, graph.s_bytes = address(_q(g.t_bytes)), address(_q(g.s_bytes))
    graph.trainable, graph.role_rg = address(trainable), address(role_rg)
    graph.ws, graph.cat_code = address(_workspaces(g, options.low_dtype)), address(_CAT_CODE)
    graph.loss, graph.arg_input, graph.arg_weight, graph.arg_bias = s.loss, s.arg_input, s.arg_weight, s.arg_bias

    handle = lib.vp_graph_forward(ctypes.byref(graph))
    if not handle:
        return None
    try:
        n, now = _counts(lib, handle)[:2]
        if check is not None:
            check(ColumnRows(n, tuple(_column(lib, handle, k, n) for k in range(4)), make=None))
        backward_at = now + 1
        if lib.vp_graph_backward(handle) != 0:
            return None
        return _result(lib, handle, s, options, backward_at)
    finally:
        lib.vp_graph_free(handle)


def _counts(lib, handle) -> list[int]:
    out = array("q", bytes(8 * 7))
    lib.vp_graph_counts(handle, out.buffer_info()[0])
    return out.tolist()


def _column(lib, handle, which: int, n: int) -> array:
    out = array("q", bytes(8 * n))
    if n:
        lib.vp_graph_copy(handle, which, out.buffer_info()[0])
    return out


# the records' categories as `native.category_codes` numbers them (what record_log's columns hold)
_CODE, _KINDS = native.category_codes(Category.TEMPORARIES)
_CAT_CODE = _q([_CODE[c] for c in CATEGORIES])

_WORKSPACES: list = []     # [(graph, low dtype, array)]: the last few graphs' (a graph replays with
                           # checkpointing on and off)


def _workspaces(g: Concrete, low_dtype: str) -> array:
    """Per op, its cuDNN workspace bytes by kind (KINDS), -1 for an op that is not a convolution."""
    for known, dtype, ws in _WORKSPACES:
        if known is g and dtype == low_dtype:
            return ws
    ws = [-1] * (4 * len(g.ops))
    for i, (key, dtype) in convolutions(g, low_dtype).items():
        ws[4 * i:4 * i + 4] = [workspace_bytes(key, dtype, kind) for kind in KINDS]
    made = _q(ws)
    _WORKSPACES.insert(0, (g, low_dtype, made))
    del _WORKSPACES[4:]
    return made


def _result(lib, handle, s: _Structure, options: ReplayOptions, backward_at: int) -> NativeReplay:
    n, now, n_ws, n_aliases, n_saved, n_params, n_inputs = _counts(lib, handle)
    nbytes, alloc_at, free_at, cats, phases, modules, ops, saved, source = (
        _column(lib, handle, k, n) for k in range(9))
    ws, aliases, saved_from, param_grads, input_grads = (
        _column(lib, handle, 9 + k, size).tolist()
        for k, size in enumerate((3 * n_ws, 3 * n_aliases, 2 * n_saved, 2 * n_params, 2 * n_inputs)))
    module_labels, op_labels = s.module_labels, s.op_labels
    prefix = options.phase_prefix
    phase_labels = (prefix + "forward", prefix + "backward")
    kinds = _KINDS

    def make_rows() -> tuple:
        return tuple(zip(nbytes.tolist(), alloc_at.tolist(), [None if f == NEVER else f for f in free_at.tolist()],
                         [kinds[c] for c in cats], [phase_labels[p] for p in phases],
                         [module_labels[m] for m in modules], [op_labels[o] for o in ops], map(bool, saved)))

    def row(i: int) -> tuple:
        return (nbytes[i], alloc_at[i], None if free_at[i] == NEVER else free_at[i], kinds[cats[i]],
                phase_labels[phases[i]], module_labels[modules[i]], op_labels[ops[i]], bool(saved[i]))

    def allocs(names: frozenset) -> list:
        codes = {k - len(op_labels) if k >= len(op_labels) - 3 else k
                 for k, label in enumerate(op_labels) if label in names}
        return [(i, a) for i, o, a in zip(range(n), ops, alloc_at) if o in codes]

    rows = ColumnRows(n, (nbytes, alloc_at, free_at, cats), make=make_rows, row=row,
                      op_names=frozenset(op_labels[o] for o in set(ops)), allocs=allocs)
    saved_rows = tuple(zip(map(module_labels.__getitem__, saved_from[0::2]), saved_from[1::2]))
    by_module: dict = {}
    for module, saved_row in saved_rows:
        by_module[module] = by_module.get(module, 0) + nbytes[saved_row]
    sizes = Sizes(s.pins, options.low_dtype, tuple(source.tolist()),
                  tuple(zip(ws[0::3], map(KINDS.__getitem__, ws[1::3]), map(bool, ws[2::3]))),
                  tuple(zip(aliases[0::3], aliases[1::3], map(bool, aliases[2::3]))), saved_rows)
    names, roles = s.param_names, s.roles
    return NativeReplay(
        rows=rows, length=now, backward_at=backward_at, saved_by_module=tuple(by_module.items()),
        param_grads=tuple((names[param_grads[k]], param_grads[k + 1]) for k in range(0, len(param_grads), 2)),
        input_grads=tuple((roles[input_grads[k]], input_grads[k + 1]) for k in range(0, len(input_grads), 2)),
        unknown_ops=s.unknown_ops, sizes=sizes)

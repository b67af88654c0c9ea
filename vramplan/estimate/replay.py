"""Replay a recorded forward graph with autograd's rules: forward, then backward.

The graph (recorded once per model, see `vramplan/simulate/record.py`) says which op made which
storage and when Python let go of it. For a given spec we decide which tensors require grad
(trainable weights, a trained text encoder's output), which storages autograd keeps for
backward (`autograd_rules.py`), which are recomputed under gradient checkpointing, and then walk
backward in reverse op order allocating each gradient. Every allocation becomes a `Record`
(bytes rounded to the CUDA allocator's 512-byte blocks); `timeline.analyse` finds the peak.

Several graphs share one clock (`Clock`) so that a trained text encoder's forward, the
denoiser's forward and backward, and the text encoder's backward form one timeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from vramplan.estimate.autograd_rules import ANY, Rule, function_saves, held_by_ctx, rule_for
from vramplan.estimate.concrete import Concrete
from vramplan.estimate.record_log import RecordLog
from vramplan.estimate.conv_workspaces import backward_kind, conv_key, workspace_bytes
from vramplan.footprint import Category
from vramplan.timeline import Record

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4,
            "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "complex64": 8, "complex128": 16}
FLOATING = {"float32", "float16", "bfloat16", "float64", "complex64", "complex128"}
CONSERVATIVE = Rule(save={"*": ANY})
CONCATS = ("cat.default", "stack.default")   # an alias gradient (a narrow view) whatever the sizes
CAST = "_to_copy.default"                    # of a parameter: an autocast cache entry


def cuda_rounded(nbytes: int) -> int:
    """PyTorch's CUDA caching allocator hands out multiples of 512 bytes (kMinBlockSize)."""
    return -(-nbytes // 512) * 512 if nbytes else 0


class Clock:
    """Event counter shared by every replay and allocation of one estimated step."""

    def __init__(self):
        self.now = 0
        self.open: list[Record] = []     # records made one by one since the last run was placed
        self.runs: list = []             # the runs before it: lists of Records, record_log.Shifted
        self.phases: list[tuple[str, int]] = []

    @property
    def records(self) -> RecordLog:
        """Every record so far, in order (a `RecordLog` over the runs: read, do not keep)."""
        return RecordLog(self.runs + [self.open])

    def count(self) -> int:
        return sum(len(run) for run in self.runs) + len(self.open)

    def place(self, run) -> None:
        """Append a run of records (a `record_log.Shifted`) after those made so far."""
        if self.open:
            self.runs.append(self.open)
            self.open = []
        self.runs.append(run)

    def pieces(self, lo: int, hi: int) -> list:
        """The records lo..hi-1 (positions in record order) as the runs' parts that hold them:
        lists of Records, and `Shifted` parts."""
        out, position = [], 0
        for run in self.runs + [self.open]:
            k = len(run)
            a, b = max(lo - position, 0), min(hi - position, k)
            if a < b:
                out.append(run[a:b] if isinstance(run, list) else run.part(a, b))
            position += k
        return out

    def tick(self) -> int:
        self.now += 1
        return self.now

    def alloc(self, nbytes: int, category, phase: str, op: str = "", module: str = "") -> Record:
        # cuda_rounded and tick, inlined: this runs for every allocation of the step
        self.now = now = self.now + 1
        rec = Record(-(-nbytes // 512) * 512, now, None, category, phase, module, op)
        self.open.append(rec)
        return rec

    def free(self, rec: Record) -> None:
        if rec.free_at is None:
            self.now = rec.free_at = self.now + 1   # tick, inlined

    def phase(self, name: str) -> None:
        self.phases.append((name, self.now + 1))


@dataclass
class ReplayOptions:
    trainable: Callable[[str], bool]              # parameter name -> requires grad
    inputs_require_grad: frozenset = frozenset()  # graph input roles whose tensors require grad
    gradient_checkpointing: bool = False
    phase_prefix: str = ""
    low_dtype: str = "float16"    # what the graph's float16 runs as (graphs are recorded in float16)


@dataclass
class Replayed:
    unknown_ops: set = field(default_factory=set)
    saved_by_module: dict = field(default_factory=dict)   # module -> activation bytes kept
    param_grads: dict = field(default_factory=dict)       # parameter name -> Record
    input_grads: dict = field(default_factory=dict)       # input role -> Record (caller frees)
    replayer: object = None      # the Replayer, whose size log `resize.sizes_of` reads (set by callers)


def _save_plan(rule: Rule) -> tuple:
    """`rule.save` as (output index or -1, slot, trigger names or None for ANY), in order."""
    plan = []
    for slot, triggers in rule.save.items():
        out = int(slot[3:]) if slot.startswith("out") and slot[3:].isdigit() else -1
        plan.append((out, slot, None if triggers == ANY else triggers))
    return tuple(plan)


# opname -> (name, rule, save plan, unknown?): the rules are fixed, so every replay shares these
_OP_INFO: dict[str, tuple] = {}


def _op_info(name: str) -> tuple:
    info = _OP_INFO.get(name)
    if info is None:
        rule = rule_for(name)
        unknown = rule is None
        if unknown:
            rule = CONSERVATIVE
        info = _OP_INFO[name] = (name, rule, _save_plan(rule), unknown)
    return info


def convolutions(g: Concrete, low_dtype: str) -> dict:
    """op index -> (shape key, dtype) of each convolution: its cuDNN workspace is a transient
    allocation of the call (vramplan/estimate/conv_workspaces.py)."""
    try:
        conv = g.opnames.index("convolution.default")
    except ValueError:
        return {}
    out = {}
    for i, op in enumerate(g.ops):
        if op[0] == conv and op[3]:
            args = dict(op[2])
            if "input" in args and "weight" in args:
                x = args["input"]
                dtype = g.t_dtype[x]
                if dtype == "float16":
                    dtype = low_dtype
                out[i] = (conv_key(g.t_shape[x], g.t_shape[args["weight"]], g.t_shape[op[3][0]]), dtype)
    return out


class Replayer:
    def __init__(self, graph: Concrete, options: ReplayOptions, clock: Clock):
        self.g = graph
        self.opt = options
        self.clock = clock
        self.result = Replayed()
        self.storage_bytes = graph.s_bytes
        self.t_sid = graph.t_sid
        self.t_dtype = graph.t_dtype
        self.t_param = graph.t_param
        self.t_bytes = graph.t_bytes
        self.t_float = [d in FLOATING for d in graph.t_dtype]
        self.op_info = [_op_info(name) for name in graph.opnames]
        self.free_after: dict[int, list[int]] = {}
        s_alloc = graph.s_alloc
        for sid, free in enumerate(graph.s_free):
            if free is not None and s_alloc[sid] is not None:
                self.free_after.setdefault(free, []).append(sid)
        t_sid = self.t_sid
        self.param_sids = {t_sid[t] for t, p in enumerate(self.t_param) if p is not None}
        self.regions = graph.regions if options.gradient_checkpointing else []
        self.region_of = {}
        self.region_end = {}
        self.region_start = {}
        for r in self.regions:
            for i in range(r[1], r[2] + 1):
                self.region_of[i] = r
            self.region_end[r[2]] = r
            self.region_start[r[1]] = r
        self.function_of = {}
        self.function_end = {}
        for f in graph.functions:
            for i in range(f[1], f[2] + 1):
                self.function_of[i] = f
            self.function_end[f[2]] = f
        # last ops of the Functions that keep their saves in ctx until `finish` (HELD_BY_CTX)
        self.held_ends = {f[2] for f in graph.functions if held_by_ctx(f[5] if len(f) > 5 else "")}
        n = len(t_sid)
        self.rg = [False] * n
        t_float = self.t_float
        for tid, name in enumerate(self.t_param):
            if name is not None:
                self.rg[tid] = options.trainable(name) and t_float[tid]
        for role, tid in graph.inputs.items():
            self.rg[tid] = role in options.inputs_require_grad
        self.conv_ops = convolutions(graph, options.low_dtype)
        self.live: dict[int, Record] = {}
        # Where each allocation's size came from, in allocation order, and the decisions that
        # read a size: what `resize.resized_bytes` needs to give this replay's records for the same graph
        # at other sizes (another rank) without replaying it. Sources: 4*sid (a storage), 4*tid+1
        # (a tensor), 4*k+2 (workspace k of `workspaces`), 4*k+3 (a copy of `copied[k]`).
        self.sources: list[int] = []
        self.workspaces: list[tuple] = []       # (op index, kind, made: nonzero)
        self.copied: list[Record] = []
        self.aliases: list[tuple] = []          # (tid, output tid, same bytes)
        self.saved_from: list[tuple] = []       # (module, record) added to saved_by_module
        self.python_alive: dict[int, bool] = {}
        self.holds: dict[int, int] = {}
        self.saved_by_op: dict[int, list[int]] = {}
        self.input_records: dict[int, Record] = {}

    def _workspace(self, i: int, kind: str | None, phase: str, name: str, module: str) -> None:
        if kind is None:
            return
        key, dtype = self.conv_ops[i]
        nbytes = workspace_bytes(key, dtype, kind)
        self.workspaces.append((i, kind, bool(nbytes)))
        if nbytes:
            self.sources.append(4 * len(self.workspaces) - 2)     # 4 * k + 2
            self.clock.free(self.clock.alloc(nbytes, Category.WORKSPACES, phase, name, module))

    # -- storage bookkeeping -------------------------------------------------------------------
    def _hold(self, sid: int) -> None:
        self.holds[sid] = self.holds.get(sid, 0) + 1

    def _release(self, sid: int) -> None:
        self.holds[sid] -= 1
        self._maybe_free(sid)

    def _maybe_free(self, sid: int) -> None:
        if self.holds.get(sid, 0) == 0 and not self.python_alive.get(sid, False) and sid in self.live:
            self.clock.free(self.live.pop(sid))

    def _python_free(self, sid: int, only: dict | None = None) -> None:
        if only is not None and sid not in only:
            return
        self.python_alive[sid] = False
        # _maybe_free, knowing Python no longer holds it
        if self.holds.get(sid, 0) == 0 and sid in self.live:
            self.clock.free(self.live.pop(sid))

    # -- forward -------------------------------------------------------------------------------
    def forward(self, inputs: dict | None = None) -> None:
        """`inputs`: role -> Record already allocated by the caller (kept, not re-counted)."""
        inputs = inputs or {}
        g = self.g
        phase = self.opt.phase_prefix + "forward"
        roles = {tid: role for role, tid in g.inputs.items()}
        role_of_sid = {}   # a storage's role: that of its first tensor that has one
        for t in sorted(roles):
            role_of_sid.setdefault(self.t_sid[t], roles[t])
        for sid, alloc in enumerate(g.s_alloc):
            if alloc == -1 and sid not in self.param_sids:
                role = role_of_sid.get(sid)
                if role in inputs:
                    self.live[sid] = inputs[role]
                else:
                    self.live[sid] = self.clock.alloc(self.storage_bytes[sid], Category.INPUTS, phase)
                    self.sources.append(4 * sid)
                self.python_alive[sid] = True
                self.input_records[sid] = self.live[sid]
        self._forward_ops(0, len(g.ops) - 1, phase)

    def _forward_ops(self, first: int, last: int, phase: str, fresh: dict | None = None) -> None:
        """Replay ops first..last forward: the whole graph (`fresh` None), or a checkpointed
        region recomputed in backward (`fresh` collects the storages it allocates)."""
        g, clock = self.g, self.clock
        ops, modules, op_info, function_of = g.ops, g.modules, self.op_info, self.function_of
        rg, t_float, t_sid, t_param, s_alloc, s_bytes = (self.rg, self.t_float, self.t_sid, self.t_param,
                                                         g.s_alloc, self.storage_bytes)
        live, python_alive, holds, saved_by_op = self.live, self.python_alive, self.holds, self.saved_by_op
        held_ends = self.held_ends
        param_sids, unknown_ops, saved_by_module = self.param_sids, self.result.unknown_ops, self.result.saved_by_module
        region_of, region_end, free_after, input_records = (self.region_of, self.region_end, self.free_after,
                                                            self.input_records)
        python_free = self._python_free
        conv_ops = self.conv_ops
        source, saved_from = self.sources.append, self.saved_from.append
        recompute = fresh is not None
        TEMPORARIES, ACTIVATIONS, AUTOCAST_CACHE = Category.TEMPORARIES, Category.ACTIVATIONS, Category.AUTOCAST_CACHE
        for i in range(first, last + 1):
            op = ops[i]
            in_region = not recompute and i in region_of
            name, rule, plan, unknown = op_info[op[0]]
            if unknown:
                unknown_ops.add(name)
            ins = op[2]
            any_rg = False
            if rule.differentiable:
                for _, t in ins:
                    if rg[t] and t_float[t]:
                        any_rg = True
                        break
            function = function_of.get(i) if function_of else None
            if function is not None:
                # inside a custom autograd.Function: no autograd inside; its outputs depend on its inputs
                function_outs = set(function[4])
                inputs_rg = any(rg[t] for t in function[3] if t_float[t])
                any_rg = False
            cast_of_param = name == CAST and any(t_param[t] for _, t in ins)
            module = None
            for tid in op[3]:
                if function is not None and tid in function_outs:
                    rg[tid] = inputs_rg and t_float[tid]
                else:
                    rg[tid] = any_rg and t_float[tid]
                sid = t_sid[tid]
                if s_alloc[sid] == i and sid not in live:
                    if module is None:
                        module = modules[op[1]]
                    rec = clock.alloc(s_bytes[sid], AUTOCAST_CACHE if cast_of_param else TEMPORARIES,
                                      phase, name, module)
                    source(4 * sid)
                    live[sid] = rec
                    python_alive[sid] = True
                    if recompute:
                        fresh[sid] = rec
            if i in conv_ops:
                self._workspace(i, "forward", phase, name, modules[op[1]])
            held = i in held_ends
            if function is not None and i == function[2] and inputs_rg and (
                    not recompute if held else not in_region):
                # what the Function keeps for backward (autograd_rules.FUNCTION_SAVES); kept in
                # ctx attributes (HELD_BY_CTX), from the first forward until `finish`, checkpointed
                # or not (a recomputation's own are let go with it)
                keeps = function_saves(function[5] if len(function) > 5 else "")
                kept_inputs = (function[3] if keeps == "all"
                               else [function[3][k] for k in keeps if k < len(function[3])])
                sids = []
                for tid in kept_inputs:
                    sid = t_sid[tid]
                    if sid not in param_sids and sid not in sids:
                        sids.append(sid)
                        holds[sid] = holds.get(sid, 0) + 1
                saved_by_op[i] = sids
            elif any_rg and not in_region:
                kept = []
                args = None
                for out, slot, triggers in plan:
                    if slot == "*":
                        kept.extend(t for _, t in ins)
                        continue
                    if args is None:
                        args = {}
                        for arg, tid in ins:
                            args.setdefault(arg, tid)
                    if triggers is not None:
                        for t in triggers:
                            if t in args and rg[args[t]]:
                                break
                        else:
                            continue   # no input whose gradient needs this slot requires one
                    if out >= 0:
                        if out < len(op[3]):
                            kept.append(op[3][out])
                    elif slot in args:
                        kept.append(args[slot])
                sids = []
                for tid in kept:
                    sid = t_sid[tid]
                    if sid in param_sids or sid in sids:
                        continue
                    sids.append(sid)
                    holds[sid] = holds.get(sid, 0) + 1
                    rec = live.get(sid)
                    if rec is not None and not rec.saved:
                        rec.saved = True
                        if rec.category is TEMPORARIES:
                            rec.category = ACTIVATIONS
                            module = modules[op[1]]
                            saved_by_module[module] = saved_by_module.get(module, 0) + rec.nbytes
                            saved_from((module, rec))
                saved_by_op[i] = sids
            # after the op: a checkpoint keeps its region's inputs; Python lets go of storages
            if recompute:
                frees = free_after.get(i)
                if frees:
                    for sid in frees:
                        python_free(sid, only=fresh)
                continue
            if i in region_end:
                for tid in region_end[i][3]:
                    sid = t_sid[tid]
                    if sid not in param_sids:
                        holds[sid] = holds.get(sid, 0) + 1  # kept for recomputation
            frees = free_after.get(i)
            if frees:
                for sid in frees:
                    if sid not in input_records:
                        python_free(sid)

    # -- backward ------------------------------------------------------------------------------
    def backward(self, output_grads: dict | None = None) -> Replayed:
        """Start from the loss (or from gradients given for graph outputs, role -> Record)."""
        g, ops = self.g, self.g.ops
        phase = self.opt.phase_prefix + "backward"
        grads: dict[int, Record] = {}
        refs: dict[int, int] = {}
        clock = self.clock
        alloc, free = clock.alloc, clock.free
        TEMPORARIES = Category.TEMPORARIES
        source, aliases = self.sources.append, self.aliases.append

        def give(tid: int, rec: Record) -> None:
            if tid in grads:
                drop(rec)  # accumulated in place into the buffer already there
                return
            grads[tid] = rec
            refs[id(rec)] = refs.get(id(rec), 0) + 1

        def drop(rec: Record) -> None:
            key = id(rec)
            count = refs[key] = refs.get(key, 0) - 1
            if count <= 0:
                free(rec)

        def new_grad(nbytes: int, op_name: str, module: str, src: int) -> Record:
            rec = alloc(nbytes, TEMPORARIES, phase, op_name, module)
            source(src)
            refs[id(rec)] = 0
            return rec

        outputs = g.outputs
        if output_grads is None:
            loss = outputs.get("loss")
            if loss is None:
                return self.result
            give(loss, new_grad(self.t_bytes[loss], "ones_like", "", 4 * loss + 1))
        else:
            for role, rec in output_grads.items():
                if role in outputs:
                    refs[id(rec)] = 0
                    give(outputs[role], rec)

        input_roles = {tid: role for role, tid in g.inputs.items()}
        region_end, region_start, function_end = self.region_end, self.region_start, self.function_end
        saved_pop, op_info, modules, held_ends = self.saved_by_op.pop, self.op_info, g.modules, self.held_ends
        t_sid, param_sids, holds, python_alive, live = (self.t_sid, self.param_sids, self.holds,
                                                        self.python_alive, self.live)
        rg, t_float, t_dtype, t_bytes, t_param = self.rg, self.t_float, self.t_dtype, self.t_bytes, self.t_param
        accumulate = self._accumulate
        conv_ops = self.conv_ops
        for i in range(len(ops) - 1, -1, -1):
            op = ops[i]
            if region_end:
                region = region_end.get(i)
                if region is not None and any(t in grads for t in region[4]):
                    self._recompute(region, phase)
            for t in op[3]:
                if t in grads:
                    break
            else:
                t = None
            if t is not None:
                # the op's backward: a gradient for each input that requires one
                outs = [t for t in op[3] if t in grads]
                function = function_end.get(i) if function_end else None
                if function is not None:
                    self._backward_function(function, outs, grads, refs, give, drop, new_grad, input_roles)
                else:
                    name, rule, _, _ = op_info[op[0]]
                    module = modules[op[1]]
                    out_tid = outs[0]
                    out_grad = grads[out_tid]
                    temps, grad_kind = rule.temps, rule.grad
                    seen = set()
                    made = set()
                    for arg, tid in op[2]:
                        if tid in seen or not rg[tid] or not t_float[tid]:
                            continue
                        seen.add(tid)
                        for slot, count in temps:
                            ref = dict(op[2]).get(slot, op[2][0][1])
                            for _ in range(count):
                                free(new_grad(t_bytes[ref], name, module, 4 * ref + 1))
                        if grad_kind == "none":
                            continue
                        made.add(arg)
                        alias = False
                        if grad_kind == "alias" and t_dtype[tid] == t_dtype[out_tid]:
                            if name in CONCATS:
                                alias = True
                            else:
                                alias = t_bytes[tid] == t_bytes[out_tid]
                                aliases((tid, out_tid, alias))
                        grad = out_grad if alias else new_grad(t_bytes[tid], name, module, 4 * tid + 1)
                        param = t_param[tid]
                        if param is not None and tid not in input_roles:
                            accumulate(param, grad, refs, alias, name, module)
                        else:
                            give(tid, grad)
                    if i in conv_ops:
                        self._workspace(i, backward_kind("input" in made, bool(made & {"weight", "bias"})),
                                        phase, name, module)
                    for t in outs:
                        drop(grads.pop(t))
            saved = saved_pop(i, None) if i not in held_ends else None
            if saved:
                for sid in saved:
                    # _release, inlined
                    holds[sid] -= 1
                    if holds[sid] == 0 and not python_alive.get(sid, False) and sid in live:
                        free(live.pop(sid))
            if region_start:
                region = region_start.get(i)
                if region is not None:
                    for tid in region[3]:
                        sid = t_sid[tid]
                        if sid not in param_sids and holds.get(sid, 0) > 0:
                            self._release(sid)
        for tid, rec in list(grads.items()):
            role = input_roles.get(tid)
            if role is not None and role not in self.result.input_grads:
                self.result.input_grads[role] = rec   # handed to the caller (e.g. text encoder)
            else:
                drop(rec)
        return self.result

    def _backward_function(self, function, outs, grads, refs, give, drop, new_grad, input_roles) -> None:
        """A custom Function's backward recomputes its inner products (transient), then returns a
        gradient per input that requires one."""
        g = self.g
        module = g.modules[function[0]] if isinstance(function[0], int) and function[0] < len(g.modules) else ""
        temps = []
        for i in range(function[1], function[2] + 1):
            for tid in g.ops[i][3]:
                sid = self.t_sid[tid]
                if g.s_alloc[sid] == i:
                    temps.append(new_grad(self.storage_bytes[sid], "function_backward", module, 4 * sid))
        seen = set()
        for tid in function[3]:
            if tid in seen or not self.rg[tid] or self.t_dtype[tid] not in FLOATING:
                continue
            seen.add(tid)
            grad = new_grad(self.t_bytes[tid], "function_backward", module, 4 * tid + 1)
            param = self.t_param[tid]
            if param is not None and tid not in input_roles:
                self._accumulate(param, grad, refs, False, "function_backward", module)
            else:
                give(tid, grad)
        for rec in temps:
            self.clock.free(rec)
        for t in outs:
            drop(grads.pop(t))

    def _accumulate(self, param, grad, refs, alias, op_name, module) -> None:
        """AccumulateGrad: the first gradient becomes `param.grad` (stolen when nothing else holds
        it, else cloned); later ones are added in place."""
        grads = self.result.param_grads
        if param in grads:
            if not alias and refs.get(id(grad), 0) == 0:
                self.clock.free(grad)
            return
        if alias or refs.get(id(grad), 0) > 0:
            self.copied.append(grad)
            self.sources.append(4 * len(self.copied) - 1)     # 4 * k + 3
            grad = self.clock.alloc(grad.nbytes, Category.GRADIENTS, self.opt.phase_prefix + "backward",
                                    op_name, module)
        else:
            grad.category = Category.GRADIENTS
        grads[param] = grad

    def _recompute(self, region, phase) -> None:
        """Non-reentrant checkpoint: rerun the region's forward, keeping what backward needs."""
        fresh: dict[int, Record] = {}
        self._forward_ops(region[1], region[2], phase, fresh)
        for sid, rec in fresh.items():
            # recomputed outputs are dropped; only what autograd holds stays
            if self.python_alive.get(sid) and self.live.get(sid) is rec:
                self._python_free(sid)

    def finish(self, keep: set | None = None) -> None:
        """Free what is left (graph outputs, inputs, dead-end saves), except records in `keep`
        (inputs the caller owns)."""
        keep_ids = {id(r) for r in (keep or ())}
        for sids in self.saved_by_op.values():
            for sid in sids:
                self.holds[sid] -= 1
        self.saved_by_op.clear()
        for sid, rec in list(self.live.items()):
            if id(rec) not in keep_ids:
                self.clock.free(rec)
        self.live.clear()

"""Replay a recorded forward graph with autograd's rules: forward, then backward.

The graph (recorded once per model, see `vramplan/simulate/record.py`) says which op made which
storage and when Python let go of it. For a given spec we decide which tensors require grad
(trainable weights, a trained text encoder's output), which storages autograd keeps for
backward (`autograd_rules.py`), which are recomputed under gradient checkpointing, and then walk
backward in reverse op order allocating each gradient. Every allocation becomes a `Record`
(bytes rounded to the CUDA allocator's 512-byte blocks); `timeline.analyse` finds the peak.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from vramplan.estimate.autograd_rules import ANY, Rule, rule_for
from vramplan.estimate.graph import Graph
from vramplan.footprint import Category
from vramplan.timeline import Record

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4,
            "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "complex64": 8, "complex128": 16}
FLOATING = {"float32", "float16", "bfloat16", "float64", "complex64", "complex128"}
CONSERVATIVE = Rule(save={"*": ANY})


def cuda_rounded(nbytes: int) -> int:
    return -(-nbytes // 512) * 512 if nbytes else 0


@dataclass
class ReplayOptions:
    trainable: Callable[[str], bool]          # parameter name -> requires grad
    inputs_require_grad: frozenset = frozenset()  # graph input roles whose tensors require grad
    gradient_checkpointing: bool = False
    backward: bool = True


@dataclass
class ReplayResult:
    records: list
    phases: list                       # [(phase, first event)]
    unknown_ops: set = field(default_factory=set)
    events: int = 0
    saved_by_module: dict = field(default_factory=dict)   # module -> activation bytes kept


class _Clock:
    def __init__(self, start: int = 0):
        self.now = start

    def tick(self) -> int:
        self.now += 1
        return self.now


class Replayer:
    def __init__(self, graph: Graph, env: dict, options: ReplayOptions, clock: _Clock | None = None,
                 phase_prefix: str = ""):
        self.g = graph
        self.opt = options
        self.clock = clock or _Clock()
        self.prefix = phase_prefix
        values = graph.evaluate(env)
        data = graph.data
        dtypes = data["dtypes"]
        self.storage_bytes = [cuda_rounded(values[s[0]]) for s in data["storages"]]
        self.t_sid = [t[0] for t in data["tensors"]]
        self.t_dtype = [dtypes[t[1]] for t in data["tensors"]]
        self.t_param = [t[3] for t in data["tensors"]]
        self.t_bytes = []
        for t in data["tensors"]:
            numel = 1
            for e in t[2]:
                numel *= values[e]
            self.t_bytes.append(numel * ITEMSIZE.get(dtypes[t[1]], 4))
        self.free_after: dict[int, list[int]] = {}
        for sid, s in enumerate(data["storages"]):
            if s[2] is not None:
                self.free_after.setdefault(s[2], []).append(sid)
        self.param_sids = {self.t_sid[t] for t, p in enumerate(self.t_param) if p is not None}
        self.input_tids = data.get("inputs", {})
        self.regions = data["regions"] if options.gradient_checkpointing else []
        self.records: list[Record] = []
        self.phases: list = []
        self.unknown: set = set()

    # -- bookkeeping ------------------------------------------------------------------------------
    def _alloc(self, nbytes: int, category, phase: str, op: str = "", module: str = "") -> Record:
        rec = Record(nbytes=cuda_rounded(nbytes) if nbytes % 512 else nbytes, alloc_at=self.clock.tick(),
                     category=category, phase=phase, op=op, module=module)
        self.records.append(rec)
        return rec

    def _free(self, rec: Record) -> None:
        if rec.free_at is None:
            rec.free_at = self.clock.tick()

    def _phase(self, name: str) -> None:
        self.phases.append((self.prefix + name, self.clock.now + 1))

    # -- the replay -------------------------------------------------------------------------------
    def run(self) -> ReplayResult:
        g, ops = self.g, self.g.ops
        n_tensors = len(self.t_sid)
        rg = [False] * n_tensors
        for tid, name in enumerate(self.t_param):
            if name is not None:
                rg[tid] = self.opt.trainable(name) and self.t_dtype[tid] in FLOATING
        for role, tid in self.input_tids.items():
            rg[tid] = role in self.opt.inputs_require_grad

        region_of = {}
        region_end = {}
        for r in self.regions:
            for i in range(r[1], r[2] + 1):
                region_of[i] = r
            region_end[r[2]] = r

        # storage state
        live: dict[int, Record] = {}          # sid -> record of the current incarnation
        python_alive: dict[int, bool] = {}
        holds: dict[int, int] = {}            # sid -> number of autograd / checkpoint holds
        saved_by_op: dict[int, list[int]] = {}
        saved_module_bytes: dict[str, int] = {}

        def release(sid: int) -> None:
            holds[sid] -= 1
            if holds[sid] == 0 and not python_alive.get(sid, False) and sid in live:
                self._free(live.pop(sid))

        def hold(sid: int) -> None:
            holds[sid] = holds.get(sid, 0) + 1

        # inputs (latents, cached embeddings...) and constants made before the graph
        for sid, s in enumerate(g.storages):
            if s[1] == -1 and sid not in self.param_sids:
                live[sid] = self._alloc(self.storage_bytes[sid], Category.INPUTS, self.prefix + "forward")
                python_alive[sid] = True

        self._phase("forward")
        for i, op in enumerate(ops):
            self._forward_op(i, op, rg, live, python_alive, holds, saved_by_op, saved_module_bytes,
                             region_of, hold, save=True)
            if i in region_end and self.opt.backward:
                for tid in region_end[i][3]:
                    sid = self.t_sid[tid]
                    if sid not in self.param_sids:
                        hold(sid)
            for sid in self.free_after.get(i, ()):
                python_alive[sid] = False
                if holds.get(sid, 0) == 0 and sid in live:
                    self._free(live.pop(sid))

        if self.opt.backward:
            self._phase("backward")
            self._backward(rg, live, python_alive, holds, saved_by_op, region_end, release, hold)

        for rec in live.values():
            self._free(rec)
        live.clear()
        return ReplayResult(self.records, self.phases, self.unknown, self.clock.now, saved_module_bytes)

    def _forward_op(self, i, op, rg, live, python_alive, holds, saved_by_op, saved_module_bytes,
                    region_of, hold, save: bool, phase: str = "forward", new_records: dict | None = None):
        g = self.g
        name = g.opname(op)
        rule = rule_for(name)
        if rule is None:
            self.unknown.add(name)
            rule = CONSERVATIVE
        args = {}
        for arg, tid in op[2]:
            args.setdefault(arg, tid)
        any_rg = rule.differentiable and any(rg[t] for _, t in op[2] if self.t_dtype[t] in FLOATING)
        is_cast_of_param = name == "_to_copy.default" and any(self.t_param[t] for _, t in op[2])
        for tid in op[3]:
            rg[tid] = any_rg and self.t_dtype[tid] in FLOATING
            sid = self.t_sid[tid]
            if g.storages[sid][1] == i and sid not in live:
                category = Category.AUTOCAST_CACHE if is_cast_of_param else Category.TEMPORARIES
                live[sid] = self._alloc(self.storage_bytes[sid], category, self.prefix + phase,
                                        name, g.module(op))
                python_alive[sid] = True
                if new_records is not None:
                    new_records[sid] = live[sid]
        if not (save and any_rg):
            return
        if i in region_of and phase == "forward":
            return  # checkpointed: nothing kept now, recomputed in backward
        kept = []
        for slot, triggers in rule.save.items():
            if triggers == ANY:
                needed = True
            else:
                needed = any(rg[args[t]] for t in triggers if t in args)
            if not needed:
                continue
            if slot.startswith("out") and slot[3:].isdigit():
                k = int(slot[3:])
                tid = op[3][k] if k < len(op[3]) else None
            elif slot == "*":
                for _, tid in op[2]:
                    kept.append(tid)
                continue
            else:
                tid = args.get(slot)
            if tid is not None:
                kept.append(tid)
        sids = []
        for tid in kept:
            sid = self.t_sid[tid]
            if sid in self.param_sids or sid in sids:
                continue
            sids.append(sid)
            hold(sid)
            rec = live.get(sid)
            if rec is not None:
                if not rec.saved and rec.category is Category.TEMPORARIES:
                    rec.category = Category.ACTIVATIONS
                    module = g.module(op)
                    saved_module_bytes[module] = saved_module_bytes.get(module, 0) + rec.nbytes
                rec.saved = True
        saved_by_op[i] = sids

    def _backward(self, rg, live, python_alive, holds, saved_by_op, region_end, release, hold):
        g, ops = self.g, self.g.ops
        grads: dict[int, Record] = {}        # tid -> gradient record
        grad_refs: dict[int, int] = {}       # id(record) -> tensors sharing it

        def give(tid: int, rec: Record) -> None:
            if tid in grads:
                # accumulate in place into the existing buffer; the incoming one is dropped
                drop(rec)
                return
            grads[tid] = rec
            grad_refs[id(rec)] = grad_refs.get(id(rec), 0) + 1

        def drop(rec: Record) -> None:
            grad_refs[id(rec)] = grad_refs.get(id(rec), 0) - 1
            if grad_refs[id(rec)] <= 0:
                self._free(rec)

        def new_grad(nbytes: int, op_name: str, module: str) -> Record:
            rec = self._alloc(nbytes, Category.TEMPORARIES, self.prefix + "backward", op_name, module)
            grad_refs[id(rec)] = 0
            return rec

        loss = g.data["outputs"].get("loss")
        if loss is None:
            return
        start = new_grad(self.t_bytes[loss], "ones_like", "")
        give(loss, start)

        param_grads: dict[str, Record] = {}
        recomputed_from: dict[int, int] = {}
        for i in range(len(ops) - 1, -1, -1):
            op = ops[i]
            if i in region_end and any(t in grads for t in self._region_outputs(region_end[i])):
                self._recompute(region_end[i], rg, live, python_alive, holds, saved_by_op, hold)
                for tid in region_end[i][3]:
                    sid = self.t_sid[tid]
                    if sid not in self.param_sids:
                        recomputed_from[sid] = recomputed_from.get(sid, 0) + 1
            outs_with_grad = [t for t in op[3] if t in grads]
            if not outs_with_grad:
                continue
            name = g.opname(op)
            rule = rule_for(name) or CONSERVATIVE
            module = g.module(op)
            out_grad = grads[outs_with_grad[0]]
            out_tid = outs_with_grad[0]
            seen_inputs = set()
            for arg, tid in op[2]:
                if tid in seen_inputs or not rg[tid] or self.t_dtype[tid] not in FLOATING:
                    continue
                seen_inputs.add(tid)
                for slot, count in rule.temps:
                    ref = op[2][0][1] if slot == "self" else dict(op[2]).get(slot, op[2][0][1])
                    temps = [new_grad(self.t_bytes[ref], name, module) for _ in range(count)]
                    for t in temps:
                        self._free(t)
                if rule.grad == "none":
                    continue
                alias = rule.grad == "alias" and self.t_dtype[tid] == self.t_dtype[out_tid] and (
                    name in ("cat.default", "stack.default") or self.t_bytes[tid] == self.t_bytes[out_tid])
                if alias:
                    grad = out_grad
                    grad_refs[id(grad)] = grad_refs.get(id(grad), 0)  # shared; give() adds a ref
                else:
                    grad = new_grad(self.t_bytes[tid], name, module)
                param = self.t_param[tid]
                if param is not None:
                    self._accumulate_param(param, grad, param_grads, grad_refs, alias, name, module)
                else:
                    give(tid, grad)
            for t in outs_with_grad:
                rec = grads.pop(t)
                drop(rec)
            for sid in saved_by_op.pop(i, ()):
                release(sid)
            region = self._region_starting(i)
            if region is not None:
                for tid in region[3]:
                    sid = self.t_sid[tid]
                    if sid not in self.param_sids and holds.get(sid, 0) > 0:
                        release(sid)
        for rec in list(grads.values()):
            drop(rec)
        # gradients stay until the optimizer has stepped; the caller frees them
        self.param_grad_records = param_grads
        for sids in saved_by_op.values():
            for sid in sids:
                release(sid)

    def _accumulate_param(self, param, grad, param_grads, grad_refs, alias, op_name, module):
        existing = param_grads.get(param)
        if existing is not None:
            if not alias and grad_refs.get(id(grad), 0) == 0:
                self._free(grad)
            return
        if alias or grad_refs.get(id(grad), 0) > 0:
            # AccumulateGrad clones a gradient it cannot steal
            grad = self._alloc(grad.nbytes, Category.GRADIENTS, self.prefix + "backward", op_name, module)
        else:
            grad.category = Category.GRADIENTS
        param_grads[param] = grad

    def _region_outputs(self, region) -> list:
        return region[4]

    def _region_starting(self, i):
        for r in self.regions:
            if r[1] == i:
                return r
        return None

    def _recompute(self, region, rg, live, python_alive, holds, saved_by_op, hold):
        """Non-reentrant checkpoint: rerun the region's forward, keeping what backward needs."""
        start, end = region[1], region[2]
        new_records: dict[int, Record] = {}
        for i in range(start, end + 1):
            op = self.g.ops[i]
            self._forward_op(i, op, rg, live, python_alive, holds, saved_by_op, {}, {}, hold,
                             save=True, phase="backward", new_records=new_records)
            for sid in self.free_after.get(i, ()):
                if sid in new_records:
                    python_alive[sid] = False
                    if holds.get(sid, 0) == 0 and sid in live:
                        self._free(live.pop(sid))
        # the recomputed region outputs are discarded; only what autograd holds stays
        for sid, rec in new_records.items():
            if python_alive.get(sid) and holds.get(sid, 0) == 0 and sid in live and live[sid] is rec:
                python_alive[sid] = False
                self._free(live.pop(sid))

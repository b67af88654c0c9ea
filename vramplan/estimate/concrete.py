"""A recorded graph with every size evaluated, ready to replay; and splicing adapted layers in.

`concretize(graph, env)` evaluates a recorded `Graph`'s formulas at the user's sizes.
`splice(graph, sites)` replaces the ops of chosen module calls (a Linear the method wraps) by a
template of the adapted layer (see vramplan/simulate/record_templates.py), each instantiated with
that module's sizes: the template's input is the call's input, its output takes over the call's
output (consumers and Python lifetime), its base weights are the module's, its adapter weights
are new trainable parameters, and its cached autocast casts live until the host graph's autocast
region exits.
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass, field
from math import prod

from vramplan.estimate.graph import Graph

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4,
            "int16": 2, "int8": 1, "uint8": 1, "bool": 1, "complex64": 8, "complex128": 16}


@dataclass
class Concrete:
    opnames: list
    modules: list
    ops: list             # (opname idx, module idx, [(arg, tid)], [tid])
    t_sid: list
    t_dtype: list
    t_shape: list
    t_bytes: list
    t_param: list
    s_bytes: list
    s_alloc: list         # op index, -1 (before the graph) or None (dropped by a splice)
    s_free: list          # op index after which Python lets go, or None
    regions: list         # (module idx, first op, last op, [in tids], [out tids])
    calls: list           # (module path, first op, last op, [in tids], [out tids])
    functions: list       # custom autograd.Function calls: (module idx, first, last, [in], [out])
    inputs: dict
    outputs: dict
    markers: dict
    unknown: set = field(default_factory=set)
    # a spliced graph: (the sites' signature, host tensors, host storages, then each appended
    # tensor's and storage's (site, template id)) -- what `retarget` needs
    origin: tuple | None = None

    def opname(self, op) -> str:
        return self.opnames[op[0]]

    def module(self, op) -> str:
        return self.modules[op[1]]


def concretize(graph: Graph, env: dict) -> Concrete:
    values = graph.evaluate(env)
    data = graph.data
    dtypes = data["dtypes"]
    itemsizes = [ITEMSIZE.get(d, 4) for d in dtypes]
    tensors = data["tensors"]
    # column by column: each is one pass in C-level comprehensions, not a loop of appends
    t_shape = [tuple([values[e] for e in t[2]]) for t in tensors]
    storages = data["storages"]
    modules = data["modules"]
    return Concrete(
        opnames=list(data["opnames"]), modules=list(modules),
        ops=[(o[0], o[1], list(map(tuple, o[2])), list(o[3])) for o in data["ops"]],
        t_sid=[t[0] for t in tensors], t_dtype=[dtypes[t[1]] for t in tensors], t_shape=t_shape,
        t_bytes=[prod(shape) * itemsizes[t[1]] for t, shape in zip(tensors, t_shape)],
        t_param=[t[3] for t in tensors],
        s_bytes=[values[s[0]] for s in storages],
        s_alloc=[s[1] for s in storages], s_free=[s[2] for s in storages],
        regions=[tuple(r) for r in data["regions"]],
        calls=[(modules[c[0]], c[1], c[2], c[3], c[4]) for c in data["calls"]],
        functions=[tuple(f) for f in data.get("functions", [])],
        inputs=dict(data.get("inputs", {})), outputs=dict(data.get("outputs", {})),
        markers=dict(data.get("markers", {})))


@dataclass
class Site:
    """Replace the ops of `graph.calls[call]` by `template`; template parameters named
    "base:<name>" become the host's `<prefix><name>` ("base_layer.weight" -> the module's
    "weight"), "adapter:<name>" become new parameters `<prefix><name>`."""
    call: int
    template: Concrete
    prefix: str          # the module's parameters, e.g. "unet.down_blocks.0...attn1.to_q."
    adapter_prefix: str  # the adapter's parameters (shared across sites for hypernetworks)
    key: str = ""        # which recorded template (its structure; `template` is it at this site's sizes)


def _adapter_suffix(name: str) -> str:
    # "adapter:lora_A.weight" -> "lora_A.weight"; hypernetwork weights drop their "hyper." too
    return name.partition(":")[2].removeprefix("hyper.")


class _TemplatePlan:
    """What splicing `template` needs that does not depend on the site: computed once per
    template (sites of the same sizes share one) instead of once per site."""

    def __init__(self, t: Concrete):
        self.x = t.inputs["x"]
        self.x_sid = t.t_sid[self.x]
        self.y = t.outputs["y"]
        self.y_sid = t.t_sid[self.y]
        self.base = []   # (tid, the host parameter's name relative to the module)
        for tid, name in enumerate(t.t_param):
            if name is None or tid == self.x:
                continue
            role, _, rel = name.partition(":")
            if role == "base":
                self.base.append((tid, rel.removeprefix("base_layer.")))
        self.end = len(t.ops) - 1
        self.param_suffix = [None if name is None else _adapter_suffix(name) for name in t.t_param]
        # per op: name, the autocast cast's adapter weight (suffix, or None), ins, outs, module suffix
        self.ops = []
        for op in t.ops:
            name = t.opnames[op[0]]
            cast = None
            if name == "_to_copy.default" and op[2] and t.t_param[op[2][0][1]] is not None:
                source = t.t_param[op[2][0][1]]
                cast = (_adapter_suffix(source), source.startswith("adapter:"))
            module = t.modules[op[1]]
            self.ops.append((name, cast, op[2], op[3], "." + module if module else ""))


def splice(host: Concrete, sites: list[Site]) -> Concrete:
    if not sites:
        return host
    by_start = {host.calls[s.call][1]: (k, s) for k, s in enumerate(sites)}   # (site's index, site)
    host_t_sid, host_ops, host_s_alloc = host.t_sid, host.ops, host.s_alloc
    # host tensors on the storage of a spliced call's output (views of it, reshapes after it)
    out_sids = {host_t_sid[host.calls[s.call][4][0]] for s in sites}
    tids_of_storage: dict[int, list[int]] = {}
    for tid, sid in enumerate(host_t_sid):
        if sid in out_sids:
            tids_of_storage.setdefault(sid, []).append(tid)
    param_tid = {name: tid for tid, name in enumerate(host.t_param) if name is not None}
    out = Concrete(opnames=list(host.opnames), modules=list(host.modules), ops=[],
                   t_sid=list(host_t_sid), t_dtype=list(host.t_dtype), t_shape=list(host.t_shape),
                   t_bytes=list(host.t_bytes), t_param=list(host.t_param), s_bytes=list(host.s_bytes),
                   s_alloc=list(host_s_alloc), s_free=list(host.s_free), regions=[], calls=[], functions=[],
                   inputs=dict(host.inputs), outputs=dict(host.outputs), markers={})
    out_ops, out_t_sid, out_t_dtype, out_t_shape, out_t_bytes, out_t_param = (
        out.ops, out.t_sid, out.t_dtype, out.t_shape, out.t_bytes, out.t_param)
    out_s_bytes, out_s_alloc, out_s_free = out.s_bytes, out.s_alloc, out.s_free
    opname_idx = {n: i for i, n in enumerate(out.opnames)}
    module_idx = {n: i for i, n in enumerate(out.modules)}
    plans: dict[int, _TemplatePlan] = {}    # id(template) -> its plan (templates outlive the call)
    new_index: dict[int, int] = {}          # host op index -> new op index (last emitted for it)
    replace: dict[int, int] = {}            # host tid -> tid that stands for it from now on
    pending_free: list = []                 # (new storage, host storage whose free it inherits)
    pending_cache: list = []                # new storages freed at the host's autocast exit
    cast_cache: dict = {}                   # adapter weight name -> tid of its autocast cast
    origin_t: list = []                     # each appended tensor's (site, template tid)
    origin_s: list = []                     # each appended storage's (site, template sid)
    i = 0
    n = len(host_ops)
    while i < n:
        k_site, site = by_start.get(i, (None, None))
        if site is None:
            op = host_ops[i]
            if replace:
                for _, t in op[2]:
                    if t in replace:
                        op = (op[0], op[1], [(a, replace.get(t, t)) for a, t in op[2]], op[3])
                        break
            new_index[i] = len(out_ops)
            out_ops.append(op)
            i += 1
            continue
        path, first, last, in_tids, out_tids = host.calls[site.call]
        t = site.template
        plan = plans.get(id(t))
        if plan is None:
            plan = plans[id(t)] = _TemplatePlan(t)
        t_sid, t_s_alloc, t_s_free, t_s_bytes = t.t_sid, t.s_alloc, t.s_free, t.s_bytes
        t_dtype, t_shape, t_bytes, param_suffix = t.t_dtype, t.t_shape, t.t_bytes, plan.param_suffix
        adapter_prefix = site.adapter_prefix
        tmap: dict[int, int] = {}
        smap: dict[int, int] = {}
        x_tid = replace.get(in_tids[0], in_tids[0])
        tmap[plan.x] = x_tid
        smap[plan.x_sid] = out_t_sid[x_tid]
        for tid, rel in plan.base:
            tmap[tid] = param_tid[site.prefix + rel]
            smap[t_sid[tid]] = out_t_sid[tmap[tid]]
        start_new = len(out_ops)
        t_end, y_sid = plan.end, plan.y_sid
        host_out_sid = host_t_sid[out_tids[0]]

        def new_tid(tid):
            sid = t_sid[tid]
            new_sid = smap.get(sid)
            if new_sid is None:
                new_sid = smap[sid] = len(out_s_bytes)
                out_s_bytes.append(t_s_bytes[sid])
                origin_s.append((k_site, sid))
                alloc = t_s_alloc[sid]
                out_s_alloc.append(-1 if alloc == -1 else start_new + alloc)
                free = t_s_free[sid]
                out_s_free.append(None)
                if alloc != -1:
                    if sid == y_sid:
                        pending_free.append((new_sid, host_out_sid))
                    elif free is not None and free <= t_end:
                        out_s_free[new_sid] = start_new + free
                    else:
                        # still held when the template's autocast region closed: autocast's
                        # cache of a weight cast, which lives until the host's region closes
                        pending_cache.append(new_sid)
            out_t_sid.append(new_sid)
            origin_t.append((k_site, tid))
            out_t_dtype.append(t_dtype[tid])
            out_t_shape.append(t_shape[tid])
            out_t_bytes.append(t_bytes[tid])
            suffix = param_suffix[tid]
            out_t_param.append(None if suffix is None else adapter_prefix + suffix)
            return len(out_t_sid) - 1

        for name, cast, op_ins, op_outs, module_suffix in plan.ops:
            if cast is not None:
                shared = adapter_prefix + cast[0]
                if cast[1] and shared in cast_cache:
                    # autocast casts a weight once per region (its cache): later sites reuse it
                    tmap[op_outs[0]] = cast_cache[shared]
                    continue
            ins = []
            for arg, tid in op_ins:
                new = tmap.get(tid)
                if new is None:
                    new = tmap[tid] = new_tid(tid)
                ins.append((arg, new))
            outs = []
            for tid in op_outs:
                new = tmap.get(tid)
                if new is None:
                    new = tmap[tid] = new_tid(tid)
                outs.append(new)
            if cast is not None and cast[1]:
                cast_cache[shared] = outs[0]
            name_index = opname_idx.get(name)
            if name_index is None:
                name_index = opname_idx[name] = len(out.opnames)
                out.opnames.append(name)
            mod = path + module_suffix
            mod_index = module_idx.get(mod)
            if mod_index is None:
                mod_index = module_idx[mod] = len(out.modules)
                out.modules.append(mod)
            out_ops.append((name_index, mod_index, ins, outs))
        for f in t.functions:
            out.functions.append((f[0], start_new + f[1], start_new + f[2], [tmap[x] for x in f[3]],
                                  [tmap[x] for x in f[4]], *f[5:]))
        y = tmap[plan.y]
        # the host ops of this call, and what they allocated, are gone
        last_new = len(out_ops) - 1
        for k in range(first, last + 1):
            new_index[k] = last_new
            for tid in host_ops[k][3]:
                sid = host_t_sid[tid]
                if host_s_alloc[sid] == k:
                    out_s_alloc[sid] = None
        replace[out_tids[0]] = y
        for host_out in out_tids[1:]:
            replace[host_out] = y
        # host tensors that view the call's output (reshapes after it) now view the template's
        for tid in tids_of_storage.get(host_out_sid, ()):
            out_t_sid[tid] = out_t_sid[y]
        i = last + 1
    # frees and markers in new op indices
    get_new = new_index.get
    for sid, free in enumerate(host.s_free):
        out_s_free[sid] = None if free is None else get_new(free, free)
        if out_s_alloc[sid] not in (None, -1):
            out_s_alloc[sid] = new_index[host_s_alloc[sid]]
    for new_sid, host_sid in pending_free:
        out_s_free[new_sid] = out_s_free[host_sid]
    exit_at = get_new(host.markers.get("autocast_exit", n - 1), len(out_ops) - 1)
    for new_sid in pending_cache:
        out_s_free[new_sid] = exit_at
    out.markers = {k: get_new(v, v) for k, v in host.markers.items()}
    out.regions = [(r[0], new_index[r[1]] if r[1] not in by_start else _first_new(new_index, r[1], out),
                    new_index[r[2]], [replace.get(t, t) for t in r[3]], [replace.get(t, t) for t in r[4]])
                   for r in host.regions]
    out.calls = [(c[0], new_index[c[1]], new_index[c[2]], c[3], c[4]) for c in host.calls]
    # host functions inside a spliced call are gone (the template's own took their place);
    # the calls' op ranges do not overlap, so one sorted search finds the range a start is in
    spliced = sorted((host.calls[site.call][1], host.calls[site.call][2]) for site in sites)
    starts = [a for a, _ in spliced]

    def inside_spliced(op: int) -> bool:
        k = bisect.bisect_right(starts, op) - 1
        return k >= 0 and op <= spliced[k][1]

    out.functions += [(f[0], new_index[f[1]], new_index[f[2]], [replace.get(t, t) for t in f[3]],
                       [replace.get(t, t) for t in f[4]], *f[5:]) for f in host.functions
                      if not inside_spliced(f[1])]
    out.inputs = {k: replace.get(v, v) for k, v in host.inputs.items()}
    out.outputs = {k: replace.get(v, v) for k, v in host.outputs.items()}
    out.origin = (_signature(sites), len(host_t_sid), len(host.s_bytes), tuple(origin_t), tuple(origin_s))
    return out


def _signature(sites: list[Site]) -> tuple:
    return tuple((s.call, s.key, s.prefix, s.adapter_prefix) for s in sites)


def retarget(like: Concrete, sites: list[Site]) -> Concrete | None:
    """`splice(host, sites)` from `like`, an earlier splice of the same host whose sites had the
    same templates at other sizes (another rank): splicing never reads a size, so only the
    appended tensors' shapes and bytes and the appended storages' bytes differ; the rest is
    shared with `like` (spliced graphs are only read). None when the sites differ in more."""
    if like.origin is None or not all(s.key for s in sites):
        return None
    signature, n_t, n_s, origin_t, origin_s = like.origin
    if signature != _signature(sites):
        return None
    t_shape, t_bytes, s_bytes = list(like.t_shape), list(like.t_bytes), list(like.s_bytes)
    templates = [s.template for s in sites]
    for j, (k, tid) in enumerate(origin_t, n_t):
        t = templates[k]
        t_shape[j] = t.t_shape[tid]
        t_bytes[j] = t.t_bytes[tid]
    for j, (k, sid) in enumerate(origin_s, n_s):
        s_bytes[j] = templates[k].s_bytes[sid]
    return dataclasses.replace(like, t_shape=t_shape, t_bytes=t_bytes, s_bytes=s_bytes)


def _first_new(new_index, host_op, out) -> int:
    # a region that starts exactly where a spliced call starts begins at the template's first op
    return new_index[host_op - 1] + 1 if host_op > 0 else 0

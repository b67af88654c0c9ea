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

from dataclasses import dataclass, field

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

    def opname(self, op) -> str:
        return self.opnames[op[0]]

    def module(self, op) -> str:
        return self.modules[op[1]]


def concretize(graph: Graph, env: dict) -> Concrete:
    values = graph.evaluate(env)
    data = graph.data
    dtypes = data["dtypes"]
    t_sid, t_dtype, t_shape, t_bytes, t_param = [], [], [], [], []
    for t in data["tensors"]:
        shape = tuple(values[e] for e in t[2])
        numel = 1
        for d in shape:
            numel *= d
        t_sid.append(t[0])
        t_dtype.append(dtypes[t[1]])
        t_shape.append(shape)
        t_bytes.append(numel * ITEMSIZE.get(dtypes[t[1]], 4))
        t_param.append(t[3])
    modules = data["modules"]
    return Concrete(
        opnames=list(data["opnames"]), modules=list(modules),
        ops=[(o[0], o[1], [tuple(a) for a in o[2]], list(o[3])) for o in data["ops"]],
        t_sid=t_sid, t_dtype=t_dtype, t_shape=t_shape, t_bytes=t_bytes, t_param=t_param,
        s_bytes=[values[s[0]] for s in data["storages"]],
        s_alloc=[s[1] for s in data["storages"]], s_free=[s[2] for s in data["storages"]],
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


def splice(host: Concrete, sites: list[Site]) -> Concrete:
    if not sites:
        return host
    by_start = {host.calls[s.call][1]: s for s in sites}
    tids_of_storage: dict[int, list[int]] = {}
    for tid, sid in enumerate(host.t_sid):
        tids_of_storage.setdefault(sid, []).append(tid)
    param_tid = {name: tid for tid, name in enumerate(host.t_param) if name is not None}
    out = Concrete(opnames=list(host.opnames), modules=list(host.modules), ops=[],
                   t_sid=list(host.t_sid), t_dtype=list(host.t_dtype), t_shape=list(host.t_shape),
                   t_bytes=list(host.t_bytes), t_param=list(host.t_param), s_bytes=list(host.s_bytes),
                   s_alloc=list(host.s_alloc), s_free=list(host.s_free), regions=[], calls=[], functions=[],
                   inputs=dict(host.inputs), outputs=dict(host.outputs), markers={})
    opname_idx = {n: i for i, n in enumerate(out.opnames)}
    module_idx = {n: i for i, n in enumerate(out.modules)}
    new_index: dict[int, int] = {}          # host op index -> new op index (last emitted for it)
    replace: dict[int, int] = {}            # host tid -> tid that stands for it from now on
    pending_free: list = []                 # (new storage, host storage whose free it inherits)
    pending_cache: list = []                # new storages freed at the host's autocast exit
    cast_cache: dict = {}                   # adapter weight name -> tid of its autocast cast
    i = 0
    n = len(host.ops)
    while i < n:
        site = by_start.get(i)
        if site is None:
            op = host.ops[i]
            out.ops.append((op[0], op[1], [(a, replace.get(t, t)) for a, t in op[2]], op[3]))
            new_index[i] = len(out.ops) - 1
            i += 1
            continue
        path, first, last, in_tids, out_tids = host.calls[site.call]
        t = site.template
        tmap: dict[int, int] = {}
        smap: dict[int, int] = {}
        x_tid = replace.get(in_tids[0], in_tids[0])
        tmap[t.inputs["x"]] = x_tid
        smap[t.t_sid[t.inputs["x"]]] = out.t_sid[x_tid]
        for tid, name in enumerate(t.t_param):
            if name is None or tid in tmap:
                continue
            role, _, rel = name.partition(":")
            if role == "base":
                host_name = site.prefix + rel.removeprefix("base_layer.")
                tmap[tid] = param_tid[host_name]
                smap[t.t_sid[tid]] = out.t_sid[tmap[tid]]
        start_new = len(out.ops)
        t_end = len(t.ops) - 1
        autocast_exit = t.markers.get("autocast_exit", t_end)

        def new_tid(tid):
            sid = t.t_sid[tid]
            if sid not in smap:
                smap[sid] = len(out.s_bytes)
                out.s_bytes.append(t.s_bytes[sid])
                alloc = t.s_alloc[sid]
                out.s_alloc.append(-1 if alloc == -1 else start_new + alloc)
                free = t.s_free[sid]
                out.s_free.append(None)
                if alloc != -1:
                    if sid == t.t_sid[t.outputs["y"]]:
                        pending_free.append((smap[sid], host.t_sid[out_tids[0]]))
                    elif free is not None and free <= t_end:
                        out.s_free[smap[sid]] = start_new + free
                    else:
                        # still held when the template's autocast region closed: autocast's
                        # cache of a weight cast, which lives until the host's region closes
                        pending_cache.append(smap[sid])
            out.t_sid.append(smap[sid])
            out.t_dtype.append(t.t_dtype[tid])
            out.t_shape.append(t.t_shape[tid])
            out.t_bytes.append(t.t_bytes[tid])
            name = t.t_param[tid]
            out.t_param.append(None if name is None else
                               site.adapter_prefix + name.partition(":")[2].removeprefix("hyper."))
            return len(out.t_sid) - 1

        for op in t.ops:
            name = t.opnames[op[0]]
            if name == "_to_copy.default" and op[2] and t.t_param[op[2][0][1]] is not None:
                source = t.t_param[op[2][0][1]]
                shared = site.adapter_prefix + source.partition(":")[2].removeprefix("hyper.")
                if source.startswith("adapter:") and shared in cast_cache:
                    # autocast casts a weight once per region (its cache): later sites reuse it
                    tmap[op[3][0]] = cast_cache[shared]
                    continue
            ins = []
            for arg, tid in op[2]:
                if tid not in tmap:
                    tmap[tid] = new_tid(tid)
                ins.append((arg, tmap[tid]))
            outs = []
            for tid in op[3]:
                if tid not in tmap:
                    tmap[tid] = new_tid(tid)
                outs.append(tmap[tid])
            if name == "_to_copy.default" and op[2] and t.t_param[op[2][0][1]] is not None:
                source = t.t_param[op[2][0][1]]
                if source.startswith("adapter:"):
                    cast_cache[site.adapter_prefix + source.partition(":")[2].removeprefix("hyper.")] = outs[0]
            if name not in opname_idx:
                opname_idx[name] = len(out.opnames)
                out.opnames.append(name)
            mod = path + ("." + t.modules[op[1]] if t.modules[op[1]] else "")
            if mod not in module_idx:
                module_idx[mod] = len(out.modules)
                out.modules.append(mod)
            out.ops.append((opname_idx[name], module_idx[mod], ins, outs))
        for f in t.functions:
            out.functions.append((f[0], start_new + f[1], start_new + f[2], [tmap[x] for x in f[3]],
                                  [tmap[x] for x in f[4]], *f[5:]))
        y = tmap[t.outputs["y"]]
        # the host ops of this call, and what they allocated, are gone
        for k in range(first, last + 1):
            new_index[k] = len(out.ops) - 1
            for tid in host.ops[k][3]:
                sid = host.t_sid[tid]
                if host.s_alloc[sid] == k:
                    out.s_alloc[sid] = None
        replace[out_tids[0]] = y
        for host_out in out_tids[1:]:
            replace[host_out] = y
        # host tensors that view the call's output (reshapes after it) now view the template's
        for tid in tids_of_storage.get(host.t_sid[out_tids[0]], ()):
            out.t_sid[tid] = out.t_sid[y]
        i = last + 1
    # frees and markers in new op indices
    for sid in range(len(host.s_free)):
        free = host.s_free[sid]
        out.s_free[sid] = None if free is None else new_index.get(free, free)
        if out.s_alloc[sid] not in (None, -1):
            out.s_alloc[sid] = new_index[host.s_alloc[sid]]
    for new_sid, host_sid in pending_free:
        out.s_free[new_sid] = out.s_free[host_sid]
    exit_at = new_index.get(host.markers.get("autocast_exit", n - 1), len(out.ops) - 1)
    for new_sid in pending_cache:
        out.s_free[new_sid] = exit_at
    out.markers = {k: new_index.get(v, v) for k, v in host.markers.items()}
    out.regions = [(r[0], new_index[r[1]] if r[1] not in by_start else _first_new(new_index, r[1], out),
                    new_index[r[2]], [replace.get(t, t) for t in r[3]], [replace.get(t, t) for t in r[4]])
                   for r in host.regions]
    out.calls = [(c[0], new_index[c[1]], new_index[c[2]], c[3], c[4]) for c in host.calls]
    spliced = [(host.calls[site.call][1], host.calls[site.call][2]) for site in sites]
    out.functions += [(f[0], new_index[f[1]], new_index[f[2]], [replace.get(t, t) for t in f[3]],
                       [replace.get(t, t) for t in f[4]], *f[5:]) for f in host.functions
                      if not any(a <= f[1] <= b for a, b in spliced)]
    out.inputs = {k: replace.get(v, v) for k, v in host.inputs.items()}
    out.outputs = {k: replace.get(v, v) for k, v in host.outputs.items()}
    return out


def _first_new(new_index, host_op, out) -> int:
    # a region that starts exactly where a spliced call starts begins at the template's first op
    return new_index[host_op - 1] + 1 if host_op > 0 else 0

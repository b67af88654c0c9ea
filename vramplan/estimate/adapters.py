"""Where a method wraps modules, splice the recorded template of the adapted layer into the graph.

The templates (`vramplan/models/traces/templates.json.gz`, recorded by
scripts/record_traces.py from real peft layers and our hypernetwork wrapper) are keyed by
(method, layer kind, bias, precision variant, input dtype[, LoKr regime]); each is instantiated
with the wrapped module's sizes and the call's input shape.
"""

from __future__ import annotations

from functools import lru_cache

from vramplan.errors import UsageError
from vramplan.estimate.concrete import Concrete, Site, concretize, retarget, splice
from vramplan.estimate.graph import TRACE_ROOT, parse_graph, read_json_gz
from vramplan.methods.base import MethodImpl
from vramplan.models.inventory import ModuleEntry
from vramplan.spec import TrainingSpec

TEMPLATES = TRACE_ROOT / "templates.json.gz"
TEMPLATE_NAMES = ("B", "H", "W", "R", "D0", "D1", "D2", "D3", "IN", "OUT", "IM", "IN_N", "OL", "OK")


def template_key(method: str, kind: str, bias: bool, variant: str, x_dtype: str, regime: str = "") -> str:
    return "|".join([method, kind, "bias" if bias else "nobias", variant, x_dtype] + ([regime] if regime else []))


@lru_cache(maxsize=1)
def _store() -> dict:
    if not TEMPLATES.exists():
        raise UsageError(f"no layer templates ({TEMPLATES}); run scripts/record_traces.py --templates")
    return read_json_gz(TEMPLATES)


@lru_cache(maxsize=None)
def _template(key: str):
    data = _store().get(key)
    if data is None:
        raise UsageError(f"no recorded layer template {key!r} (run scripts/record_traces.py --templates)")
    return parse_graph(data, TEMPLATE_NAMES)


@lru_cache(maxsize=4096)
def _concrete_template(key: str, env: tuple) -> Concrete:
    # sites with the same sizes (repeated blocks) share one evaluation; splice only reads it
    return concretize(_template(key), dict(env))


def layer_kind(entry: ModuleEntry, x_rank: int) -> str:
    if entry.is_linear:
        return f"linear{x_rank}"
    k = entry.kernel_size[0] if entry.kernel_size else 1
    s = entry.stride[0] if entry.stride else 1
    p = entry.padding[0] if entry.padding else 0
    return f"conv:k{k}:s{s}:p{p}"


def x_dtype_name(dtype: str) -> str:
    # bf16 and fp16 take the same bytes; templates are recorded for fp16
    return "float16" if dtype == "bfloat16" else dtype


def adapted(graph: Concrete, spec: TrainingSpec, method: MethodImpl, component: str,
            entries: list[ModuleEntry], variant: str) -> Concrete:
    """`graph` with every call of `entries` replaced by its adapted template."""
    if not entries:
        return graph
    return splice(graph, _sites(graph, spec, method, component, entries, variant))


def readapted(like: Concrete, spec: TrainingSpec, method: MethodImpl, component: str,
              entries: list[ModuleEntry], variant: str) -> Concrete | None:
    """What `adapted` would give for this spec, from `like`, an adapted graph of the same host
    and templates at other sizes (fit tries rank after rank; `concrete.retarget`), or None when
    the templates differ. The sites are read off `like`: splicing keeps the host's tensors and
    its calls' inputs."""
    if not entries or like.origin is None:
        return None
    return retarget(like, _sites(like, spec, method, component, entries, variant))


def _sites(graph: Concrete, spec: TrainingSpec, method: MethodImpl, component: str,
           entries: list[ModuleEntry], variant: str) -> list[Site]:
    base_variant = variant.removesuffix("-ti").partition("-keep-")[0]
    calls = {}
    for index, call in enumerate(graph.calls):
        calls.setdefault(call[0], index)
    sites = []
    for entry in entries:
        path = f"{component}.{entry.name}"
        index = calls.get(path)
        if index is None:
            raise UsageError(f"{path} is not called in the recorded {component} graph")
        x = graph.calls[index][3][0]
        shape = graph.t_shape[x]
        name, regime, sizes = method.template(spec, entry)
        key = template_key(name, layer_kind(entry, len(shape)), entry.bias, base_variant,
                           x_dtype_name(graph.t_dtype[x]), regime)
        env = dict(sizes)
        if entry.is_linear:
            env["D0"] = shape[0]
            if len(shape) == 3:
                env["D1"] = shape[1]
        else:
            env.update(D0=shape[0], D2=shape[2], D3=shape[3])
        t = _concrete_template(key, tuple(sorted(env.items())))
        # base params keep the module's names; adapter params take the method's names
        sites.append(Site(index, t, f"{component}.{entry.name}.",
                          f"{component}.{method.adapter_prefix(spec, entry)}", key))
    return sites

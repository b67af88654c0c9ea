"""Splicing a site column by column (`concrete._instantiate`, from the template's plan) must give
the graph the per-op loop gives (`concrete.FAST = False`, the reference), field by field: for
every method's templates, the precisions and quantizations that change them, and the
hypernetwork, whose sites share adapter weights (their autocast casts come from the cache)."""

import dataclasses

import pytest

import vramplan.estimate.concrete as concrete
import vramplan.estimate.step as step
from vramplan.estimate.adapters import adapted
from vramplan.estimate.traces import graph_for
from vramplan.methods import get_method
from vramplan.models.inventory import load_model_inventories
from vramplan.spec import build_spec


def _spliced(spec, component, variant, fast: bool, monkeypatch):
    inventories = load_model_inventories(spec.model)
    method = get_method(spec.method)
    entries = method.wrapped_modules(spec, component, inventories)
    host = concrete.concretize(graph_for(spec, component, variant), step._sizes(spec))
    with monkeypatch.context() as m:
        m.setattr(concrete, "FAST", fast)
        m.setattr(concrete, "_PLANS", {})
        return adapted(host, spec, method, component, entries, variant), len(entries)


@pytest.mark.parametrize("options", [
    {"method": "lora"},
    {"method": "lora", "precision": "fp32"},
    {"method": "lora", "precision": "bf16", "base_quant": "nf4"},
    {"method": "lora", "precision": "bf16", "base_quant": "int8", "gradient_checkpointing": True},
    {"method": "lora", "lora_targets": "all-linear+conv"},
    {"method": "lora", "train_text_encoder": True},
    {"method": "loha"},
    {"method": "lokr"},
    {"method": "hypernetwork"},
    {"model": "sdxl", "method": "lora", "precision": "bf16"},
])
def test_column_by_column_is_the_per_op_loop(options, monkeypatch, h):
    spec = build_spec({"model": "sd15", "gpu": "24GB", **options})
    graphs = h.adapted_graphs(spec, monkeypatch)
    assert graphs
    spliced = 0
    for component, variant in graphs:
        reference, sites = _spliced(spec, component, variant, False, monkeypatch)
        fast, _ = _spliced(spec, component, variant, True, monkeypatch)
        for field in dataclasses.fields(reference):
            assert getattr(fast, field.name) == getattr(reference, field.name), (options, component, field.name)
        spliced += sites
    assert spliced > 0


def test_hypernetwork_sites_reuse_the_cached_cast(monkeypatch, h):
    """The hypernetwork's sites share one adapter, so every site after the first takes its
    weights' autocast casts from the cache: those sites go through the per-op loop, and the
    graph has one cast per adapter weight, not one per site."""
    spec = build_spec({"model": "sd15", "gpu": "24GB", "method": "hypernetwork"})
    component, variant = h.adapted_graphs(spec, monkeypatch)[0]
    calls = []
    real = concrete._instantiate

    def spy(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(concrete, "_instantiate", spy)
    monkeypatch.setattr(concrete, "_PLANS", {})
    graph, sites = _spliced(spec, component, variant, True, monkeypatch)
    casts = [op for op in graph.ops if graph.opname(op) == "_to_copy.default"
             and graph.t_param[op[2][0][1]] is not None and "hyper" in graph.t_param[op[2][0][1]]]
    assert sites > 1 and 1 <= len(calls) < sites
    assert len({graph.t_param[op[2][0][1]] for op in casts}) == len(casts)


def _host() -> concrete.Concrete:
    """Two Linear calls on one input (x: tensor 0), each followed by nothing else."""
    return concrete.Concrete(
        opnames=["mm.default"], modules=["a", "b"],
        ops=[(0, 0, [(0, 0), (1, 1)], [3]), (0, 1, [(0, 0), (1, 2)], [4])],
        t_sid=[0, 1, 2, 3, 4], t_dtype=["float16"] * 5, t_shape=[(2, 8)] * 5, t_bytes=[32] * 5,
        t_param=[None, "m.a.weight", "m.b.weight", None, None], s_bytes=[32] * 5,
        s_alloc=[-1, -1, -1, 0, 1], s_free=[None, None, None, 1, None], regions=[],
        calls=[("m.a", 0, 0, [0], [3]), ("m.b", 1, 1, [0], [4])], functions=[], inputs={"x": 0},
        outputs={"y": 4}, markers={"autocast_exit": 1})


def _template() -> concrete.Concrete:
    """x @ cast(A) @ cast(A) + x @ W: the adapter weight A cast twice, as autocast would not."""
    return concrete.Concrete(
        opnames=["_to_copy.default", "mm.default", "add.Tensor"], modules=["", "lora_A"],
        ops=[(0, 1, [(0, 2)], [3]), (0, 1, [(0, 2)], [4]), (1, 1, [(0, 0), (1, 3)], [5]),
             (1, 1, [(0, 5), (1, 4)], [6]), (1, 0, [(0, 0), (1, 1)], [7]), (2, 0, [(0, 6), (1, 7)], [8])],
        t_sid=list(range(9)), t_dtype=["float16"] * 9, t_shape=[(2, 8)] * 9, t_bytes=[32] * 9,
        t_param=[None, "base:base_layer.weight", "adapter:lora_A.weight"] + [None] * 6, s_bytes=[32] * 9,
        s_alloc=[-1, -1, -1, 0, 1, 2, 3, 4, 5], s_free=[None, None, None, None, None, 3, 5, 5, None],
        regions=[], calls=[], functions=[], inputs={"x": 0}, outputs={"y": 8}, markers={})


@pytest.mark.parametrize("shared", [False, True])
def test_a_cached_cast_is_taken_within_and_across_sites(shared, monkeypatch):
    """Autocast casts an adapter weight once per region: a second cast of it, in the same
    template or at a later site with the same adapter (`shared`), is the first one."""
    template = _template()
    sites = [concrete.Site(0, template, "m.a.", "m.shared." if shared else "m.a."),
             concrete.Site(1, template, "m.b.", "m.shared." if shared else "m.b.")]
    graphs = []
    for fast in (False, True):
        monkeypatch.setattr(concrete, "FAST", fast)
        monkeypatch.setattr(concrete, "_PLANS", {})
        graphs.append(concrete.splice(_host(), sites))
    reference, fast = graphs
    for field in dataclasses.fields(reference):
        assert getattr(fast, field.name) == getattr(reference, field.name), field.name
    casts = [op for op in fast.ops if fast.opname(op) == "_to_copy.default"]
    assert len(casts) == (1 if shared else 2)
    assert len(fast.ops) == 2 * 4 + len(casts)        # each site: two mm, one add, the base mm
    # the casts live until the host's autocast region closes (its last op)
    assert all(fast.s_free[fast.t_sid[op[3][0]]] == len(fast.ops) - 1 for op in casts)

"""An adapted graph resized to another rank (`concrete.retarget`, what fit does when it tries
rank after rank) must be the graph splicing gives at that rank, field by field."""

import dataclasses

import pytest

import vramplan.estimate.step as step
from vramplan.estimate.adapters import adapted, readapted
from vramplan.estimate.concrete import concretize
from vramplan.estimate.traces import graph_for
from vramplan.methods import get_method
from vramplan.models.inventory import load_model_inventories
from vramplan.spec import build_spec


def _adapted(spec, component, variant):
    inventories = load_model_inventories(spec.model)
    method = get_method(spec.method)
    entries = method.wrapped_modules(spec, component, inventories)
    host = concretize(graph_for(spec, component, variant), step._sizes(spec))
    return adapted(host, spec, method, component, entries, variant), (method, entries)


def _fields(graph):
    return {f.name: getattr(graph, f.name) for f in dataclasses.fields(graph)}


@pytest.mark.parametrize("options", [
    {"method": "lora"},
    {"method": "lora", "precision": "bf16", "base_quant": "nf4"},
    {"method": "lora", "lora_targets": "all-linear+conv"},
    {"method": "loha"},
    {"method": "lokr"},
    {"method": "lora", "train_text_encoder": True},
])
def test_a_resized_graph_is_the_spliced_one(options, monkeypatch, h):
    base = {"model": "sd15", "gpu": "24GB", **options}
    graphs = h.adapted_graphs(build_spec({**base, "rank": 16}), monkeypatch)
    assert graphs
    for component, variant in graphs:
        first, _ = _adapted(build_spec({**base, "rank": 16}), component, variant)
        resized = 0
        for rank in (4, 8, 32, 128):
            spec = build_spec({**base, "rank": rank})
            expected, (method, entries) = _adapted(spec, component, variant)
            got = readapted(first, spec, method, component, entries, variant)
            if got is None:      # the templates differ with the rank (LoKr's regime): spliced afresh
                continue
            resized += 1
            assert _fields(got) == _fields(expected), (options, component, rank)
            assert got.t_bytes != first.t_bytes
        # LoKr's template regime (which factors are full matrices) follows the rank: spliced afresh
        assert resized >= (0 if options["method"] == "lokr" else 2), (options, component)


def test_nothing_to_resize_without_adapters(monkeypatch, h):
    spec = build_spec({"model": "sd15", "method": "full", "gpu": "24GB"})
    (component, variant), = h.adapted_graphs(spec, monkeypatch)
    graph, (method, entries) = _adapted(spec, component, variant)
    assert entries == [] and graph.origin is None
    assert readapted(graph, spec, method, component, entries, variant) is None

"""Splicing an adapted layer's template into a host graph (`concrete.splice`), on a hand-made
host and template: autocast casts an adapter weight once per region, so a second cast of it, in
the same template or at a later site sharing the adapter (a hypernetwork), is the first one."""


import pytest

import vramplan.estimate.concrete as concrete


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
def test_a_cached_cast_is_taken_within_and_across_sites(shared):
    template = _template()
    sites = [concrete.Site(0, template, "m.a.", "m.shared." if shared else "m.a."),
             concrete.Site(1, template, "m.b.", "m.shared." if shared else "m.b.")]
    graph = concrete.splice(_host(), sites)
    casts = [op for op in graph.ops if graph.opname(op) == "_to_copy.default"]
    assert len(casts) == (1 if shared else 2)
    assert len(graph.ops) == 2 * 4 + len(casts)        # each site: two mm, one add, the base mm
    # the casts live until the host's autocast region closes (its last op)
    assert all(graph.s_free[graph.t_sid[op[3][0]]] == len(graph.ops) - 1 for op in casts)
    # every later use of the adapter weight reads the one cast
    cast_tids = {op[3][0] for op in casts}
    reads = [t for op in graph.ops if graph.opname(op) == "mm.default" for _, t in op[2] if t in cast_tids]
    assert len(reads) == 4
    # the adapter weights are new parameters named by the site's adapter prefix
    adapters = {name for name in graph.t_param if name and "lora_A" in name}
    assert adapters == ({"m.shared.lora_A.weight"} if shared else {"m.a.lora_A.weight", "m.b.lora_A.weight"})

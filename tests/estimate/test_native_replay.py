"""vramplan/estimate/native_replay.py: the C replay of a denoiser gives what the Python Replayer
gives -- every record (bytes, events, category, phase, module, op, saved), the phases, the
result's handles, saved_by_module, unknown ops and the size log that `resize.py` reads -- and
the step, the device floor and the search come out the same with and without it."""

import pytest

import vramplan.estimate.step as step
import vramplan.fit.walk as walk
from vramplan import native
from vramplan.estimate import native_replay
from vramplan.models.inventory import load_model_inventories
from vramplan.spec import build_spec

# Every path the replay takes: LoRA / LoHa (custom autograd Functions) / LoKr / a hypernetwork,
# full fine-tunes (every weight trains), textual inversion (no denoiser weight trains), a
# trained text encoder (the denoiser's inputs require grad), NF4 and int8 bases (bitsandbytes'
# Functions), checkpointing on and off (regions recomputed in backward), eager attention,
# pure 16-bit, and the larger graphs of SDXL and FLUX.
SPECS = [
    {"method": "lora", "rank": 16},
    {"method": "lora", "rank": 16, "gradient_checkpointing": True},
    {"method": "loha", "rank": 8, "gradient_checkpointing": True},
    {"method": "lokr", "rank": 8},
    {"method": "hypernetwork"},
    {"method": "full"},
    {"method": "full", "gradient_checkpointing": True, "precision": "fp16-pure"},
    {"method": "textual-inversion"},
    {"method": "lora", "rank": 16, "train_text_encoder": True, "gradient_checkpointing": True},
    {"method": "lora", "rank": 16, "base_quant": "nf4"},
    {"method": "lora", "rank": 4, "base_quant": "int8", "gradient_checkpointing": True},
    {"method": "lora", "rank": 8, "attention": "eager"},
    {"model": "sdxl", "method": "lora", "rank": 16, "precision": "bf16", "gradient_checkpointing": True},
    {"model": "sdxl", "method": "lora", "rank": 4, "precision": "bf16", "base_quant": "int8"},
    {"model": "flux-dev", "method": "lora", "rank": 16, "precision": "bf16", "gradient_checkpointing": True},
    {"model": "sd21", "method": "dreambooth", "gradient_checkpointing": True},
    {"model": "sd35-medium", "method": "lora", "rank": 8, "precision": "bf16", "train_text_encoder": True},
]


def _spec(options):
    return build_spec({"model": "sd15", "gpu": "80GB", **options})


@pytest.fixture
def built():
    native.reset()
    if not native_replay.available():
        pytest.skip("no C compiler here: the Python Replayer is what runs")
    step.clear_reuse()
    walk.clear_cache()
    yield
    step.clear_reuse()
    walk.clear_cache()


def _in_python(monkeypatch):
    monkeypatch.setattr(native_replay, "replay", lambda *args, **kwargs: None)


def _denoiser_windows() -> list:
    """The kept denoiser replays, as everything a later step reads of them."""
    out = []
    for key, window in step._WINDOWS.items.items():
        if "denoiser" not in key:
            continue
        sizes = window.sizes
        out.append((key, window.rows.rows, window.phases, window.length, window.unknown_ops,
                    window.saved_by_module, window.param_grads, window.input_grads,
                    None if sizes is None else (sizes.sources, sizes.workspaces, sizes.aliases, sizes.saved_from,
                                                sizes.low_dtype)))
    return out


def _records(timeline):
    clock = timeline.clock
    return ([(r.nbytes, r.alloc_at, r.free_at, r.category, r.phase, r.module, r.op, r.saved) for r in clock.records],
            list(clock.phases), clock.now, timeline.saved_by_module, timeline.unknown_ops)


@pytest.mark.parametrize("options", SPECS, ids=lambda o: " ".join(f"{k}={v}" for k, v in o.items()))
def test_the_c_replay_keeps_what_the_python_replay_keeps(built, monkeypatch, options):
    spec = _spec(options)
    inventories = load_model_inventories(spec.model)
    calls = []
    real = native_replay.replay
    monkeypatch.setattr(native_replay, "replay", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = _records(step.build_timeline(spec, inventories))
    in_c = _denoiser_windows()
    assert calls and in_c, "the denoiser was not replayed in C"
    step.clear_reuse()
    _in_python(monkeypatch)
    slow = _records(step.build_timeline(spec, inventories))
    in_python = _denoiser_windows()
    assert in_c == in_python
    assert fast == slow
    rows = in_c[0][1]
    assert any(r[3].value == "activations" for r in rows) or spec.method.value == "textual-inversion"


def test_a_denoiser_resized_from_a_c_replay_is_the_python_one(built, monkeypatch):
    """Another rank resizes the kept replay (`resize.py`) from the C replay's size log."""
    inventories = load_model_inventories(_spec(SPECS[0]).model)
    first, second = _spec({"method": "lora", "rank": 16}), _spec({"method": "lora", "rank": 64})
    step.build_timeline(first, inventories)
    fast = _records(step.build_timeline(second, inventories))
    step.clear_reuse()
    _in_python(monkeypatch)
    step.build_timeline(first, inventories)
    assert _records(step.build_timeline(second, inventories)) == fast


def test_the_device_floor_stops_at_the_same_forward(built, monkeypatch):
    """The floor's check reads the C forward's rows through their columns alone: the same bound
    as from the Python forward's records, and the same floor when it does not stop."""
    found = []
    for options in SPECS[:12]:
        spec = _spec(options)
        seen = []
        bound = walk.device_floor(spec, over=lambda nbytes: seen.append(nbytes) or True)
        whole = (step.clear_reuse(), walk.device_floor(spec))[1]
        found.append((bound, seen, whole))
        step.clear_reuse()
    _in_python(monkeypatch)
    for options, expected in zip(SPECS[:12], found):
        spec = _spec(options)
        seen = []
        bound = walk.device_floor(spec, over=lambda nbytes: seen.append(nbytes) or True)
        whole = (step.clear_reuse(), walk.device_floor(spec))[1]
        assert (bound, seen, whole) == expected, options
        step.clear_reuse()
    assert sum(1 for _, seen, _ in found if seen) >= 10


def test_a_search_finds_the_same_plans_without_the_c_replay(built, monkeypatch):
    from vramplan.fit import fit_request, search

    request = fit_request(build_spec({"model": "sd15", "method": "lora", "gpu": "4GB"}))
    fast = search(request)
    walk.clear_cache()
    step.clear_reuse()
    _in_python(monkeypatch)
    slow = search(request)
    assert [(p.choice, p.to_json()) for p in fast.plans] == [(p.choice, p.to_json()) for p in slow.plans]
    assert fast.plans


def test_without_the_library_the_python_replayer_runs(monkeypatch):
    monkeypatch.setenv("VRAMPLAN_NATIVE", "0")
    native.reset()
    try:
        assert not native_replay.available()
        step.clear_reuse()
        spec = _spec(SPECS[1])
        timeline = step.build_timeline(spec, load_model_inventories(spec.model))
        assert any(key for key in step._WINDOWS.items if "denoiser" in key)
        assert timeline.clock.now > 0
    finally:
        native.reset()
        step.clear_reuse()


# -- made-up graphs: every rule's corner, not only those the recorded models reach --------------

import random  # noqa: E402

from vramplan.estimate.concrete import Concrete  # noqa: E402
from vramplan.estimate.replay import Clock, ReplayOptions, Replayer  # noqa: E402
from vramplan.estimate.resize import sizes_of  # noqa: E402

# op name -> (argument names, outputs): rules that save by trigger, always, by output, none; views
# (aliases), cat, temps, no gradient, bitsandbytes, and an op no rule knows (saves everything)
OPS = {"mm.default": (("self", "mat2"), 1), "add.Tensor": (("self", "other"), 1), "view.default": (("self",), 1),
       "silu.default": (("self",), 1), "cat.default": (("tensors", "tensors"), 1),
       "pow.Tensor_Scalar": (("self",), 1), "rsqrt.default": (("self",), 1),
       "native_layer_norm.default": (("input", "weight", "bias"), 3), "_to_copy.default": (("self",), 1),
       "convolution.default": (("input", "weight", "bias"), 1), "mul.Tensor": (("self", "other"), 1),
       "empty_like.default": (("self",), 1), "bitsandbytes::int8_linear": (("A", "B"), 1),
       "made_up.default": (("self", "other"), 2), "clone.default": (("self",), 1)}


def made_up_graph(seed: int) -> tuple[Concrete, ReplayOptions]:
    rng = random.Random(seed)
    opnames = list(OPS)
    t_sid, t_dtype, t_shape, t_bytes, t_param, s_bytes, s_alloc = [], [], [], [], [], [], []

    def tensor(alloc, param=None, on=None, dtype=None):
        if on is None:
            on = len(s_bytes)
            s_bytes.append(rng.choice([0, 100, 512, 4096, 70000, 3 << 20]))
            s_alloc.append(alloc)
        t_sid.append(on)
        t_dtype.append(dtype or rng.choice(["float32", "float16", "bfloat16", "float32", "int64"]))
        t_shape.append((rng.choice([1, 2]), 4, 8, 8))
        t_bytes.append(rng.choice([s_bytes[on], s_bytes[on], 64, 4096]))
        t_param.append(param)
        return len(t_sid) - 1

    inputs = {"x": tensor(-1, dtype="float16"), "encoder_hidden_states": tensor(-1, dtype="float16")}
    params = [tensor(-1, param=f"p{k}.weight", dtype="float32") for k in range(6)]
    tensor(-1, param="p0.weight", on=t_sid[params[0]], dtype="float16")       # a second view of a parameter
    pool = list(inputs.values()) + params + [len(t_sid) - 1]
    ops = []
    for i in range(rng.randrange(20, 60)):
        name = rng.choice(opnames)
        args, n_out = OPS[name]
        # a chain (the loss depends on most ops), with parameters and earlier tensors mixed in
        ins = [(a, rng.choice(pool[-3:]) if k == 0 else rng.choice(params) if rng.random() < 0.4
                else rng.choice(pool)) for k, a in enumerate(args)]
        outs = []
        for _ in range(n_out):
            view = name in ("view.default",) and rng.random() < 0.8
            outs.append(tensor(i, on=t_sid[ins[0][1]] if view else None,
                               dtype=rng.choice(["float32", "float16"] * 9 + ["int64"])))
        ops.append((opnames.index(name), rng.randrange(3), ins, outs))
        pool.extend(outs)
    n = len(ops)
    s_free = [None if a == -1 or rng.random() < 0.2 else rng.randrange(a, n) for a in s_alloc]
    regions, functions = [], []
    cut = sorted(rng.sample(range(n), 6))
    for a, b in zip(cut[0::2], cut[1::2]):
        kind = rng.random()
        if kind < 0.5:
            regions.append((0, a, b, [t for _, t in ops[a][2]], list(ops[b][3])))
        else:
            name = rng.choice(["HadaWeight", "MatMul4Bit", "MatMul8bitLt", "Unknown"])
            functions.append((1, a, b, [t for _, t in ops[a][2]], list(ops[b][3]), name))
    loss = tensor(n, dtype="float32")
    ops.append((opnames.index("mm.default"), 0, [("self", pool[-1]), ("mat2", rng.choice(params))], [loss]))
    s_free.append(None)
    graph = Concrete(opnames=opnames, modules=["", "block.0", "block.1"], ops=ops, t_sid=t_sid, t_dtype=t_dtype,
                     t_shape=t_shape, t_bytes=t_bytes, t_param=t_param, s_bytes=s_bytes, s_alloc=s_alloc,
                     s_free=s_free, regions=regions, calls=[], functions=functions, inputs=inputs,
                     outputs={"loss": loss}, markers={})
    trained = {f"p{k}.weight" for k in range(6) if rng.random() < 0.8}
    options = ReplayOptions(trainable=trained.__contains__, gradient_checkpointing=rng.random() < 0.6,
                            inputs_require_grad=frozenset({"encoder_hidden_states"} if rng.random() < 0.5 else ()),
                            phase_prefix=rng.choice(["", "step 2 "]), low_dtype=rng.choice(["float16", "bfloat16"]))
    return graph, options


@pytest.mark.parametrize("seed", range(60))
def test_made_up_graphs_replay_the_same_in_c(built, seed):
    graph, options = made_up_graph(seed)
    clock = Clock()
    rep = Replayer(graph, options, clock)
    rep.forward()
    forward = [(r.nbytes, r.alloc_at, r.free_at) for r in clock.open]
    clock.phase(options.phase_prefix + "backward")
    result = rep.backward()
    rep.finish()
    records = clock.open
    seen = []

    def check(rows):
        seen.append(list(zip(*[column.tolist() for column in rows.columns()[:3]])))

    made = native_replay.replay(graph, options, check)
    assert made is not None
    rows = [(r.nbytes, r.alloc_at, r.free_at, r.category, r.phase, r.module, r.op, r.saved) for r in records]
    assert list(made.rows.rows) == rows
    assert [made.rows.row(i) for i in range(len(rows))] == rows
    assert seen == [[(n, a, native.NEVER if f is None else f) for n, a, f in forward]]
    assert (made.length, made.backward_at) == (clock.now, clock.phases[-1][1])
    row_of = {id(r): i for i, r in enumerate(records)}
    assert made.param_grads == tuple((name, row_of[id(r)]) for name, r in result.param_grads.items())
    assert made.input_grads == tuple((role, row_of[id(r)]) for role, r in result.input_grads.items())
    assert made.saved_by_module == tuple(result.saved_by_module.items())
    assert made.unknown_ops == frozenset(result.unknown_ops)
    sizes = sizes_of(rep, records)
    assert (made.sizes.sources, made.sizes.workspaces, made.sizes.aliases, made.sizes.saved_from) == (
        sizes.sources, sizes.workspaces, sizes.aliases, sizes.saved_from)


def _columns(structure) -> dict:
    return {name: (value.tolist() if hasattr(value, "tolist") else value) for name, value in vars(structure).items()
            if name != "pins"}


def test_the_graph_columns_are_read_the_same_in_c_and_in_python(built, monkeypatch):
    """native_flat.c reads the graph's lists (`_flat_in_c`) into the columns Python makes."""
    if native.flat_library() is None:
        pytest.skip("native_flat.c cannot be built here (no Python headers): Python flattens")
    graphs = [made_up_graph(seed)[0] for seed in range(10)]
    for options in (SPECS[2], SPECS[10], SPECS[13]):
        spec = _spec(options)
        step.build_timeline(spec, load_model_inventories(spec.model))
        graphs += [graph for _, graph in step._GRAPHS.items.values()]
    for graph in graphs:
        in_c = _columns(native_replay._Structure(graph))
        monkeypatch.setattr(native_replay, "FLAT_IN_C", False)
        in_python = _columns(native_replay._Structure(graph))
        monkeypatch.setattr(native_replay, "FLAT_IN_C", True)
        assert in_c == in_python
        assert len(in_c["in_tid"]) > len(in_c["op_name"]) > 20


def test_a_graph_not_shaped_as_recorded_is_refused_by_the_c_reader(built):
    lib = native.flat_library()
    if lib is None:
        pytest.skip("native_flat.c cannot be built here")
    out = native.array("q", [0] * 8)
    with pytest.raises(TypeError):
        lib.vp_count_ops([(0, 0, [("self", 1)])], out.buffer_info()[0])      # a 3-tuple
    with pytest.raises(TypeError):
        lib.vp_ints([1, "two"], -1, out.buffer_info()[0])

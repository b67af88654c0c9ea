"""A denoiser replay resized to another rank (`vramplan.estimate.resize`, what fit does when it
tries rank after rank) must give the records, phases and saved activations of replaying afresh,
and must not resize where a decision that reads sizes would change."""

import dataclasses

import pytest

import vramplan.estimate.step as step
from vramplan.estimate import resize
from vramplan.methods import get_method
from vramplan.models.inventory import load_model_inventories
from vramplan.spec import build_spec


def _rows(timeline):
    return ([(r.nbytes, r.alloc_at, r.free_at, r.category, r.phase, r.module, r.op, r.saved)
             for r in timeline.records], list(timeline.clock.phases), timeline.clock.now, timeline.saved_by_module,
            timeline.unknown_ops)


@pytest.fixture
def counted(monkeypatch):
    """How many windows were resized, and how many resizes were refused."""
    real = step._resized_window
    made = {"resized": 0, "refused": 0}

    def spy(sizes, pins):
        window = real(sizes, pins)
        made["resized" if window is not None else "refused"] += 1
        return window

    monkeypatch.setattr(step, "_resized_window", spy)
    step.clear_reuse()
    yield made
    step.clear_reuse()


@pytest.mark.parametrize("options", [
    {"method": "lora"},
    {"method": "lora", "gradient_checkpointing": True},
    {"method": "lora", "precision": "bf16", "base_quant": "nf4"},
    {"method": "lora", "precision": "bf16", "base_quant": "int8", "gradient_checkpointing": True},
    {"method": "lora", "lora_targets": "all-linear+conv"},
    {"method": "loha", "gradient_checkpointing": True},
    {"method": "lokr"},
    {"method": "lora", "train_text_encoder": True},
    {"method": "lora", "model": "sdxl", "resolution": 256, "gradient_checkpointing": True},
])
def test_a_resized_replay_is_the_replay(options, counted, monkeypatch):
    base = {"model": "sd15", "gpu": "24GB", **options}
    ranks = [16, 4, 8, 128, 1]
    specs = [build_spec({**base, "rank": rank, "alpha": rank}) for rank in ranks]
    inventories = load_model_inventories(specs[0].model)
    kept = [_rows(step.build_timeline(spec, inventories)) for spec in specs]
    if options["method"] != "lokr":            # LoKr's templates follow the rank: replayed afresh
        assert counted["resized"] >= 2, counted
    monkeypatch.setattr(step, "REUSE", False)
    for spec, rows in zip(specs, kept):
        assert _rows(step.build_timeline(spec, inventories)) == rows, spec.rank


def test_a_decision_that_reads_sizes_refuses_the_resize(counted):
    """Had a gradient's alias test (same bytes as its output) come out otherwise at the new
    rank, the log is not that replay's: no resize, a replay afresh."""
    spec = build_spec({"model": "sd15", "method": "lora", "rank": 16})
    inventories = load_model_inventories(spec.model)
    step.build_timeline(spec, inventories)
    ((key, window),) = step._RESIZABLE.items.items()
    assert window.sizes.aliases
    tid, out, same = window.sizes.aliases[0]
    flipped = dataclasses.replace(window.sizes, aliases=((tid, out, not same),) + window.sizes.aliases[1:])
    step._RESIZABLE.put(key, dataclasses.replace(window, sizes=flipped))
    refused = counted["refused"]
    step.build_timeline(spec.replace(rank=8), inventories)
    assert counted["refused"] == refused + 1 and counted["resized"] == 0


def test_another_graph_is_not_resized():
    """A graph whose structure is not the logged one's (another model) is refused outright."""
    spec = build_spec({"model": "sd15", "method": "lora", "rank": 16})
    step.clear_reuse()
    step.build_timeline(spec, load_model_inventories(spec.model))
    ((_, window),) = step._RESIZABLE.items.items()
    other = build_spec({"model": "sdxl", "method": "lora", "rank": 16, "resolution": 256})
    inventories = load_model_inventories(other.model)
    graph = step._adapted_graph(other, inventories, get_method(other.method), other.model.denoiser.name,
                                "amp-frozen-keep-attn", step._sizes(other))
    assert resize.resized_bytes(window.sizes, graph, other.precision.low_dtype) is None
    step.clear_reuse()

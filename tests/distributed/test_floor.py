"""vramplan.distributed.floor: the bound fit takes before a strategy's rewrite is a lower bound.

Checked against what the rewrites really do, record by record: every record a rewrite drops or
changes is one the bound takes out; the moved weights it subtracts are the rewrite's dropped
load weights, loaded before the first forward and never freed; what it adds for the strategy was
added by the rewrite, never freed, from when the bound counts it. And, as a whole, the bound
never exceeds the device floor, nor the estimate; a search with it finds what one without it
finds."""

import random
from array import array

import pytest

from vramplan import native
from vramplan.distributed import floor
from vramplan.distributed.plan import per_gpu_records
from vramplan.distributed.rewrite import SCALE, WEIGHTS
from vramplan.estimate.overheads import cuda_context_bytes
from vramplan.estimate.record_log import RecordLog
from vramplan.estimate.step import clear_reuse, trained_tensors
from vramplan.fit.walk import device_floor, per_gpu_estimate
from vramplan.footprint import Category
from vramplan.models.inventory import load_model_inventories
from vramplan.spec import Offload, Strategy, build_spec
from vramplan.timeline import Record, _live_curve

SPECS = [
    {"method": "lora", "strategy": "fsdp"},
    {"method": "lora", "strategy": "fsdp", "precision": "bf16", "train_text_encoder": True},
    {"method": "lora", "strategy": "zero2", "gradient_checkpointing": True},
    {"method": "lora", "strategy": "zero3", "precision": "fp32"},
    {"method": "lokr", "strategy": "zero3", "gradient_checkpointing": True, "batch_size": 2},
    {"method": "lora", "strategy": "zero3", "offload": "optimizer", "cache_latents": True},
    {"method": "full", "strategy": "zero1", "optimizer": "adafactor"},
    {"method": "full", "strategy": "zero2", "gradient_accumulation_steps": 2},
    {"method": "full", "strategy": "zero3", "offload": "params"},
    {"method": "full", "strategy": "zero3", "precision": "bf16"},
    {"method": "full", "strategy": "fsdp", "fsdp_sharding": "shard-grad-op", "ema": True},
    {"method": "full", "strategy": "fsdp", "offload": "params", "gradient_accumulation_steps": 2},
    {"method": "full", "strategy": "fsdp", "precision": "fp16", "optimizer": "sgd"},
    {"method": "full", "strategy": "ddp"},
    {"method": "lora", "strategy": "ddp", "optimizer": "adamw8bit"},
    {"method": "textual-inversion", "strategy": "zero1"},
    {"method": "textual-inversion", "strategy": "zero2", "offload": "optimizer"},
    {"model": "sdxl", "method": "lora", "strategy": "zero3", "gradient_checkpointing": True},
    {"model": "sdxl", "method": "lora", "strategy": "fsdp", "gradient_checkpointing": True},
]
IDS = ["-".join(str(v) for v in o.values()) for o in SPECS]


def spec_of(options):
    return build_spec({"model": "sd15", "gpus": "2xrtx4090", **options})


def parts(spec):
    """The bound's peaks, moved bytes, resident and states, as `strategy_floor` adds them."""
    seen = {}

    def spy(timeline, unchanged):
        seen["peaks"] = made = kept_peaks(timeline, unchanged)
        return made

    kept_peaks = floor.kept_peaks
    floor.kept_peaks = spy
    try:
        clear_reuse()
        bound = floor.strategy_floor(spec, load_model_inventories(spec.model))
    finally:
        floor.kept_peaks = kept_peaks
    return bound, seen["peaks"]


@pytest.mark.parametrize("options", SPECS, ids=IDS)
def test_what_a_rewrite_drops_or_changes_the_bound_takes_out(options):
    spec = spec_of(options)
    inventories = load_model_inventories(spec.model)
    rw = per_gpu_records(spec, inventories)[0]
    base = RecordLog(rw._base.runs).scaled(SCALE)
    steps = rw.steps()
    windows = [s.optimizer for s in steps]
    forward, optimizer = steps[0].forward[0], steps[0].optimizer[0]
    trained = {f"{c}.{t.name}" for c, ts in trained_tensors(spec, inventories).items() for t in ts}

    def taken_out(r):
        if r.category in floor.CHANGED:
            return True
        if r.category in (Category.TEMPORARIES, None) and any(lo <= r.alloc_at < hi for lo, hi in windows):
            return True
        return False

    moved_bytes = 0
    for i, r in enumerate(base):
        dropped, owned = rw._dropped[i], rw._owned.get(i)
        changed = owned is not None and (owned.nbytes, owned.free_at) != (r.nbytes, r.free_at)
        if not (dropped or changed):
            continue
        if taken_out(r):
            continue
        # the only other records a rewrite takes: weights moved at load, loaded before the
        # first forward, never freed
        assert dropped and not changed, r
        assert spec.strategy is not Strategy.DDP
        assert r.category in WEIGHTS and r.phase == "load" and r.free_at is None and r.alloc_at < forward, r
        moved_bytes += r.nbytes
        if spec.strategy is Strategy.ZERO1 or spec.strategy is Strategy.ZERO2:
            assert r.module in trained
    # the bound subtracts exactly those, from the peaks of the records it does not take out:
    # before the first forward, up to the first optimizer phase's start, and after it
    bound, peaks = parts(spec)
    kept = base if spec.strategy is Strategy.DDP else [r for r in base if not taken_out(r)]
    events, lives = _live_curve(kept, 0)
    expected = [0, 0, 0]
    for event, live in zip(events, lives[1:]):
        k = 0 if event < forward else 1 if event <= optimizer else 2
        expected[k] = max(expected[k], live)
    assert list(peaks) == expected
    before, between, after = peaks
    resident, states = _sizes(spec, inventories)
    context = cuda_context_bytes(spec.gpu)
    assert bound == max(before - moved_bytes, between - moved_bytes + resident,
                        after - moved_bytes + resident + states, 0) + context
    # what it adds for the strategy, the rewrite added: from load (before the first forward),
    # and the states in the first optimizer phase, never freed
    at_load = sum(r.nbytes for r in rw._added if r.alloc_at < forward and r.free_at is None)
    states_added = sum(r.nbytes for r in rw._added if r.category is Category.OPTIMIZER_STATES and
                       optimizer < r.alloc_at < steps[0].optimizer[1] and r.free_at is None)
    assert resident <= at_load
    assert states <= states_added
    if spec.offload is Offload.NONE and spec.strategy is not Strategy.DDP:
        assert resident > 0 and (states > 0 or spec.optimizer.value == "sgd")


def _sizes(spec, inventories):
    """(resident, states) as the bound reads them (its own functions, called here on their own)."""
    from vramplan.distributed import fsdp, zero
    from vramplan.distributed.plan import _fsdp_units, fsdp_itemsizes, zero_model_itemsize

    trained = trained_tensors(spec, inventories)
    if spec.strategy is Strategy.DDP:
        return 0, 0
    if spec.strategy is Strategy.FSDP:
        units, trainable = _fsdp_units(spec, inventories, trained)
        return fsdp.fsdp_resident(spec, units, trainable, *fsdp_itemsizes(spec), 2)
    (comp, tensors), = trained.items()
    sizes = zero.zero_sizes(spec, comp, inventories[comp], tensors, zero_model_itemsize(spec), 2)
    return sizes.resident_bytes, sizes.state_bytes


@pytest.mark.parametrize("options", SPECS, ids=IDS)
def test_the_bound_never_exceeds_the_floor_nor_the_estimate(options):
    spec = spec_of(options)
    inventories = load_model_inventories(spec.model)
    clear_reuse()
    bound = floor.strategy_floor(spec, inventories)
    clear_reuse()
    floor_bytes = device_floor(spec)
    used = per_gpu_estimate(spec).footprint.device_used_bytes
    assert 0 < bound <= floor_bytes <= used


def test_the_bound_is_the_same_without_the_library(monkeypatch):
    specs = [spec_of(SPECS[k]) for k in (0, 4, 7, 13)]
    made = []
    for spec in specs:
        clear_reuse()
        made.append(floor.strategy_floor(spec, load_model_inventories(spec.model)))
    monkeypatch.setenv("VRAMPLAN_NATIVE", "0")
    native.reset()
    try:
        for spec, expected in zip(specs, made):
            clear_reuse()
            assert floor.strategy_floor(spec, load_model_inventories(spec.model)) == expected
    finally:
        monkeypatch.delenv("VRAMPLAN_NATIVE")
        native.reset()


def random_columns(rng, n):
    records = []
    for _ in range(n):
        at = rng.randrange(-50, 400) * rng.choice((1, 7, SCALE))
        free = None if rng.random() < 0.2 else at + rng.randrange(0, 60) * rng.choice((1, 7))
        records.append(Record(rng.choice((0, 1, 512, 4096, 1 << 20)), at, free,
                              rng.choice(list(Category)[:13] + [None]), "p"))
    return records


@pytest.mark.parametrize("seed", range(6))
def test_live_peaks_and_zero_where_match_python(seed):
    native.reset()
    if native.library() is None:
        pytest.skip("no C compiler here")
    rng = random.Random(seed)
    records = random_columns(rng, rng.randrange(1, 400))
    cuts = sorted(rng.sample(range(-60 * SCALE, 400 * SCALE), rng.randrange(0, 4)))
    cols = native.Columns(records)
    events, lives = _live_curve(records, 0)
    expected = [0] * (len(cuts) + 1)
    for e, live in zip(events, lives[1:]):
        k = sum(1 for c in cuts if e >= c)
        expected[k] = max(expected[k], live)
    assert native.live_peaks(cols, cuts) == expected

    index = native.category_codes(Category.TEMPORARIES)[0]
    drop = rng.sample([c for c in Category if c is not Category.TEMPORARIES], 3)
    windows = [(lo, lo + rng.randrange(1, 100 * SCALE)) for lo in rng.sample(range(-50 * SCALE, 400 * SCALE), 2)]
    nbytes = array("q", [r.nbytes for r in records])
    codes = array("q", [index[r.category] for r in records])
    native.zero_where(nbytes, codes, cols.alloc_at, [index[c] for c in drop], index[Category.TEMPORARIES], windows)
    assert list(nbytes) == [0 if r.category in drop or (r.category in (Category.TEMPORARIES, None) and any(
        lo <= r.alloc_at < hi for lo, hi in windows)) else r.nbytes for r in records]


@pytest.mark.parametrize("options", [
    {"model": "sd15", "method": "full", "gpus": "4x9GB"},
    {"model": "sd15", "method": "lora", "gpus": "2x3GB"},
])
def test_a_search_rules_candidates_out_by_the_bound_and_finds_the_same_plans(monkeypatch, options):
    import vramplan.distributed.plan as plan
    from vramplan.fit import fit_request, search
    from vramplan.fit.walk import clear_cache

    def run():
        clear_cache()
        clear_reuse()
        rewrites = []
        real = plan.per_gpu_records
        monkeypatch.setattr(plan, "per_gpu_records", lambda *a, **k: rewrites.append(a[0]) or real(*a, **k))
        result = search(fit_request(build_spec(options)))
        monkeypatch.setattr(plan, "per_gpu_records", real)
        return ([(p.choice, p.to_json(), p.estimate.to_json()) for p in result.plans],
                None if result.closest is None else result.closest.to_json()), len(rewrites)

    with_bound, fewer = run()
    monkeypatch.setattr(floor, "strategy_floor", lambda spec, inventories: 0)
    without, more = run()
    assert with_bound == without
    assert fewer < more


def test_a_spec_deepspeed_cannot_run_gets_no_bound_and_the_rewrite_says_why():
    from vramplan.errors import UsageError

    spec = spec_of({"method": "lora", "strategy": "ddp", "train_text_encoder": True}).replace(strategy=Strategy.ZERO2)
    inventories = load_model_inventories(spec.model)
    assert floor.strategy_floor(spec, inventories) == 0
    with pytest.raises(UsageError, match="one model"):
        per_gpu_records(spec, inventories)

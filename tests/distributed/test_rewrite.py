"""The rewrite reads the step's records in place (`vramplan.distributed.rewrite`): what it makes
must be what the same rewrite makes on a plain list of scaled Records, the way it worked when
every record was copied first -- the records in order, their C arrays, the searches by op -- for
every strategy, on real steps (their runs: windows, copied steps, lists) and on made-up ones."""

import random

import pytest

import vramplan.distributed.plan as plan
from vramplan import native
from vramplan.distributed.plan import per_gpu_records
from vramplan.distributed.rewrite import SCALE, Rewriter, RewrittenRecords
import vramplan.estimate.step as step
from vramplan.estimate.step import clear_reuse
from vramplan.footprint import Category
from vramplan.footprint_build import MATMULS, first_alloc
from vramplan.models.inventory import load_model_inventories
from vramplan.spec import build_spec
from vramplan.timeline import Record


class ListRewriter(Rewriter):
    """The reference: every record copied and scaled up front, each operation a pass over the
    list."""

    def __init__(self, records, phases, end):
        super().__init__([], phases, end)
        self.list = [Record(r.nbytes, r.alloc_at * SCALE, None if r.free_at is None else r.free_at * SCALE,
                            r.category, r.phase, r.module, r.op, r.saved) for r in records]

    @property
    def records(self):
        return self.list

    def add(self, nbytes, at, free_at, category, phase, op, module=""):
        rec = super().add(nbytes, at, free_at, category, phase, op, module)
        if self._added:
            self.list.append(self._added.pop())
        return rec

    def of_categories(self, categories, window=None):
        lo, hi = window or (-(1 << 62), 1 << 62)
        return [r for r in self.list if r.category in categories and lo <= r.alloc_at < hi]

    def nbytes_of(self, predicate, categories, window=None, key=None):
        lo, hi = window or (-(1 << 62), 1 << 62)
        return sum(r.nbytes for r in self.list
                   if r.category in categories and lo <= r.alloc_at < hi and (predicate is None or predicate(r)))

    def drop(self, predicate, categories, window=None, key=None):
        lo, hi = window or (-(1 << 62), 1 << 62)
        kept, dropped = [], []
        for r in self.list:
            if r.category in categories and lo <= r.alloc_at < hi and (predicate is None or predicate(r)):
                dropped.append(r.alloc_at)
            else:
                kept.append(r)
        self.list = kept
        return dropped

    def module_spans(self, window):
        lo, hi = window
        spans = {}
        for r in self.list:
            if r.module and lo <= r.alloc_at < hi:
                span = spans.setdefault(r.module, [r.alloc_at, r.alloc_at])
                span[0], span[1] = min(span[0], r.alloc_at), max(span[1], r.alloc_at)
        return spans


def rows(records):
    return [(r.nbytes, r.alloc_at, r.free_at, r.category, r.phase, r.module, r.op, r.saved) for r in records]


def arrays(columns):
    return (list(columns.nbytes), list(columns.alloc_at), list(columns.free_at),
            list(columns.codes(Category.TEMPORARIES)[0]))


SPECS = [
    {"method": "lora", "strategy": "fsdp"},
    {"method": "lora", "strategy": "fsdp", "precision": "bf16", "train_text_encoder": True},
    {"method": "lokr", "strategy": "zero3", "gradient_checkpointing": True, "batch_size": 2},
    {"method": "full", "strategy": "zero2", "gradient_accumulation_steps": 2},
    {"method": "full", "strategy": "zero3", "offload": "params"},
    {"method": "full", "strategy": "fsdp", "fsdp_sharding": "shard-grad-op", "ema": True},
    {"method": "full", "strategy": "fsdp", "offload": "params", "gradient_accumulation_steps": 2},
    {"method": "full", "strategy": "ddp"},
    {"method": "textual-inversion", "strategy": "zero1"},
    {"model": "sdxl", "method": "lora", "strategy": "zero3", "gradient_checkpointing": True},
]


@pytest.mark.parametrize("options", SPECS, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_a_rewrite_in_place_makes_what_the_list_rewrite_makes(options, monkeypatch):
    spec = build_spec({"model": "sd15", "gpus": "2xrtx4090", **options})
    inventories = load_model_inventories(spec.model)
    fast, fast_states, *_ = per_gpu_records(spec, inventories)
    monkeypatch.setattr(plan, "Rewriter", ListRewriter)
    clear_reuse()         # what the rewrite keeps (ZeRO-3's fetch trace) made again, by the list rewrite
    slow, slow_states, *_ = per_gpu_records(spec, inventories)
    assert fast_states == slow_states
    assert isinstance(fast.records, RewrittenRecords)
    assert rows(fast.records) == rows(slow.records)
    assert len(fast.records) == len(slow.records)
    for ops, lo, hi in ((MATMULS, None, None), (frozenset({"addmm.default"}), fast.steps()[0].backward[0], None)):
        assert first_alloc(fast.records, ops, lo, hi) == first_alloc(slow.records, ops, lo, hi)
    if native.library() is not None:
        extra = [Record(5 << 20, 3 * SCALE, None, Category.WORKSPACES, "workspace", op="cuBLAS workspace")]
        assert arrays(fast.records.columns(extra)) == arrays(native.Columns(slow.records, extra))


def made_up_step(rng):
    """Records in three runs of the clock's kinds, with phases; events unscaled."""
    from vramplan.estimate.record_log import RecordLog, Rows, Shifted

    kinds = [Category.FROZEN_WEIGHTS, Category.TRAINABLE_WEIGHTS, Category.GRADIENTS, Category.ACTIVATIONS,
             Category.TEMPORARIES, Category.OPTIMIZER_STATES, Category.AUTOCAST_CACHE]

    def record(at):
        free = None if rng.random() < 0.3 else at + rng.randint(0, 30)
        return Record(rng.choice([512, 4096, 1 << 20]), at, free, rng.choice(kinds),
                      rng.choice(["load", "forward", "backward", "optimizer"]),
                      rng.choice(["", "unet.a", "unet.a.b", "unet.c", "text_encoder.x"]),
                      rng.choice(["", "mm.default", "addmm.default", "add"]))

    first = [record(at) for at in range(40)]
    window = Rows.of([record(at) for at in range(60)])
    handles = {j: Record(*window.row(j)) for j in rng.sample(range(60), 5)}
    for j, r in handles.items():
        r.alloc_at += 40
        r.free_at = None if r.free_at is None else r.free_at + 40
    log = RecordLog([first, Shifted(window, 40, limit=50, prefix="", handles=handles)])
    log.extend([record(at) for at in range(100, 120)])
    return log, [("load", 0), ("forward", 20), ("backward", 60), ("optimizer", 100)], 120


@pytest.mark.parametrize("seed", range(30))
def test_made_up_steps_rewritten_in_place_and_as_a_list_agree(seed):
    rng = random.Random(seed)
    log, phases, end = made_up_step(rng)
    fast, slow = Rewriter(log, phases, end), ListRewriter(list(log), phases, end)
    for _ in range(12):
        kind = rng.choice(["drop", "of", "spans", "add"])
        categories = tuple(rng.sample(list(Category)[:8], rng.randint(1, 2)))
        lo = rng.randint(0, 110) * SCALE
        window = None if rng.random() < 0.3 else (lo, lo + rng.randint(1, 60) * SCALE)
        if kind == "drop":
            module = rng.choice(["", "unet.a", "unet.c", None])
            predicate = None if module is None else (
                lambda r, module=module: r.module.startswith(module) and r.phase != "load")
            assert fast.drop(predicate, categories, window) == slow.drop(predicate, categories, window)
        elif kind == "of":
            got, want = fast.of_categories(categories, window), slow.of_categories(categories, window)
            assert rows(got) == rows(want)
            for a, b in zip(got, want):         # the rewrite changes what it reads back
                a.free_at = b.free_at = fast.after(a.alloc_at)
                a.nbytes = b.nbytes = a.nbytes // 2
        elif kind == "spans":
            assert fast.module_spans(window or (0, end * SCALE)) == slow.module_spans(window or (0, end * SCALE))
        else:
            at = fast.before(lo)
            fast.add(1000, at, at + 3, categories[0], "forward", "x", "unet.a")
            slow.add(1000, at, at + 3, categories[0], "forward", "x", "unet.a")
        assert rows(fast.records) == rows(slow.records)
        for ops in (MATMULS, frozenset({"add"}), frozenset({"x"})):
            lo = rng.choice([None, rng.randint(0, 110) * SCALE])
            assert first_alloc(fast.records, ops, lo) == first_alloc(slow.records, ops, lo)
    if native.library() is not None:
        assert arrays(fast.records.columns()) == arrays(native.Columns(slow.records))
    assert rows(log) == rows(made_up_step(random.Random(seed))[0])    # the step is left as it was


def test_scale_and_keep_on_columns():
    if native.library() is None:
        pytest.skip("no C compiler here: the rewrite reads records, not columns")
    from array import array

    alloc, free = array("q", [0, 3, -2]), array("q", [5, native.NEVER, 7])
    native.scale(alloc, free, 10)
    assert list(alloc) == [0, 30, -20] and list(free) == [50, native.NEVER, 70]
    column = array("q", range(6))
    native.keep(bytes([0, 1, 1, 0, 0, 1]), [column])
    assert list(column) == [0, 3, 4]
    with pytest.raises(IndexError):
        native.keep(bytes(3), [array("q", range(4))])


SEQUENCE = [
    {"method": "lora", "strategy": "zero3"},
    {"method": "lora", "strategy": "zero1"},
    {"method": "lora", "strategy": "zero2", "offload": "optimizer"},
    {"method": "lora", "strategy": "fsdp"},
    {"method": "lora", "strategy": "zero3", "offload": "params"},
    {"method": "lora", "strategy": "ddp"},
    {"method": "lora", "strategy": "zero2", "rank": 8},
    {"method": "full", "strategy": "zero3"},
    {"method": "full", "strategy": "zero1"},
    {"method": "full", "strategy": "fsdp", "precision": "bf16"},
    {"method": "full", "strategy": "fsdp", "precision": "bf16", "offload": "params"},
]


def test_what_rewrites_keep_for_a_shared_step_serves_only_their_own(monkeypatch):
    """Strategies rewriting one shared step one after another (as a search does) keep what they
    read of it (`Rows.matching` by predicate key, ZeRO-3's fetch trace): each gets what a
    rewrite from nothing kept gets."""
    specs = [build_spec({"model": "sd15", "gpus": "2xrtx4090", **options}) for options in SEQUENCE]
    inventories = load_model_inventories(specs[0].model)
    clear_reuse()
    one_after_another = [(rows(rw.records), states) for rw, states, *_ in
                         (per_gpu_records(spec, inventories) for spec in specs)]
    monkeypatch.setattr(step, "REUSE", False)      # nothing kept: every build and rewrite from nothing
    for spec, made in zip(specs, one_after_another):
        clear_reuse()
        rw, states, *_ = per_gpu_records(spec, inventories)
        assert (rows(rw.records), states) == made, spec.strategy

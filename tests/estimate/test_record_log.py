"""A step's records kept as runs (vramplan.estimate.record_log): the C arrays made run by run, the
first matrix products found run by run, and copies of copied runs are those of the records the
runs stand for, made one by one."""

import pytest

import vramplan.estimate.step as step
from vramplan import native
from vramplan.estimate.record_log import ColumnRows, RecordLog, Rows, Shifted
from vramplan.footprint import Category
from vramplan.footprint_build import ADDMMS, MATMULS, first_alloc
from vramplan.models.inventory import load_model_inventories
from vramplan.spec import build_spec
from vramplan.timeline import Record

SPECS = [
    {"method": "lora", "rank": 16},
    {"method": "lora", "rank": 8, "gradient_checkpointing": True, "gradient_accumulation_steps": 3},
    {"method": "lora", "rank": 16, "train_text_encoder": True, "ema": False},
    {"method": "full", "ema": True, "gradient_checkpointing": True},
    {"method": "textual-inversion"},
    {"method": "loha", "rank": 8, "cache_latents": True},
]


@pytest.fixture
def built():
    native.reset()
    if native.library() is None:
        pytest.skip("no C compiler here: the Python versions are what runs")
    yield
    step.clear_reuse()


def _timelines(options):
    """The spec's timeline built afresh, then again from the kept replays (re-applied runs)."""
    spec = build_spec({"model": "sd15", "gpu": "24GB", **options})
    inventories = load_model_inventories(spec.model)
    step.clear_reuse()
    first = step.build_timeline(spec, inventories)
    again = step.build_timeline(spec, inventories)
    return first, again


@pytest.mark.parametrize("options", SPECS)
def test_columns_made_run_by_run_are_the_records_columns(built, options):
    for timeline in _timelines(options):
        log = timeline.records
        assert any(isinstance(run, Shifted) for run in log.runs)
        extra = [Record(1 << 20, 5, None, Category.WORKSPACES, "workspace", op="cuBLAS workspace")]
        fast = log.columns(extra)
        slow = native.Columns(list(log), extra)
        assert fast.n == slow.n == len(log) + 1
        assert fast.nbytes == slow.nbytes
        assert fast.alloc_at == slow.alloc_at
        assert fast.free_at == slow.free_at
        assert fast.codes(Category.TEMPORARIES) == slow.codes(Category.TEMPORARIES)
        assert native.peak_live_bytes(fast) == native.peak_live_bytes(slow)
        assert native.replay_allocator(fast).peak_reserved == native.replay_allocator(slow).peak_reserved


@pytest.mark.parametrize("options", SPECS)
def test_scaled_copies_are_the_records_rescaled(options):
    """The distributed rewrite starts from copies of the step's records with events times its
    scale: made from the runs' rows, they must be the records' own, field by field, and new."""
    for timeline in _timelines(options):
        log = timeline.records
        copies = log.scaled(1000)
        records = list(log)
        assert [(c.nbytes, c.alloc_at, c.free_at, c.category, c.phase, c.module, c.op, c.saved) for c in copies] \
            == [(r.nbytes, r.alloc_at * 1000, None if r.free_at is None else r.free_at * 1000, r.category,
                 r.phase, r.module, r.op, r.saved) for r in records]
        assert not {id(c) for c in copies} & {id(r) for r in records}
        assert log.scaled(3) == log.fork().scaled(3)


@pytest.mark.parametrize("options", SPECS)
def test_the_first_products_are_found_run_by_run(options):
    timeline, again = _timelines(options)
    records = list(again.records)
    backward = next(e for name, e in timeline.clock.phases if name == "backward")
    for ops in (MATMULS, ADDMMS):
        for lo, hi in [(None, None), (backward, None), (backward, backward + 5000), (None, 3)]:
            assert again.records.first_alloc(ops, lo, hi) == first_alloc(records, ops, lo, hi), (ops, lo, hi)
    assert first_alloc(records, MATMULS) is not None


def test_a_copied_run_is_its_records_copied():
    """`Shifted.copied` against `_repeat_step`'s rule applied to each record: what the first step
    frees after `end` is live in the copy, phases take the prefix, handles are copied as they are
    when copied."""
    rows = Rows(((512, 1, 3, Category.ACTIVATIONS, "forward", "m", "mm.default", True),
                 (1024, 2, None, Category.GRADIENTS, "backward", "m", "", False),
                 (2048, 4, 9, None, "backward", "n", "addmm.default", False),
                 (512, 5, 6, Category.TEMPORARIES, "backward", "", "", False),
                 (4096, 7, None, Category.GRADIENTS, "backward", "n", "", False)))
    run = Shifted(rows, 10, limit=8)
    run.handles = {1: run.record(1), 4: run.record(4)}
    run.handles[1].free_at = 17          # freed by the step after the run was placed
    run.handles[4].free_at = 30
    before = [Record(r.nbytes, r.alloc_at, r.free_at, r.category, r.phase, r.module, r.op, r.saved)
              for r in run.records()]
    assert before[2].free_at is None     # freed after the limit: live at the end
    offset, end, prefix = 100, 20, "step 2 "
    copies = {}
    copy = run.copied(offset, end, prefix, copies)
    expected = [(r.nbytes, r.alloc_at + offset, None if r.free_at is None or r.free_at > end else r.free_at + offset,
                 r.category, prefix + r.phase, r.module, r.op, r.saved) for r in before]
    got = [(r.nbytes, r.alloc_at, r.free_at, r.category, r.phase, r.module, r.op, r.saved) for r in copy.records()]
    assert got == expected
    assert copies[id(run.handles[4])] is copy.handles[4]
    log = RecordLog([copy])
    if native.library() is not None:
        cols = log.columns()
        assert list(cols.free_at) == [native.NEVER if e[2] is None else e[2] for e in expected]


def test_a_fork_shares_the_records_not_the_tail():
    timeline, _ = _timelines({"method": "lora", "rank": 4})
    log = timeline.records
    fork = log.fork()
    n = len(log)
    fork.extend([Record(512, 1, None, Category.WORKSPACES)])
    assert len(fork) == n + 1 and len(log) == n
    assert fork[0] is log[0]


def test_column_rows_make_their_tuples_only_when_all_are_read():
    """`ColumnRows`: a row through `row(i)` and the allocations of some ops without making the
    tuples, and the same answers from the tuples once they are made."""
    rows = ((512, 1, 3, Category.TEMPORARIES, "forward", "m", "mm.default", False),
            (1024, 2, None, Category.ACTIVATIONS, "forward", "m", "add.Tensor", True),
            (512, 4, 5, Category.WORKSPACES, "backward", "", "mm.default", False))
    made = []

    def make():
        made.append(1)
        return rows

    def lazy(row=True, allocs=True):
        return ColumnRows(3, None, make, row=(lambda i: rows[i]) if row else None, op_names=frozenset(
            r[6] for r in rows), allocs=(lambda ops: [(i, r[1]) for i, r in enumerate(rows) if r[6] in ops])
            if allocs else None)

    column_rows = lazy()
    assert [column_rows.row(i) for i in range(3)] == list(rows)
    assert column_rows.allocs_of(frozenset({"mm.default"})) == [(0, 1), (2, 4)]
    assert column_rows.allocs_of(frozenset({"conv"})) == []                 # no such op: no scan
    assert not made
    assert column_rows.rows == rows and made == [1]
    plain = lazy(row=False, allocs=False)
    assert plain.row(1) == rows[1] and plain.allocs_of(frozenset({"add.Tensor"})) == [(1, 2)]
    assert Shifted(lazy(), 10).record(1) == Record(1024, 12, None, Category.ACTIVATIONS, "forward", "m",
                                                   "add.Tensor", True)

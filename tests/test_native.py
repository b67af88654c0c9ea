"""vramplan.native: the C loops give the Python reference's numbers, and everything still works
(the same numbers) where the library cannot be built."""

import json
import random

import pytest

from vramplan import native
from vramplan.estimate.allocator import MIB, replay_allocator, replay_in_python
from vramplan.fit.walk import peak_live_bytes
from vramplan.footprint import Category
from vramplan.timeline import Record, analyse, compositions_at


@pytest.fixture
def python_only(monkeypatch):
    """Run the Python versions: the library switched off, and back on after."""
    monkeypatch.setenv("VRAMPLAN_NATIVE", "0")
    native.reset()
    yield
    native.reset()


@pytest.fixture
def built():
    native.reset()
    if native.library() is None:
        pytest.skip("no C compiler here: the Python versions are what runs")
    return native.library()


SIZES = [0, 1, 511, 512, 513, 4096, MIB - 512, MIB, MIB + 1, 3 * MIB, 9 * MIB, 10 * MIB, 10 * MIB + 1,
         20 * MIB, 37 * MIB + 123]
CATEGORIES = [None, Category.ACTIVATIONS, Category.TEMPORARIES, Category.GRADIENTS, Category.FROZEN_WEIGHTS]


def random_records(seed: int, n: int = 600) -> tuple[list, list, int]:
    """A made-up timeline: one event per allocation or free as a step's clock has it, some
    records freed at the event another is allocated, some never freed, some of zero bytes."""
    rng = random.Random(seed)
    records, live, event = [], [], 0
    for _ in range(n):
        event += 1
        if live and rng.random() < 0.45:
            r = live.pop(rng.randrange(len(live)))
            r.free_at = event
            if rng.random() < 0.3:        # an allocation at the same event as that free
                size = rng.choice(SIZES) if rng.random() < 0.5 else rng.randrange(1, 40 * MIB)
                records.append(Record(size, event, None, rng.choice(CATEGORIES)))
                live.append(records[-1])
            continue
        size = rng.choice(SIZES) if rng.random() < 0.5 else rng.randrange(1, 40 * MIB)
        records.append(Record(size, event, None, rng.choice(CATEGORIES)))
        live.append(records[-1])
    phases = sorted({("load", 0), ("forward", n // 4), ("backward", n // 2), ("optimizer", 3 * n // 4)},
                    key=lambda p: p[1])
    return records, phases, event


def sparse(records: list, phases: list) -> tuple[list, list]:
    """The same timeline on the distributed rewrite's events: every event e becomes e * 2**16,
    shifted so that the first ones are negative."""
    def at(e):
        return e * 65536 - 100_000
    return ([Record(r.nbytes, at(r.alloc_at), None if r.free_at is None else at(r.free_at), r.category)
             for r in records], [(name, at(e)) for name, e in phases])


@pytest.mark.parametrize("seed", range(12))
def test_allocator_replay_matches_the_python_reference(built, seed):
    records, phases, _ = random_records(seed)
    if seed % 2:
        records, _ = sparse(records, phases)
    reference = replay_in_python(records)
    fast = native.replay_allocator(native.columns(records))
    assert (fast.peak_reserved, fast.reserved, fast.peak_allocated, fast.allocated, fast.segments) == (
        reference.peak_reserved, reference.reserved, reference.peak_allocated, reference.allocated,
        reference._segments)
    assert reference.peak_reserved > 0


@pytest.mark.parametrize("seed", range(6))
def test_peak_and_analysis_match_the_python_reference(built, seed, monkeypatch):
    records, phases, last = random_records(seed)
    extra = [Record(7 * MIB, phases[1][1], None, Category.WORKSPACES)]
    fast = (peak_live_bytes(records, extra, last), analyse(records, phases, {Category.BUFFERS: 5}),
            compositions_at(records, [1, last // 3, last // 2, last], {Category.EMA: 3}))
    monkeypatch.setenv("VRAMPLAN_NATIVE", "0")
    native.reset()
    slow = (peak_live_bytes(records, extra, last), analyse(records, phases, {Category.BUFFERS: 5}),
            compositions_at(records, [1, last // 3, last // 2, last], {Category.EMA: 3}))
    native.reset()
    assert fast == slow
    # the same categories in the same order: the JSON and the tables list them as they come
    assert [list(c) for c in fast[2].values()] == [list(c) for c in slow[2].values()]
    assert fast[1].peak_bytes > 0


def estimate_json(options: str) -> str:
    from vramplan.estimate import estimate
    from vramplan.estimate.step import clear_reuse
    from vramplan.spec import build_spec

    clear_reuse()
    return json.dumps(estimate(build_spec(json.loads(options))).to_json(), sort_keys=True)


@pytest.mark.parametrize("options", ['{"model": "sdxl", "method": "lora", "gradient_checkpointing": true}',
                                     '{"method": "full", "precision": "fp16", "gpu": "16GB"}',
                                     '{"method": "loha", "batch_size": 2}',
                                     '{"model": "sd35-medium", "method": "lora", "train_text_encoder": true}',
                                     '{"model": "flux-dev", "method": "lora", "base_quant": "nf4", '
                                     '"gradient_checkpointing": true}',
                                     # several GPUs: the rewrite's records as C arrays, or as Records
                                     '{"method": "lora", "gpus": "2xrtx4090", "strategy": "fsdp"}',
                                     '{"method": "full", "gpus": "4xrtx4090", "strategy": "zero3", '
                                     '"offload": "optimizer"}',
                                     '{"method": "full", "gpus": "2xrtx4090", "strategy": "ddp", '
                                     '"gradient_accumulation_steps": 2}'])
def test_an_estimate_is_the_same_without_the_library(built, options, monkeypatch):
    fast = estimate_json(options)
    monkeypatch.setenv("VRAMPLAN_NATIVE", "0")
    native.reset()
    assert native.library() is None
    slow = estimate_json(options)
    native.reset()
    assert fast == slow


@pytest.mark.parametrize("seed", range(4))
def test_sparse_and_negative_events_match_the_python_reference(built, seed, monkeypatch):
    records, phases = sparse(*random_records(seed)[:2])
    extra = [Record(7 * MIB, phases[1][1] + 1, None, Category.WORKSPACES)]
    targets = [phases[1][1], phases[2][1] + 3]
    fast = (peak_live_bytes(records, extra), analyse(records, phases), compositions_at(records, targets))
    monkeypatch.setenv("VRAMPLAN_NATIVE", "0")
    native.reset()
    slow = (peak_live_bytes(records, extra), analyse(records, phases), compositions_at(records, targets))
    native.reset()
    assert fast == slow and fast[0] > 0


def test_without_a_compiler_the_python_versions_run(tmp_path, monkeypatch):
    monkeypatch.setenv("VRAMPLAN_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_compiler", lambda: None)     # no $CC, cc, gcc or clang
    native.reset()
    try:
        assert native.library() is None
        records = [Record(100, 1, 2), Record(30 * MIB, 3, 5), Record(30 * MIB, 6, None)]
        assert replay_allocator(records).peak_reserved == 32 * MIB
        assert analyse(records, [("load", 0)]).peak_bytes == 30 * MIB
        assert not list(tmp_path.glob("native/*.so"))
    finally:
        native.reset()


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("VRAMPLAN_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_compiler", lambda: "/bin/false")
    native.reset()
    try:
        assert native.library() is None
        assert list((tmp_path / "native").iterdir()) == []
    finally:
        native.reset()


def test_the_library_is_built_once_and_reused(built, tmp_path, monkeypatch):
    monkeypatch.setenv("VRAMPLAN_CACHE", str(tmp_path))
    native.reset()
    assert native.library() is not None
    path = native.library_path()
    assert path.exists() and path.parent == tmp_path / "native"
    monkeypatch.setattr(native, "_compiler", lambda: None)    # a second process: loads, builds nothing
    native.reset()
    assert native.library() is not None
    native.reset()


def test_categories_from_outside_the_enum_keep_their_order(built):
    records = [Record(10, 1, None, "custom"), Record(20, 2, None, None), Record(30, 3, None, Category.EMA)]
    assert list(compositions_at(records, [5])[5].items()) == [
        ("custom", 10), (Category.TEMPORARIES, 20), (Category.EMA, 30)]


def test_every_c_source_is_installed_with_the_package():
    """native.py compiles the sources it finds beside it: a wheel without one would quietly run
    everything in Python."""
    import re
    from pathlib import Path

    root = Path(native.__file__).resolve().parent
    pyproject = (root.parent / "pyproject.toml").read_text()
    patterns = re.search(r'^"vramplan" = \[(.*?)\]', pyproject, re.M).group(1)
    globs = [g.strip().strip('"') for g in patterns.split(",")]
    sources = {p.name for p in root.glob("*.c")}
    assert {native.SOURCE.name, native.FLAT_SOURCE.name} | {s.name for s in native.SOURCES} <= sources
    assert all(any(Path(name).match(g) for g in globs) for name in sources), (sources, globs)

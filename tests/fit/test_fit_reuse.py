"""What makes fit fast must not change what it finds: replays re-applied from an earlier timeline
(`vramplan.estimate.step`) give the same records as replays run afresh, the device floor never
exceeds the estimate, and a search with both gives the same plans as one without."""

import pytest

import vramplan.estimate.step as step
import vramplan.fit.walk as walk
from vramplan.estimate import estimate
from vramplan.estimate.overheads import cuda_context_bytes
from vramplan.fit import fit_request, search
from vramplan.footprint import Category
from vramplan.models.inventory import load_model_inventories
from vramplan.spec import build_spec

# Specs that share some replays and not others, in an order where later ones re-apply earlier
# ones' windows: rank, optimizer, caching, checkpointing, quantization, a trained text encoder,
# accumulation, EMA, textual inversion, and several GPUs (FSDP with adapters sees the method
# through a wrapper whose widened parameters key its replays: shared between FSDP candidates, at
# another rank resized, and never handed to a spec without the wrapper -- the specs after them).
SPECS = [
    {"method": "lora", "rank": 16},
    {"method": "lora", "rank": 16, "optimizer": "adafactor"},
    {"method": "lora", "rank": 16, "cache_latents": True},
    {"method": "lora", "rank": 16, "cache_text_embeddings": True, "optimizer": "adamw8bit"},
    {"method": "lora", "rank": 4, "gradient_checkpointing": True},
    {"method": "lora", "rank": 4},
    {"method": "lora", "rank": 16, "base_quant": "nf4"},
    {"method": "lora", "rank": 16, "train_text_encoder": True},
    {"method": "lora", "rank": 16, "train_text_encoder": True, "gradient_accumulation_steps": 3},
    {"method": "lora", "rank": 16, "batch_size": 2, "resolution": 256},
    {"method": "full", "ema": True, "gradient_checkpointing": True},
    {"method": "full", "optimizer": "adafactor", "gradient_checkpointing": True},
    {"method": "textual-inversion"},
    {"method": "lora", "rank": 16, "gpus": "2x24GB"},
    {"method": "lora", "rank": 16, "gpus": "2x24GB", "strategy": "fsdp"},
    {"method": "lora", "rank": 8, "gpus": "2x24GB", "strategy": "fsdp", "optimizer": "adafactor"},
    {"method": "lora", "rank": 8, "gpus": "2x24GB", "strategy": "fsdp", "gradient_checkpointing": True},
    {"method": "lokr", "gpus": "2x24GB", "strategy": "fsdp", "fsdp_sharding": "shard-grad-op"},
    {"method": "lora", "rank": 8, "gpus": "2x24GB", "strategy": "zero2"},
    {"method": "lora", "rank": 8},
    {"method": "full", "gpus": "2x24GB", "strategy": "zero2"},
    {"method": "full", "gpus": "2x24GB", "strategy": "ddp"},
    {"method": "full", "gpus": "2x24GB", "strategy": "fsdp"},
    {"method": "full", "gpus": "2x24GB", "strategy": "zero3", "offload": "optimizer"},
]


def _spec(options):
    options = dict(options)
    if "gpus" not in options:
        options["gpu"] = "24GB"
    return build_spec({"model": "sd15", **options})


def _rows(timeline):
    clock = timeline.clock
    return ([(r.nbytes, r.alloc_at, r.free_at, r.category, r.phase, r.module, r.op, r.saved) for r in clock.records],
            list(clock.phases), clock.now, timeline.notes, timeline.saved_by_module, timeline.unknown_ops)


@pytest.fixture
def fresh():
    step.clear_reuse()
    walk.clear_cache()
    yield
    step.REUSE = True
    step.clear_reuse()
    walk.clear_cache()


def test_reapplied_replays_give_the_same_timeline(fresh, monkeypatch):
    specs = [_spec(o) for o in SPECS if "gpus" not in o]
    inventories = load_model_inventories(specs[0].model)
    reused = [_rows(step.build_timeline(spec, inventories)) for spec in specs]
    assert len(step._WINDOWS.items) >= 3          # the VAE, the text encoder, denoisers
    monkeypatch.setattr(step, "REUSE", False)
    for spec, rows in zip(specs, reused):
        assert _rows(step.build_timeline(spec, inventories)) == rows, spec


def test_estimates_are_the_same_with_and_without_reuse(fresh, monkeypatch):
    specs = [_spec(o) for o in SPECS]
    reused = [estimate(spec).to_json() for spec in specs]
    monkeypatch.setattr(step, "REUSE", False)
    for spec, expected in zip(specs, reused):
        assert estimate(spec).to_json() == expected, spec


def test_the_device_floor_never_exceeds_the_estimate(fresh):
    """The tensors' peak plus the context: the allocator's block slack and reserve are all it
    leaves out. Taking it
    hands the records on to the estimate that follows, which must not change that estimate."""
    for options in SPECS:
        spec = _spec(options)
        floor = walk.device_floor(spec)
        used = (walk.per_gpu_estimate(spec) if spec.is_distributed else estimate(spec)).footprint
        tensors = used.peak_allocated_bytes - used.category_bytes(Category.BLOCK_SLACK)
        assert floor == tensors + cuda_context_bytes(spec.gpu) <= used.device_used_bytes, options
        walk.clear_cache()
        step.clear_reuse()
        again = walk.per_gpu_estimate(spec) if spec.is_distributed else estimate(spec)
        assert again.footprint == used, options


def test_a_floor_stopped_after_the_forward_is_a_lower_bound_and_keeps_nothing(fresh):
    """`device_floor(spec, over)` may stop at a fresh denoiser's forward: what it returns then
    is above `over`'s limit yet never above the whole floor, and the build it left unfinished
    leaves no replay behind (the next build is the one made from scratch)."""
    inventories = load_model_inventories(_spec(SPECS[0]).model)
    stopped = 0
    for options in SPECS:
        spec = _spec(options)
        if spec.is_distributed:
            continue
        seen = []
        bound = walk.device_floor(spec, over=lambda nbytes: seen.append(nbytes) or True)
        rows = _rows(step.build_timeline(spec, inventories))
        step.clear_reuse()
        whole = walk.device_floor(spec)
        if seen:
            stopped += 1
            assert bound == seen[0] < whole, options
        assert _rows(step.build_timeline(spec, inventories)) == rows, options
        step.clear_reuse()
    assert stopped >= 5


def test_a_candidate_is_decided_by_its_estimates_device_used(fresh):
    """The search decides candidates by `estimated_device_used` (no composition), with or
    without the device floor's records handed on, and lists plans with their whole estimate:
    the two figures must be one."""
    for options in SPECS:
        spec = _spec(options)
        if spec.is_distributed:
            # one GPU of several: `per_gpu_device_used`, and host RAM, against the estimate's
            decided, host = walk.per_gpu_device_used(spec)
            walk.device_floor(spec)
            assert walk.per_gpu_device_used(spec) == (decided, host), options
            whole = walk.per_gpu_estimate(spec)
            assert (whole.footprint.device_used_bytes, walk.host_bytes(whole)) == (decided, host), options
            assert estimate(spec).footprint.device_used_bytes == decided, options
            continue
        decided = walk.estimated_device_used(spec)
        walk.device_floor(spec)
        assert walk.estimated_device_used(spec) == decided, options
        assert estimate(spec).footprint.device_used_bytes == decided, options


@pytest.mark.parametrize("options", [
    {"model": "sd15", "method": "lora", "gpu": "4GB"},
    {"model": "sd15", "method": "full", "gpu": "16GB"},
    {"model": "sd15", "method": "lora", "gpus": "2x6GB"},
])
def test_a_search_finds_the_same_plans_without_reuse_or_floor(fresh, monkeypatch, options):
    def plans(result):
        return ([(p.choice, p.to_json(), p.estimate.to_json()) for p in result.plans],
                None if result.closest is None else result.closest.to_json())

    fast = search(fit_request(build_spec(options)))
    walk.clear_cache()
    step.clear_reuse()
    monkeypatch.setattr(step, "REUSE", False)
    monkeypatch.setattr(walk, "device_floor", None)
    slow = search(fit_request(build_spec(options)))
    assert plans(fast) == plans(slow)
    assert fast.estimates <= slow.estimates


def test_strategies_share_records_they_never_change(fresh):
    """Builds that differ only in strategy share their records: the rewrite of one strategy must
    leave them as they were for the next."""
    ddp = _spec({"method": "full", "gpus": "2x24GB", "strategy": "ddp"})
    inventories = load_model_inventories(ddp.model)
    before = _rows(step.build_timeline(ddp, inventories))
    for strategy in ("ddp", "fsdp", "zero1"):
        walk.per_gpu_estimate(_spec({"method": "full", "gpus": "2x24GB", "strategy": strategy}))
    shared = step.build_timeline(ddp, inventories)
    assert _rows(shared) == before
    assert shared.clock.records[0] is step.build_timeline(ddp, inventories).clock.records[0]


@pytest.mark.parametrize("options", [{"model": "sd15", "method": "lora", "gpu": "4GB"},
                                     {"model": "sd15", "method": "full", "gpus": "4x6GB"}])
def test_listed_plans_make_their_whole_estimate_when_read(fresh, options):
    """The winner's whole estimate is made by the search (its grid is drawn); the other plans'
    when first read, the same as `estimate` gives, with the device used (and, on several GPUs,
    the host RAM) the search decided by."""
    result = search(fit_request(build_spec(options)))
    assert len(result.plans) >= 2
    assert result.plans[0].made is not None
    later = [p for p in result.plans[1:] if p.made is None]
    assert later
    for plan in later:
        whole = plan.estimate
        assert plan.made is whole and whole.footprint.device_used_bytes == plan.device_used_bytes
        assert walk.host_bytes(whole) == plan.host_bytes
    if result.plans[0].spec.is_distributed:    # an offload among them: host RAM decided without its estimate
        assert any(plan.host_bytes for plan in later)
    walk.clear_cache()
    step.clear_reuse()
    for plan in later:
        alone = walk.per_gpu_estimate(plan.spec) if plan.spec.is_distributed else estimate(plan.spec)
        assert alone.to_json() == plan.estimate.to_json()

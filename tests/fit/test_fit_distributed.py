"""`vramplan fit` on several GPUs: the strategy and offload are searched (least communication
first), only combinations the engines run are tried, host RAM is shown and checked, and the
search still returns exactly the brute-force frontier -- here on a made-up estimator whose
memory is not monotone along the strategy axis, as the real one is not."""

import pytest

from vramplan.estimate.result import Estimate
from vramplan.distributed.host import HostRam
from vramplan.distributed.plan import OPTIONS, distributed_options
from vramplan.fit import fit_request, search
from vramplan.fit.margin import SafetyMargin
from vramplan.fit.space import Criterion, combination_error, search_axes, strategy_label
from vramplan.fit.walk import PerGpuShare
from vramplan.footprint import Category, Footprint
from vramplan.spec import FsdpSharding, Offload, Strategy, build_spec
from vramplan.units import GB, GIB

from made_up_estimator import brute_force as frontier, made_up_gib

NO_MARGIN = SafetyMargin(0.0, "test")

# GiB per GPU each strategy takes off (or adds to) the single-GPU figure: deliberately not monotone
# (zero3 above fsdp full-shard, zero2 above zero1), as the real per-GPU estimates are not.
STRATEGY_GIB = {
    ("ddp", None, "none"): +0.8,
    ("zero1", None, "none"): -2.0,
    ("zero2", None, "none"): -1.6,
    ("fsdp", "shard-grad-op", "none"): -3.0,
    ("fsdp", "full-shard", "none"): -4.5,
    ("zero3", None, "none"): -3.4,
    ("zero2", None, "optimizer"): -5.0,
    ("zero3", None, "optimizer"): -5.5,
    ("fsdp", "full-shard", "params"): -7.0,
    ("zero3", None, "params"): -6.8,
}
HOST_GB = {"none": 0, "optimizer": 30, "params": 45}


def made_up_distributed(spec) -> Estimate:
    key = (spec.strategy.value, spec.fsdp_sharding.value if spec.fsdp_sharding else None, spec.offload.value)
    used = int(max(made_up_gib(spec) + STRATEGY_GIB[key], 0.5) * GIB)
    footprint = Footprint(categories={Category.ACTIVATIONS: used}, peak_allocated_bytes=used,
                          peak_reserved_bytes=used, device_used_bytes=used, peak_phase="backward")
    host = HostRam(HOST_GB[spec.offload.value] * GB // spec.num_gpus, 0, spec.num_gpus)
    return Estimate(spec=spec, parameters={}, footprint=footprint, distributed=PerGpuShare(host, {}, ()))


@pytest.fixture
def made_up_many(made_up):
    """The made-up estimator for several GPUs; refuses combinations the engines refuse, so that
    the test fails if the search ever estimates one."""
    seen = []

    def estimator(spec):
        assert combination_error(spec) is None, spec
        seen.append(spec)
        return made_up_distributed(spec)

    return estimator, seen


def brute_force(request, estimator, margin=NO_MARGIN):
    """The frontier of the existing candidates whose per-GPU device used and host RAM fit."""
    def fits(spec):
        if combination_error(spec) is not None:
            return False
        estimate = estimator(spec)
        if margin.required(estimate.footprint.device_used_bytes) > request.gpu.memory_bytes:
            return False
        host = estimate.distributed.host.bytes_per_node
        return request.host_ram is None or host <= request.host_ram

    return frontier(request, fits)


CASES = [
    dict(model="sd15", method="full", gpus="2x16GiB"),
    dict(model="sd15", method="full", gpus="4x12GiB"),
    dict(model="sd15", method="full", gpus="4x9GiB"),
    dict(model="sd15", method="full", gpus="4x7GiB"),
    dict(model="sd15", method="full", gpus="4x5GiB"),
    dict(model="sd15", method="lora", gpus="2x6.5GiB"),
    dict(model="sd15", method="lora", gpus="2x5GiB", rank=32),
    dict(model="sd15", method="full", gpus="4x9GiB", strategy="zero3"),
    dict(model="sd15", method="full", gpus="4x8GiB", optimizer="adamw"),
]


@pytest.mark.parametrize("host_ram", [None, 40 * GB])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_plans_are_the_brute_force_frontier(made_up_many, case, host_ram):
    estimator, seen = made_up_many
    spec = build_spec(case)
    request = fit_request(spec, min_rank=4 if spec.rank else None, top=4, host_ram=host_ram)
    result = search(request, estimator=estimator, margin=NO_MARGIN)
    expected = brute_force(request, estimator)
    assert [p.spec for p in result.plans] == expected
    assert all(p.fits and p.host_fits for p in result.plans)
    if not expected:
        assert result.closest is not None and not result.fits


def test_one_card_enough_keeps_ddp_for_one_estimate(made_up_many):
    estimator, seen = made_up_many
    result = search(fit_request(build_spec({"model": "sd15", "method": "lora", "gpus": "4x80GiB"})),
                    estimator=estimator, margin=NO_MARGIN)
    assert result.estimates == 1 and result.best.spec.strategy is Strategy.DDP
    assert result.best.spec.offload is Offload.NONE


def test_the_strategy_is_given_up_before_quality_and_after_checkpointing(made_up_many):
    """Quality first (no bf16-pure, AdamW kept), then the least communication that fits once
    checkpointing and caching are on."""
    estimator, _ = made_up_many
    best = search(fit_request(build_spec({"model": "sd15", "method": "full", "gpus": "4x12GiB"})),
                  estimator=estimator, margin=NO_MARGIN).best.spec
    # full bf16 adamw: 6 + 0.3 + 1.5 + 0.3 + 0.4 + 10 = 18.5 GiB on one GPU; with checkpointing and
    # both caches 16.8: ddp 17.6, zero1 14.8 > 12; zero2 15.2; fsdp shard-grad-op 13.8;
    # fsdp full-shard 12.3 > 12 ... zero3 13.4; zero2 + offload optimizer 11.8 fits
    assert best.precision.value == "bf16" and best.optimizer.value == "adamw"
    assert (best.strategy, best.offload) == (Strategy.ZERO2, Offload.OPTIMIZER)
    assert best.gradient_checkpointing


def test_host_ram_rules_out_offloads_it_cannot_hold(made_up_many):
    estimator, _ = made_up_many
    spec = build_spec({"model": "sd15", "method": "full", "gpus": "4x12GiB", "optimizer": "adamw",
                       "precision": "bf16"})
    free = search(fit_request(spec, top=1), estimator=estimator, margin=NO_MARGIN).best
    assert free.host_bytes == 30 * GB and free.spec.offload is Offload.OPTIMIZER
    assert free.host_fits and free.to_json()["host_ram_bytes_per_node"] == 30 * GB
    tight = search(fit_request(spec, top=1, host_ram=20 * GB), estimator=estimator, margin=NO_MARGIN)
    assert not tight.fits
    blockers = {b.constraint: b for b in tight.blockers}
    host = blockers["--host-ram 20.0GB"]
    assert host.fits and "30.0 GB of host RAM" in host.relaxed


def test_a_fixed_strategy_is_a_constraint_fit_explains(made_up_many):
    estimator, _ = made_up_many
    spec = build_spec({"model": "sd15", "method": "full", "gpus": "4x12GiB", "strategy": "ddp"})
    result = search(fit_request(spec), estimator=estimator, margin=NO_MARGIN)
    assert not result.fits
    blockers = {b.constraint: b for b in result.blockers}
    assert blockers["--strategy ddp"].fits and "--strategy" in blockers["--strategy ddp"].relaxed


def test_strategy_axis_values_and_floor():
    request = fit_request(build_spec({"model": "sdxl", "method": "full", "gpus": "4xrtx4090"}))
    axis = {a.criterion: a for a in search_axes(request)}[Criterion.STRATEGY]
    assert [(v["strategy"], v["offload"], v["fsdp_sharding"]) for v in axis.values] == \
        [(o.strategy, o.offload, o.fsdp_sharding) for o in OPTIONS]
    assert axis.labels[:3] == ("ddp", "zero1", "zero2") and axis.labels[-1] == "zero3 +offload params"
    # only an offload is known never to need more than the same strategy without it
    labels = [axis.labels[i] for i in axis.floor]
    assert set(labels) == {"ddp", "zero1", "zero2 +offload optimizer", "fsdp shard-grad-op",
                           "fsdp full-shard +offload params", "zero3 +offload params"}
    zero3, zero3_params = axis.labels.index("zero3"), axis.labels.index("zero3 +offload params")
    assert axis.never_more(zero3_params, zero3) and not axis.never_more(zero3, zero3_params)
    assert not axis.never_more(axis.labels.index("zero3"), axis.labels.index("ddp"))


def test_strategy_axis_follows_what_the_user_fixed():
    def axis_of(options):
        request = fit_request(build_spec({"model": "sd15", "gpu": "24GB", **options}))
        return {a.criterion: a for a in search_axes(request)}[Criterion.STRATEGY]

    assert axis_of({}).labels == ("-",) and axis_of({}).fixed                 # one GPU: nothing to share
    zero3 = axis_of({"method": "full", "num_gpus": 4, "strategy": "zero3"})
    assert zero3.labels == ("zero3", "zero3 +offload optimizer", "zero3 +offload params")
    both = axis_of({"method": "full", "num_gpus": 4, "strategy": "zero2", "offload": "optimizer"})
    assert both.labels == ("zero2 +offload optimizer",) and both.fixed
    ti = axis_of({"method": "textual-inversion", "num_gpus": 2})
    assert not {"fsdp", "zero3"} & {label.split()[0] for label in ti.labels}
    # a fixed 8-bit optimizer rules out every offload (they run AdamW on the CPU)
    eight = axis_of({"method": "full", "num_gpus": 2, "optimizer": "adamw8bit"})
    assert all("offload" not in label for label in eight.labels)
    # a free optimizer does not: the search pairs offloads with AdamW only
    free = axis_of({"method": "full", "num_gpus": 2})
    assert len(free.values) == len(distributed_options(build_spec({"method": "full", "num_gpus": 2})))


def test_combinations_the_engines_refuse():
    def spec(**changes):
        return build_spec({"model": "sd15", "method": "full", "gpus": "2x24GB"}).replace(**changes)

    from vramplan.spec import BaseQuant, Optimizer, Precision

    assert combination_error(spec(strategy=Strategy.ZERO2, precision=Precision.BF16_PURE))
    assert combination_error(spec(strategy=Strategy.ZERO2, offload=Offload.OPTIMIZER,
                                  optimizer=Optimizer.ADAMW8BIT))
    assert combination_error(spec(strategy=Strategy.DDP, precision=Precision.BF16_PURE)) is None
    lora = build_spec({"model": "sd15", "method": "lora", "gpus": "2x24GB"})
    assert combination_error(lora.replace(strategy=Strategy.ZERO3, base_quant=BaseQuant.NF4))
    assert combination_error(build_spec({"model": "sd15", "gpu": "24GB"})) is None
    assert strategy_label(Strategy.FSDP, Offload.PARAMS, FsdpSharding.FULL_SHARD) == "fsdp full-shard +offload params"


# -- the real estimate ----------------------------------------------------------------------------

def test_per_gpu_search_estimate_is_the_estimates_footprint():
    from vramplan.estimate import estimate
    from vramplan.fit.walk import per_gpu_estimate

    for options in ({"strategy": "zero2", "offload": "optimizer"}, {"strategy": "fsdp"}, {}):
        spec = build_spec({"model": "sd15", "method": "full", "gpus": "2x8GB", **options})
        fast, whole = per_gpu_estimate(spec), estimate(spec)
        assert fast.footprint == whole.footprint
        assert fast.distributed.host == whole.distributed.host


def test_real_search_on_two_small_cards():
    spec = build_spec({"model": "sd15", "method": "full", "gpus": "2x4GB", "optimizer": "adamw"})
    result = search(fit_request(spec, top=3))
    assert result.fits
    best = result.best
    # one 4 GB card holds no SD 1.5 full fine-tune with AdamW; two hold it once the optimizer moves out
    assert best.spec.strategy is not Strategy.DDP and best.spec.offload is not Offload.NONE
    assert best.host_bytes > 0 and best.required_bytes <= best.capacity_bytes
    # the winner carries the whole distributed estimate, the others the search's
    assert hasattr(best.estimate.distributed, "single_gpu_peak_allocated_bytes")
    assert best.estimate.distributed.single_gpu_peak_allocated_bytes > best.capacity_bytes
    assert any("per GPU" in note for note in result.notes)
    assert any("--host-ram" in note for note in result.notes)

"""The search against brute force on a made-up estimator: the plans it lists are exactly the
first N plans that fit and that no earlier one beats or equals on every axis, in the order of
preference; it never enumerates blindly; impossible constraints explain themselves."""

import itertools

import pytest

from vramplan.footprint import Category

from vramplan.fit import fit_request, search
from vramplan.fit.margin import SafetyMargin
from vramplan.fit.space import Criterion, search_axes
from vramplan.spec import build_spec
from vramplan.units import GIB

from made_up_estimator import brute_force as frontier

NO_MARGIN = SafetyMargin(0.0, "test")


def brute_force(request, estimator, margin=NO_MARGIN):
    """The frontier of the candidates whose device used (plus accumulated gradients) fits."""
    def fits(spec):
        used = estimator(spec).footprint.device_used_bytes
        extra = 0
        if spec.gradient_accumulation_steps > 1:
            from vramplan.fit.walk import accumulation_bytes
            from vramplan.models.inventory import load_model_inventories

            extra = accumulation_bytes(spec, load_model_inventories(spec.model))
        return margin.required(used + extra) <= request.gpu.memory_bytes

    return frontier(request, fits)


CASES = [
    dict(model="sd15", method="lora", gpu="8GiB"),
    dict(model="sd15", method="lora", gpu="7GiB"),
    dict(model="sd15", method="lora", gpu="5GiB"),
    dict(model="sd15", method="lora", gpu="5.5GiB", batch_size=None),
    dict(model="sd15", method="full", gpu="12GiB"),
    dict(model="sd15", method="lora", gpu="9GiB", rank=32),
]


@pytest.mark.parametrize("effective", [1, 4])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['method']}-{c['gpu']}-{c.get('rank', '')}")
def test_plans_are_the_brute_force_frontier(made_up, case, effective):
    estimator, seen = made_up
    options = {k: v for k, v in case.items() if v is not None}
    spec = build_spec(options)
    request = fit_request(spec, effective_batch=effective, min_rank=4 if spec.rank else None, top=4)
    result = search(request, estimator=estimator, margin=NO_MARGIN)
    expected = brute_force(request, estimator)
    assert [p.spec for p in result.plans] == expected
    assert all(p.fits for p in result.plans)


def test_it_does_not_enumerate_blindly(made_up):
    estimator, seen = made_up
    request = fit_request(build_spec({"model": "sd15", "method": "lora", "gpu": "7GiB"}), effective_batch=8,
                          min_rank=4)
    axes = search_axes(request)
    space = 1
    for axis in axes:
        space *= len(axis.values)
    result = search(request, estimator=estimator, margin=NO_MARGIN)
    assert result.fits
    assert result.estimates == len(seen) < space / 10, (result.estimates, space)


def test_everything_fits_costs_one_estimate(made_up):
    estimator, seen = made_up
    request = fit_request(build_spec({"model": "sd15", "method": "lora", "gpu": "80GiB"}))
    result = search(request, estimator=estimator, margin=NO_MARGIN)
    assert result.estimates == 1 and len(result.plans) == 1
    best = result.best.spec
    assert best.base_quant.value == "none" and best.rank == 16 and not best.gradient_checkpointing
    assert not best.cache_latents and best.precision.value == "bf16"


def test_ranking_keeps_quality_then_speed(made_up):
    """Quantization is given up last, then rank; larger batch beats no checkpointing."""
    estimator, _ = made_up
    request = fit_request(build_spec({"model": "sd15", "method": "lora", "gpu": "8GiB"}), effective_batch=2)
    best = search(request, estimator=estimator, margin=NO_MARGIN).best.spec
    # 6 none + 0.8 r16 + 0.3 adamw = 7.1; batch 2 with GC: +1.0 -> 8.1 > 8; batch 1 with GC: 7.6,
    # + 0.3 uncached latents = 7.9 fits: the latents stay uncached, the text embeddings are cached
    assert (best.base_quant.value, best.rank, best.optimizer.value) == ("none", 16, "adamw")
    assert (best.batch_size, best.gradient_accumulation_steps) == (1, 2)
    assert best.gradient_checkpointing and not best.cache_latents and best.cache_text_embeddings


def test_prefer_speed_trades_rank_for_batch(made_up):
    estimator, _ = made_up
    spec = build_spec({"model": "sd15", "method": "lora", "gpu": "8GiB"})
    quality = search(fit_request(spec, effective_batch=4), estimator=estimator, margin=NO_MARGIN).best.spec
    speed = search(fit_request(spec, effective_batch=4, prefer="speed"), estimator=estimator,
                   margin=NO_MARGIN).best.spec
    assert speed.batch_size > quality.batch_size
    assert (speed.base_quant.value, speed.rank) != ("none", 16)


def test_fixed_flags_are_not_searched(made_up):
    estimator, seen = made_up
    spec = build_spec({"model": "sd15", "method": "lora", "gpu": "9GiB", "rank": 8, "optimizer": "adamw",
                       "gradient_checkpointing": "false", "base_quant": "none", "cache_latents": "false"})
    result = search(fit_request(spec), estimator=estimator, margin=NO_MARGIN)
    assert result.fits
    for s in seen:
        assert s.rank == 8 and s.optimizer.value == "adamw" and not s.gradient_checkpointing
        assert s.base_quant.value == "none" and not s.cache_latents
    fixed = {a.criterion for a in result.axes if a.fixed}
    assert {Criterion.RANK, Criterion.OPTIMIZER, Criterion.CHECKPOINTING, Criterion.QUANT,
            Criterion.CACHE_LATENTS} <= fixed


def test_the_margin_is_kept(made_up):
    estimator, _ = made_up
    spec = build_spec({"model": "sd15", "method": "lora", "gpu": "8GiB", "rank": 16, "base_quant": "none",
                       "optimizer": "adamw", "gradient_checkpointing": "false"})
    # needs 6 + 0.8 + 0.3 + 1.5 + 0.3 + 0.4 = 9.3 GiB at most, 7.1 + 1.5 = 8.6 with caches: over 8
    none = search(fit_request(spec), estimator=estimator, margin=NO_MARGIN)
    assert not none.fits
    roomy = build_spec({"model": "sd15", "method": "lora", "gpu": "8.7GiB", "rank": 16, "base_quant": "none",
                        "optimizer": "adamw", "gradient_checkpointing": "false"})
    assert search(fit_request(roomy), estimator=estimator, margin=NO_MARGIN).fits
    assert not search(fit_request(roomy), estimator=estimator, margin=SafetyMargin(0.03, "t")).fits


def test_impossible_constraints_explain_themselves(made_up):
    estimator, _ = made_up
    spec = build_spec({"model": "sd15", "method": "lora", "gpu": "8GiB", "rank": 64, "base_quant": "none",
                       "gradient_checkpointing": "false"})
    result = search(fit_request(spec), estimator=estimator, margin=NO_MARGIN)
    assert not result.fits and result.closest is not None
    # the leanest plan with the flags fixed: 6 none + 3.2 r64 + 0.05 adafactor + 1.5 no GC = 10.75 GiB
    assert result.closest.required_bytes == int(10.75 * GIB)
    assert -result.closest.headroom_bytes == int(10.75 * GIB) - 8 * GIB
    blockers = {b.constraint: b for b in result.blockers}
    assert set(blockers) >= {"--rank 64", "--base-quant none", "--no-gradient-checkpointing"}
    assert blockers["--base-quant none"].fits          # nf4: 7.75 GiB
    assert blockers["--base-quant none"].relaxed == "--base-quant nf4"
    assert blockers["--rank 64"].fits                  # rank 4: 7.75 GiB
    assert blockers["--rank 64"].relaxed == "--rank 4"
    assert not blockers["--no-gradient-checkpointing"].fits   # 9.75 GiB
    assert result.smallest_card is not None and result.smallest_card.memory_bytes >= result.closest.required_bytes


def test_full_finetune_suggests_an_adapter(made_up):
    estimator, _ = made_up
    spec = build_spec({"model": "sd15", "method": "full", "gpu": "6GiB"})
    result = search(fit_request(spec), estimator=estimator, margin=NO_MARGIN)
    assert not result.fits
    method = next(b for b in result.blockers if b.constraint == "--method full")
    assert method.fits and "--method lora" in method.relaxed


def test_accumulation_is_counted_by_the_estimate_itself():
    """Micro-steps after the first run with the first one's fp32 gradients alive: the estimate
    replays them, so an accumulation plan needs at least the weights, gradients and states."""
    from vramplan.estimate import estimate

    plain = estimate(build_spec({"method": "full", "precision": "bf16"}))
    accumulated = estimate(build_spec({"method": "full", "precision": "bf16", "gradient_accumulation_steps": 4}))
    phases = {p.phase: p for p in accumulated.footprint.phases}
    grads = phases["micro 2 forward"].categories.get(Category.GRADIENTS, 0)
    assert grads == plain.footprint.category_bytes(Category.GRADIENTS) > 859_520_964 * 4


@pytest.mark.parametrize("method", ["lora", "full", "textual-inversion"])
def test_the_static_bound_never_exceeds_the_estimate(method):
    """Weights, optimizer states and gradients are alive together at the end of the second
    backward, so their sum (plus context and a workspace) is a lower bound of device used: the
    search may reject a candidate on it without an estimate."""
    from vramplan.estimate import estimate
    from vramplan.fit.walk import static_bytes
    from vramplan.models.inventory import load_model_inventories

    for precision, optimizer, checkpointing, cached in itertools.product(
            ["fp16", "fp32"], ["adamw", "adamw8bit", "adafactor"], [False, True], [False, True]):
        spec = build_spec({"model": "sd15", "method": method, "precision": precision, "optimizer": optimizer,
                           "gradient_checkpointing": checkpointing, "cache_latents": cached, "gpu": "80GB"})
        bound = static_bytes(spec, load_model_inventories(spec.model))
        used = estimate(spec).footprint.device_used_bytes
        assert 0.5 * used < bound <= used, (precision, optimizer, checkpointing, cached)

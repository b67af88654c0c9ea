"""The search space: which axes exist, their values best first, and what the user fixed."""

import pytest

from vramplan.errors import UsageError
from vramplan.fit.space import (QUALITY, Criterion, apply_values, fit_request, parse_prefer,
                                search_axes)
from vramplan.spec import build_spec


def axes_of(options, **request):
    spec = build_spec(options)
    return {a.criterion: a for a in search_axes(fit_request(spec, **request))}, spec


def test_default_objective_order():
    assert parse_prefer(None) == QUALITY
    assert QUALITY.index(Criterion.QUANT) < QUALITY.index(Criterion.RANK) < QUALITY.index(Criterion.BATCH) \
        < QUALITY.index(Criterion.STRATEGY) < QUALITY.index(Criterion.CHECKPOINTING)
    speed = parse_prefer("speed")
    assert speed[:3] == (Criterion.BATCH, Criterion.STRATEGY, Criterion.CHECKPOINTING)
    assert parse_prefer("rank,batch")[:3] == (Criterion.RANK, Criterion.BATCH, Criterion.RESOLUTION)
    with pytest.raises(UsageError):
        parse_prefer("colour")


def test_lora_axes_on_a_bf16_card():
    axes, _ = axes_of({"model": "sd15", "method": "lora", "gpu": "rtx4090"}, effective_batch=4)
    assert [v["base_quant"].value for v in axes[Criterion.QUANT].values] == ["none", "int8", "nf4"]
    assert [v["rank"] for v in axes[Criterion.RANK].values] == [16, 8, 4]
    assert [(v["batch_size"], v["gradient_accumulation_steps"]) for v in axes[Criterion.BATCH].values] == \
        [(4, 1), (2, 2), (1, 4)]
    assert [v["precision"].value for v in axes[Criterion.PRECISION].values] == ["bf16"]
    assert [v["gradient_checkpointing"] for v in axes[Criterion.CHECKPOINTING].values] == [False, True]
    assert [v["attention"].value for v in axes[Criterion.ATTENTION].values] == ["sdpa"]


def test_full_finetune_axes_on_a_card_without_bf16():
    axes, _ = axes_of({"model": "sd15", "method": "full", "gpu": "t4"})
    assert [v["precision"].value for v in axes[Criterion.PRECISION].values] == ["fp16"]
    assert len(axes[Criterion.QUANT].values) == 1 and len(axes[Criterion.RANK].values) == 1
    axes, _ = axes_of({"model": "sd15", "method": "full", "gpu": "a100-80g"})
    assert [v["precision"].value for v in axes[Criterion.PRECISION].values] == ["bf16", "bf16-pure"]


def test_text_embeddings_are_not_cached_for_a_trained_text_encoder():
    axes, _ = axes_of({"model": "sd15", "method": "lora", "gpu": "8GB", "train_text_encoder": True})
    assert len(axes[Criterion.CACHE_TEXT].values) == 1
    axes, _ = axes_of({"model": "sd15", "method": "textual-inversion", "gpu": "8GB"})
    assert [v["cache_text_embeddings"] for v in axes[Criterion.CACHE_TEXT].values] == [False]


def test_given_flags_fix_their_axis():
    axes, spec = axes_of({"model": "sd15", "method": "lora", "gpu": "8GB", "rank": 32, "batch_size": 2,
                          "optimizer": "adamw8bit", "precision": "fp16", "attention": "xformers"})
    for criterion in (Criterion.RANK, Criterion.BATCH, Criterion.OPTIMIZER, Criterion.PRECISION,
                      Criterion.ATTENTION):
        assert axes[criterion].fixed and len(axes[criterion].values) == 1
    assert axes[Criterion.RANK].values[0]["rank"] == 32


def test_rank_range_from_min_rank():
    axes, _ = axes_of({"model": "sd15", "method": "lora", "gpu": "8GB", "rank": 128}, min_rank=16)
    assert [v["rank"] for v in axes[Criterion.RANK].values] == [128, 64, 32, 16]
    axes, _ = axes_of({"model": "sd15", "method": "lora", "gpu": "8GB", "rank": 12}, min_rank=3)
    assert [v["rank"] for v in axes[Criterion.RANK].values] == [12, 8, 4, 3]
    axes, _ = axes_of({"model": "sd15", "method": "lora", "gpu": "8GB"}, min_rank=16)
    assert [v["rank"] for v in axes[Criterion.RANK].values] == [16]


def test_resolution_range_only_with_min_resolution():
    axes, _ = axes_of({"model": "sdxl", "method": "lora", "gpu": "8GB"})
    assert len(axes[Criterion.RESOLUTION].values) == 1
    axes, _ = axes_of({"model": "sdxl", "method": "lora", "gpu": "8GB"}, min_resolution=768)
    assert [v["resolution"] for v in axes[Criterion.RESOLUTION].values] == [(1024, 1024), (960, 960),
                                                                             (896, 896), (832, 832), (768, 768)]


def test_alpha_follows_the_rank_unless_given():
    spec = build_spec({"model": "sd15", "method": "lora", "gpu": "8GB"})
    request = fit_request(spec)
    axes = search_axes(request)
    rank = [a.criterion for a in axes].index(Criterion.RANK)
    choice = [0] * len(axes)
    choice[rank] = 2
    assert apply_values(request, axes, tuple(choice)).alpha == 4.0
    given = build_spec({"model": "sd15", "method": "lora", "gpu": "8GB", "alpha": 1})
    request = fit_request(given)
    assert apply_values(request, search_axes(request), tuple(choice)).alpha == 1.0

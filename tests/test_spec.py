"""`build_spec`: defaults, every validation error the issue lists, and the JSON round trip."""

import dataclasses
import json

import pytest

from vramplan.errors import UsageError
from vramplan.gpus import CATALOG
from vramplan.models.catalog import MODELS
from vramplan.spec import (Attention, BaseQuant, LoraTargets, Method, Optimizer, Precision, TrainingSpec,
                           build_spec, spec_from_json)


def test_defaults():
    spec = build_spec({})
    assert spec.model is MODELS["sd15"]
    assert spec.method is Method.LORA
    assert (spec.rank, spec.alpha, spec.lora_targets) == (16, 16.0, LoraTargets.ATTN)
    assert spec.precision is Precision.FP16 and spec.base_quant is BaseQuant.NONE
    assert spec.optimizer is Optimizer.ADAMW and spec.momentum is None
    assert (spec.batch_size, spec.gradient_accumulation_steps) == (1, 1)
    assert spec.resolution == (512, 512)
    assert spec.attention is Attention.SDPA
    assert not (spec.gradient_checkpointing or spec.train_text_encoder or spec.cache_latents
                or spec.cache_text_embeddings or spec.ema or spec.prior_preservation)
    assert spec.gpu is None and spec.num_gpus == 1
    assert spec.given == frozenset()
    assert spec.images_per_step == 1


@pytest.mark.parametrize("model, side", [("sd15", 512), ("sd21", 768), ("sdxl", 1024), ("sd35-medium", 1024),
                                         ("sd35-large", 1024), ("flux-dev", 1024)])
def test_native_resolution_per_model(model, side):
    assert build_spec({"model": model}).resolution == (side, side)


@pytest.mark.parametrize("method", ["lora", "loha", "lokr"])
@pytest.mark.parametrize("rank", [1, 8, 128])
def test_alpha_defaults_to_rank(method, rank):
    spec = build_spec({"method": method, "rank": rank})
    assert spec.rank == rank and spec.alpha == float(rank)
    assert build_spec({"method": method, "rank": rank, "alpha": 4}).alpha == 4.0


def test_method_defaults():
    full = build_spec({"method": "full"})
    assert full.rank is None and full.alpha is None and full.lora_targets is None
    assert build_spec({"method": "lokr"}).lokr_factor == -1
    assert build_spec({"method": "textual-inversion"}).num_vectors == 1
    assert build_spec({"method": "hypernetwork"}).hypernetwork_layers == (1.0, 2.0, 1.0)
    assert build_spec({"optimizer": "sgd"}).momentum == 0.0
    db = build_spec({"method": "dreambooth", "batch_size": 3})
    assert db.prior_preservation and db.images_per_step == 6


def test_text_is_normalised():
    spec = build_spec({"method": "Textual_Inversion", "precision": " BF16 ", "model": "SD1.5",
                       "rank": None, "gradient_checkpointing": "yes"})
    assert spec.method is Method.TEXTUAL_INVERSION and spec.precision is Precision.BF16
    assert spec.model is MODELS["sd15"] and spec.gradient_checkpointing is True
    assert spec.trains_text_encoder


@pytest.mark.parametrize("value, resolution", [("768", (768, 768)), ("832x1216", (832, 1216)),
                                               ("1216X832", (1216, 832)), ((640, 1024), (640, 1024)),
                                               (1024, (1024, 1024))])
def test_resolutions(value, resolution):
    assert build_spec({"model": "sdxl", "resolution": value}).resolution == resolution


def test_gpu_and_given():
    spec = build_spec({"gpu": "rtx4090", "batch_size": 2, "rank": None})
    assert spec.gpu is CATALOG["rtx4090"]
    assert spec.given == frozenset({"gpu", "batch_size"})
    assert build_spec({"gpu": "16GiB"}).gpu.memory_bytes == 16 * 2**30


BAD = [
    ({"rank": -1}, "--rank: -1 is too small (at least 1)"),
    ({"rank": "abc"}, "--rank: 'abc' is not a whole number"),
    ({"rank": 0}, "--rank: 0 is too small"),
    ({"rank": "1.5"}, "--rank: '1.5' is not a whole number"),
    ({"alpha": 0}, "--alpha"),
    ({"alpha": "x"}, "--alpha: 'x' is not a number"),
    ({"batch_size": 0}, "--batch-size: 0 is too small"),
    ({"batch_size": "two"}, "--batch-size: 'two' is not a whole number"),
    ({"gradient_accumulation_steps": 0}, "--gradient-accumulation-steps: 0 is too small"),
    ({"resolution": 513}, "--resolution: 513 is not a multiple of 64"),
    ({"resolution": "512x520"}, "--resolution: 520 is not a multiple of 64"),
    ({"model": "flux-dev", "resolution": 1000}, "not a multiple of 16"),
    ({"resolution": 64}, "too small"),
    ({"resolution": "512x"}, "--resolution"),
    ({"resolution": "1x2x3"}, "is not N or WxH"),
    ({"resolution": "big"}, "--resolution"),
    ({"model": "nosuch"}, "--model: unknown model 'nosuch'"),
    ({"method": "nosuch"}, "--method: invalid choice 'nosuch'"),
    ({"precision": "fp8"}, "--precision: invalid choice 'fp8'"),
    ({"optimizer": "adam"}, "--optimizer: invalid choice 'adam'"),
    ({"attention": "flash"}, "--attention: invalid choice 'flash'"),
    ({"lora_targets": "mlp"}, "--lora-targets: invalid choice 'mlp'"),
    ({"base_quant": "int4"}, "--base-quant: invalid choice 'int4'"),
    ({"gpu": "banana"}, "unknown GPU 'banana'"),
    ({"gradient_checkpointing": "maybe"}, "--gradient-checkpointing: 'maybe' is not true or false"),
    ({"learning_rate": 1e-4}, "unknown setting(s): learning_rate"),
    # combinations that make no sense
    ({"method": "full", "rank": 8}, "--rank does not apply to --method full"),
    ({"method": "full", "alpha": 8}, "--alpha does not apply to --method full"),
    ({"method": "lora", "num_vectors": 2}, "--num-vectors does not apply to --method lora"),
    ({"method": "lora", "hypernetwork_layers": "1,2,1"}, "--hypernetwork-layers does not apply"),
    ({"method": "lora", "lokr_factor": 4}, "--lokr-factor does not apply to --method lora"),
    ({"method": "textual-inversion", "lora_targets": "attn"}, "--lora-targets does not apply"),
    ({"method": "lokr", "lokr_factor": 1}, "--lokr-factor must be -1 (balanced) or at least 2"),
    ({"method": "lokr", "lokr_factor": 0}, "--lokr-factor must be -1"),
    ({"method": "lokr", "lokr_factor": -2}, "--lokr-factor: -2 is too small"),
    ({"method": "textual-inversion", "num_vectors": 0}, "--num-vectors: 0 is too small"),
    ({"method": "hypernetwork", "hypernetwork_layers": "1,2"}, "must start and end with 1"),
    ({"method": "hypernetwork", "hypernetwork_layers": "1,a,1"}, "is not a list of numbers"),
    ({"method": "hypernetwork", "hypernetwork_layers": "1,0,1"}, "positive widths"),
    ({"method": "full", "base_quant": "nf4"}, "--base-quant nf4 needs --method lora"),
    ({"method": "loha", "base_quant": "int8"}, "--base-quant int8 needs --method lora"),
    ({"base_quant": "nf4", "precision": "fp32"}, "--base-quant computes in 16 bits"),
    ({"cache_text_embeddings": True, "train_text_encoder": True}, "--cache-text-embeddings needs a frozen"),
    ({"method": "textual-inversion", "cache_text_embeddings": True}, "--cache-text-embeddings needs a frozen"),
    ({"method": "textual-inversion", "train_text_encoder": True}, "--train-text-encoder does not apply"),
    ({"method": "dreambooth", "prior_preservation": False}, "prior preservation"),
    ({"ema": True}, "--ema does not apply to --method lora"),
    ({"method": "hypernetwork", "ema": True}, "--ema does not apply to --method hypernetwork"),
    ({"momentum": 0.9}, "--momentum applies to --optimizer sgd only"),
    ({"optimizer": "sgd", "momentum": 1}, "--momentum: 1 must be below 1"),
    ({"optimizer": "sgd", "momentum": -0.1}, "--momentum"),
    ({"precision": "bf16", "gpu": "t4"}, "no bfloat16 support"),
    ({"precision": "bf16-pure", "gpu": "v100"}, "no bfloat16 support"),
    ({"num_gpus": 0}, "--num-gpus: 0 is too small"),
]


@pytest.mark.parametrize("options, problem", BAD, ids=[json.dumps(o) for o, _ in BAD])
def test_bad_input_is_one_usage_error(options, problem):
    with pytest.raises(UsageError) as info:
        build_spec(options)
    message = str(info.value)
    assert problem in message
    assert "\n" not in message


@pytest.mark.parametrize("options, choices", [
    ({"method": "nosuch"}, [m.value for m in Method]),
    ({"precision": "fp8"}, [p.value for p in Precision]),
    ({"optimizer": "adam"}, [o.value for o in Optimizer]),
    ({"model": "nosuch"}, list(MODELS)),
    ({"method": "full", "rank": 8}, ["lora", "loha", "lokr"]),
])
def test_errors_name_the_valid_choices(options, choices):
    with pytest.raises(UsageError) as info:
        build_spec(options)
    for choice in choices:
        assert choice in str(info.value)


def test_good_combinations_are_accepted():
    assert build_spec({"ema": False}).ema is False     # an explicit "off" is no mistake
    assert build_spec({"method": "full", "ema": True}).ema
    assert build_spec({"base_quant": "nf4", "precision": "bf16"}).base_quant is BaseQuant.NF4
    assert build_spec({"optimizer": "sgd", "momentum": 0.9}).momentum == 0.9
    assert build_spec({"method": "lora", "prior_preservation": True}).images_per_step == 2
    assert build_spec({"precision": "bf16", "gpu": "16GB"}).gpu.bf16


SPECS = [
    {},
    {"model": "sdxl", "method": "full", "train_text_encoder": True, "ema": True, "precision": "bf16",
     "gpu": "a100-80g", "resolution": "832x1216", "gradient_checkpointing": True},
    {"method": "dreambooth", "optimizer": "sgd", "momentum": 0.9, "batch_size": 2},
    {"method": "lokr", "rank": 8, "lokr_factor": 4, "lora_targets": "all-linear+conv", "gpu": "16GB"},
    {"method": "hypernetwork", "hypernetwork_layers": "1,1.5,1", "cache_latents": True},
    {"method": "textual-inversion", "num_vectors": 4, "attention": "eager", "gpu": "24G"},
    {"base_quant": "int8", "alpha": 32, "cache_text_embeddings": True, "optimizer": "adamw8bit"},
]


@pytest.mark.parametrize("options", SPECS, ids=range(len(SPECS)))
def test_json_round_trip(options):
    spec = build_spec(options)
    data = spec.to_json()
    assert json.loads(json.dumps(data)) == data
    assert set(data) == {f.name for f in dataclasses.fields(TrainingSpec)} - {"given"}
    assert isinstance(data["model"], str) and isinstance(data["resolution"], list)
    assert spec_from_json(data) == spec


@pytest.mark.parametrize("data", [[], "sd15", {"method": "lora"}])
def test_a_plan_must_be_an_object_with_a_model(data):
    with pytest.raises(UsageError, match="model"):
        spec_from_json(data)


def test_specs_are_frozen_and_replace_makes_a_copy():
    spec = build_spec({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.rank = 4
    other = spec.replace(batch_size=4)
    assert other.batch_size == 4 and spec.batch_size == 1

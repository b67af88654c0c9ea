"""--gpus, --strategy, --fsdp-sharding, --offload in the spec: parsing, defaults, refusals."""

import pytest

from vramplan.errors import UsageError
from vramplan.gpus import CATALOG
from vramplan.spec import FsdpSharding, Offload, Strategy, build_spec, spec_from_json


@pytest.mark.parametrize("text, key, count", [
    ("8xh100", "h100", 8), ("2x24GB", "24GB", 2), ("4 x rtx4090", "rtx4090", 4), ("h100", "h100", 1),
    ("2xh100,2xh100", "h100", 4), ("3X A100-80G", "a100-80g", 3),
])
def test_gpus_names_card_and_count(text, key, count):
    spec = build_spec({"gpus": text})
    assert (spec.gpu.key, spec.num_gpus) == (key, count)


def test_several_gpus_default_to_ddp_one_gpu_to_no_strategy():
    assert build_spec({"gpus": "2xh100"}).strategy is Strategy.DDP
    single = build_spec({"gpus": "1xh100"})
    assert single.strategy is None and not single.is_distributed
    assert build_spec({}).strategy is None


def test_fsdp_defaults_to_full_shard_and_zero_runs_on_one_gpu():
    assert build_spec({"gpus": "2xh100", "strategy": "fsdp"}).fsdp_sharding is FsdpSharding.FULL_SHARD
    assert build_spec({"gpus": "2xh100", "strategy": "fsdp", "fsdp_sharding": "SHARD_GRAD_OP"}
                      ).fsdp_sharding is FsdpSharding.SHARD_GRAD_OP
    one = build_spec({"gpu": "24GB", "strategy": "zero2", "offload": "optimizer", "method": "full"})
    assert one.is_distributed and one.num_gpus == 1 and one.offload is Offload.OPTIMIZER


@pytest.mark.parametrize("options, message", [
    ({"gpus": "0xh100"}, "--gpus: '0xh100' asks for 0 GPUs (at least 1)"),
    ({"gpus": "2xh100,a100"}, "--gpus: mixed card types (h100, a100-80g)"),
    ({"gpus": "2xbanana"}, "--gpus: unknown GPU 'banana'"),
    ({"gpus": "2xh100", "gpu": "h100"}, "--gpus names both the card and how many"),
    ({"gpus": "2xh100", "method": "textual-inversion", "strategy": "zero3"},
     "--strategy zero3 shards parameters, which makes no sense for textual-inversion"),
    ({"gpus": "2xh100", "method": "textual-inversion", "strategy": "fsdp"},
     "--strategy fsdp shards parameters, which makes no sense for textual-inversion"),
    ({"gpus": "2xh100", "strategy": "zero2", "method": "full", "train_text_encoder": True},
     "accelerate prepares one model per run under DeepSpeed"),
    ({"gpus": "2xh100", "strategy": "zero2", "precision": "fp16-pure"}, "keeps fp32 master weights"),
    ({"gpus": "2xh100", "strategy": "fsdp", "base_quant": "nf4"}, "cannot shard a bitsandbytes-quantized base"),
    ({"offload": "optimizer"}, "--offload optimizer needs a sharding strategy"),
    ({"gpus": "2xh100", "offload": "optimizer"}, "--offload needs a sharding strategy (zero1, zero2, zero3, fsdp), not ddp"),
    ({"gpus": "2xh100", "strategy": "zero2", "offload": "params"}, "DeepSpeed offloads parameters only at stage 3"),
    ({"gpus": "2xh100", "strategy": "fsdp", "offload": "optimizer"}, "use --offload params with fsdp"),
    ({"gpus": "2xh100", "strategy": "zero2", "offload": "optimizer", "optimizer": "adamw8bit"},
     "plans for --optimizer adamw only"),
    ({"gpus": "2xh100", "fsdp_sharding": "full-shard"}, "--fsdp-sharding applies to --strategy fsdp, not ddp"),
    ({"gpus": "2xh100", "strategy": "zero4"}, "--strategy: invalid choice 'zero4' (choose from ddp, fsdp, zero1, zero2, zero3)"),
    ({"gpus": "2xt4", "precision": "bf16"}, "has no bfloat16 support"),
])
def test_refusals_name_the_problem(options, message):
    with pytest.raises(UsageError) as error:
        build_spec(options)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_spec_json_round_trips_the_new_fields():
    spec = build_spec({"gpus": "4xh100", "strategy": "fsdp", "fsdp_sharding": "hybrid-shard",
                       "method": "full", "offload": "params"})
    data = spec.to_json()
    assert (data["strategy"], data["fsdp_sharding"], data["offload"], data["num_gpus"], data["gpu"]) == \
        ("fsdp", "hybrid-shard", "params", 4, "h100")
    again = spec_from_json(data)
    assert again == spec
    plain = spec_from_json(build_spec({}).to_json())
    assert plain.strategy is None and plain.offload is Offload.NONE


def test_every_catalog_card_parses_with_a_count():
    for key in CATALOG:
        assert build_spec({"gpus": f"2x{key}"}).gpu is CATALOG[key]

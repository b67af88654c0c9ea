"""`distributed_options(spec)`: what fit may try when one card is not enough, cheapest first."""

from vramplan.distributed.plan import OPTIONS, Option, distributed_options, estimate_distributed
from vramplan.spec import FsdpSharding, Offload, Strategy, build_spec


def test_full_fine_tune_may_use_every_option():
    spec = build_spec({"method": "full", "gpus": "4xrtx4090"})
    assert distributed_options(spec) == list(OPTIONS)


def test_options_respect_the_method_and_what_the_user_fixed():
    ti = build_spec({"method": "textual-inversion", "gpus": "2xrtx4090"})
    strategies = {o.strategy for o in distributed_options(ti)}
    assert Strategy.ZERO3 not in strategies and Strategy.FSDP not in strategies
    fixed = build_spec({"method": "full", "gpus": "4xrtx4090", "strategy": "zero3"})
    assert {o.strategy for o in distributed_options(fixed)} == {Strategy.ZERO3}
    adamw8bit = build_spec({"method": "full", "gpus": "4xrtx4090", "optimizer": "adamw8bit"})
    assert all(o.offload is Offload.NONE for o in distributed_options(adamw8bit))


def test_an_option_applied_is_a_spec_estimate_accepts():
    spec = build_spec({"method": "full", "model": "sdxl", "gpus": "4xrtx4090", "gradient_checkpointing": True})
    option = Option(Strategy.FSDP, Offload.NONE, FsdpSharding.FULL_SHARD)
    planned = option.apply(spec)
    assert (planned.strategy, planned.fsdp_sharding, planned.num_gpus) == (Strategy.FSDP, FsdpSharding.FULL_SHARD, 4)
    assert planned.gradient_checkpointing and planned.gpu.key == "rtx4090"
    result = estimate_distributed(planned)
    # SDXL full fine-tune: 2.57B parameters do not fit one 24 GB card; sharded over four they do
    assert result.distributed.single_gpu_peak_allocated_bytes > planned.gpu.memory_bytes
    assert result.fits

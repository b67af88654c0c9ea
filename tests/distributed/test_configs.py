"""The launch files load where they are used: accelerate reads the YAML (and its launcher turns it
into the FSDP plugin vramplan counted), DeepSpeed's own config parser reads the JSON."""

import json

import pytest

from vramplan.distributed.configs import (
    accelerate_config, deepspeed_config, write_launch_files,
)
from vramplan.spec import build_spec

SPECS = {
    "ddp": {"gpus": "4xh100", "method": "lora"},
    "fsdp": {"gpus": "8xh100", "method": "full", "strategy": "fsdp", "fsdp_sharding": "shard-grad-op"},
    "fsdp-offload": {"gpus": "4xh100", "method": "full", "strategy": "fsdp", "offload": "params",
                     "precision": "bf16"},
    "zero1": {"gpus": "2xh100", "method": "full", "strategy": "zero1"},
    "zero2": {"gpus": "2x24GB", "method": "full", "model": "sdxl", "strategy": "zero2", "offload": "optimizer",
              "batch_size": 3, "gradient_accumulation_steps": 2},
    "zero3": {"gpus": "8xh100", "method": "full", "model": "flux-dev", "strategy": "zero3", "offload": "params",
              "precision": "bf16"},
}


@pytest.mark.parametrize("name", SPECS)
def test_yaml_loads_in_accelerate(name, tmp_path):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    spec = build_spec(SPECS[name])
    files = write_launch_files(spec, tmp_path)
    config = load_config_from_file(str(files[0]))
    assert isinstance(config, ClusterConfig)
    assert config.num_processes == spec.num_gpus
    assert config.mixed_precision == {"fp16": "fp16", "bf16": "bf16"}.get(spec.precision.value, "no")
    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "fsdp-offload": "FSDP"}.get(name, "DEEPSPEED")
    assert config.distributed_type.value == expected
    if expected == "DEEPSPEED":
        assert config.deepspeed_config["deepspeed_config_file"] == str((tmp_path / "deepspeed.json").resolve())
        assert len(files) == 2
    else:
        assert len(files) == 1 and not (tmp_path / "deepspeed.json").exists()


@pytest.mark.parametrize("name", ["fsdp", "fsdp-offload"])
def test_accelerate_launch_turns_the_yaml_into_the_counted_fsdp_plugin(name, tmp_path, monkeypatch):
    """`accelerate launch --config_file` -> environment -> FullyShardedDataParallelPlugin: the
    options fsdp.py's rules assume (FSDP1, sharding, BACKWARD_PRE, use_orig_params, wrap classes)."""
    import accelerate.utils.dataclasses as acc_dataclasses
    import torch
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from torch.distributed.fsdp import BackwardPrefetch, ShardingStrategy

    spec = build_spec(SPECS[name])
    yaml_path = write_launch_files(spec, tmp_path)[0]
    args = launch_command_parser().parse_args(["--config_file", str(yaml_path), "train.py"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    # sync_module_states makes the plugin look for a CUDA device; this machine has none
    monkeypatch.setattr(acc_dataclasses, "is_cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 1
    assert plugin.sharding_strategy == ShardingStrategy[spec.fsdp_sharding.torch_name]
    assert plugin.backward_prefetch == BackwardPrefetch.BACKWARD_PRE
    assert plugin.use_orig_params is True and plugin.forward_prefetch is False
    assert plugin.cpu_offload.offload_params is (spec.offload.value == "params")
    assert set(plugin.transformer_cls_names_to_wrap) == {
        "BasicTransformerBlock", "Downsample2D", "ResnetBlock2D", "Transformer2DModel", "Upsample2D"}


class _Mpu:
    def __init__(self, world):
        self.world = world

    def get_data_parallel_world_size(self):
        return self.world


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3"])
def test_json_loads_in_deepspeeds_config_parser(name, tmp_path, monkeypatch):
    ds_config = pytest.importorskip("deepspeed.runtime.config")
    monkeypatch.setattr(ds_config.dist, "get_rank", lambda *a, **k: 0)   # no process group here
    spec = build_spec(SPECS[name])
    write_launch_files(spec, tmp_path)
    path = tmp_path / "deepspeed.json"
    config = ds_config.DeepSpeedConfig(str(path), mpu=_Mpu(spec.num_gpus))
    zero = config.zero_config
    assert zero.stage == int(name[-1])
    assert config.train_batch_size == spec.batch_size * spec.gradient_accumulation_steps * spec.num_gpus
    assert config.train_micro_batch_size_per_gpu == spec.batch_size
    # the values zero.py counts with
    assert (zero.reduce_bucket_size, zero.allgather_bucket_size) == (500_000_000, 500_000_000)
    assert zero.contiguous_gradients and zero.overlap_comm is (zero.stage == 3)
    assert zero.prefetch_bucket_size == 50_000_000 and zero.param_persistence_threshold == 100_000
    assert (zero.max_live_parameters, zero.max_reuse_distance) == (1_000_000_000, 1_000_000_000)
    offload = spec.offload.value
    assert (zero.offload_optimizer is not None) is (offload in ("optimizer", "params"))
    assert (zero.offload_param is not None) is (offload == "params")
    data = json.loads(path.read_text())
    assert data["bf16"]["enabled"] is (spec.precision.value == "bf16")
    assert data["fp16"]["enabled"] is (spec.precision.value == "fp16")


def test_accelerates_deepspeed_plugin_accepts_the_json_with_the_yamls_precision(tmp_path):
    from accelerate.utils import DeepSpeedPlugin

    spec = build_spec(SPECS["zero2"])
    write_launch_files(spec, tmp_path)
    plugin = DeepSpeedPlugin(hf_ds_config=str(tmp_path / "deepspeed.json"))
    plugin.set_mixed_precision("fp16")          # raises when the JSON disagrees with the YAML
    assert plugin.zero_stage == 2


def test_a_spec_without_deepspeed_has_no_json():
    with pytest.raises(Exception, match="zero1, zero2 or zero3"):
        deepspeed_config(build_spec(SPECS["ddp"]))
    assert accelerate_config(build_spec({}))["distributed_type"] == "NO"

"""The launch files for a distributed plan: an accelerate config YAML, and DeepSpeed's JSON for zero*.

`accelerate launch --config_file accelerate.yaml train.py ...` then runs exactly what
vramplan counted: every value the accounting depends on is written out rather than left to a
default that could move (`fsdp.py`, `zero.py`, `ddp.py` name them). Keys follow the files
`accelerate config` writes (accelerate/commands/config/cluster.py, accelerate 1.x) and DeepSpeed's
config schema (deepspeed/runtime/zero/config.py, deepspeed/runtime/config.py).

The writers return text (YAML / JSON); `write_launch_files(spec, folder)` puts both in a folder.
No torch, no accelerate import: the checks that the files load live in the tests.
"""

from __future__ import annotations

import json
from pathlib import Path

from vramplan.distributed.units import wrap_classes
from vramplan.distributed.zero import ZeroConfig
from vramplan.errors import UsageError
from vramplan.spec import FsdpSharding, Offload, Precision, Strategy, TrainingSpec

DEEPSPEED_JSON = "deepspeed.json"
ACCELERATE_YAML = "accelerate.yaml"


def mixed_precision(spec: TrainingSpec) -> str:
    """accelerate's --mixed_precision for the spec: the pure 16-bit precisions are the scripts'
    own casts, not accelerate's mixed precision."""
    return {Precision.FP16: "fp16", Precision.BF16: "bf16"}.get(spec.precision, "no")


def deepspeed_config(spec: TrainingSpec, zero: ZeroConfig = ZeroConfig()) -> dict:
    if spec.strategy is None or not spec.strategy.is_deepspeed:
        raise UsageError("a DeepSpeed config needs --strategy zero1, zero2 or zero3")
    stage = {Strategy.ZERO1: 1, Strategy.ZERO2: 2, Strategy.ZERO3: 3}[spec.strategy]
    section: dict = {
        "stage": stage,
        "contiguous_gradients": zero.contiguous_gradients,
        "overlap_comm": zero.overlap_comm(stage),
        "reduce_bucket_size": zero.reduce_bucket_size,
        "allgather_bucket_size": zero.allgather_bucket_size,
    }
    if stage == 3:
        section.update({
            "stage3_prefetch_bucket_size": zero.prefetch_bucket_size,
            "stage3_param_persistence_threshold": zero.param_persistence_threshold,
            "stage3_max_live_parameters": zero.max_live_parameters,
            "stage3_max_reuse_distance": zero.max_reuse_distance,
            "sub_group_size": zero.sub_group_size,
            "stage3_gather_16bit_weights_on_model_save": True,
        })
    if spec.offload in (Offload.OPTIMIZER, Offload.PARAMS):
        section["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if spec.offload is Offload.PARAMS:
        section["offload_param"] = {"device": "cpu", "pin_memory": True}
    micro = spec.images_per_step if spec.prior_preservation else spec.batch_size
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": spec.gradient_accumulation_steps,
        "train_batch_size": micro * spec.gradient_accumulation_steps * spec.num_gpus,
        "gradient_clipping": 1.0,
        "fp16": {"enabled": spec.precision is Precision.FP16},
        "bf16": {"enabled": spec.precision is Precision.BF16},
        "zero_optimization": section,
        # torch's AdamW is on DeepSpeed's tested list; bitsandbytes' 8-bit ones, Prodigy,
        # Adafactor are not, and DeepSpeed refuses them without this
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2 ** 31 - 1,
    }


def fsdp_section(spec: TrainingSpec) -> dict:
    sharding = spec.fsdp_sharding or FsdpSharding.FULL_SHARD
    classes = sorted({name for comp in _trained_classes(spec) for name in wrap_classes(comp)})
    return {
        "fsdp_version": 1,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "fsdp_transformer_layer_cls_to_wrap": ",".join(classes),
        # FSDP1 reads the strategy from FSDP_SHARDING_STRATEGY, which `accelerate launch` sets from
        # fsdp_sharding_strategy (default FULL_SHARD) whatever fsdp_reshard_after_forward, the key
        # `accelerate config` writes now, says (accelerate/utils/launch.py): write both
        "fsdp_sharding_strategy": sharding.torch_name,
        "fsdp_reshard_after_forward": sharding.torch_name,
        "fsdp_backward_prefetch": "BACKWARD_PRE",
        "fsdp_forward_prefetch": False,
        "fsdp_use_orig_params": True,
        "fsdp_sync_module_states": True,
        "fsdp_cpu_ram_efficient_loading": False,
        "fsdp_offload_params": spec.offload is Offload.PARAMS,
        "fsdp_state_dict_type": "FULL_STATE_DICT",
        "fsdp_activation_checkpointing": False,
    }


def _trained_classes(spec: TrainingSpec) -> list[str]:
    """Classes of the components the method trains (no inventory load for the catalog's)."""
    from vramplan.methods import get_method
    from vramplan.models.inventory import load_model_inventories

    inventories = load_model_inventories(spec.model)
    return [inventories[c].cls for c in get_method(spec.method).trainable_tensors(spec, inventories)]


def accelerate_config(spec: TrainingSpec, deepspeed_file: str = DEEPSPEED_JSON) -> dict:
    """The accelerate config for the spec: one machine, `num_gpus` processes."""
    config = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "downcast_bf16": "no",
        "enable_cpu_affinity": False,
        "gpu_ids": "all",
        "machine_rank": 0,
        "main_training_function": "main",
        "mixed_precision": mixed_precision(spec),
        "num_machines": 1,
        "num_processes": spec.num_gpus,
        "rdzv_backend": "static",
        "same_network": True,
        "tpu_env": [],
        "tpu_use_cluster": False,
        "tpu_use_sudo": False,
        "use_cpu": False,
    }
    strategy = spec.strategy
    if strategy is None:
        config["distributed_type"] = "NO"
    elif strategy is Strategy.DDP:
        config["distributed_type"] = "MULTI_GPU" if spec.num_gpus > 1 else "NO"
    elif strategy is Strategy.FSDP:
        config["distributed_type"] = "FSDP"
        config["fsdp_config"] = fsdp_section(spec)
    else:
        config["distributed_type"] = "DEEPSPEED"
        config["deepspeed_config"] = {"deepspeed_config_file": deepspeed_file, "zero3_init_flag": False}
    return config


def accelerate_yaml(spec: TrainingSpec, deepspeed_file: str = DEEPSPEED_JSON) -> str:
    import yaml

    strategy = spec.strategy.value if spec.strategy else "one GPU"
    header = (f"# accelerate config for vramplan's plan: {spec.model.key} {spec.method.value}, "
              f"{spec.precision.value}, {spec.num_gpus} GPU(s), {strategy}"
              + (f", offload {spec.offload.value}" if spec.offload is not Offload.NONE else "") + "\n"
              f"# batch {spec.batch_size} per GPU x {spec.gradient_accumulation_steps} accumulation x "
              f"{spec.num_gpus} GPUs\n"
              f"# use: accelerate launch --config_file THIS.yaml ...\n")
    return header + yaml.safe_dump(accelerate_config(spec, deepspeed_file), sort_keys=True)


def deepspeed_json(spec: TrainingSpec) -> str:
    return json.dumps(deepspeed_config(spec), indent=2) + "\n"


def write_launch_files(spec: TrainingSpec, folder: str | Path) -> list[Path]:
    """accelerate.yaml (and deepspeed.json for zero*) in `folder`; the YAML names the JSON by its
    absolute path so that `accelerate launch` finds it from anywhere."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    ds_path = folder / DEEPSPEED_JSON
    if spec.strategy is not None and spec.strategy.is_deepspeed:
        ds_path.write_text(deepspeed_json(spec))
        written.append(ds_path)
    yaml_path = folder / ACCELERATE_YAML
    yaml_path.write_text(accelerate_yaml(spec, str(ds_path.resolve())))
    written.insert(0, yaml_path)
    return written

"""Host RAM per node: what the strategy keeps in CPU memory for each GPU, times the GPUs.

Counted: the tensors an offload moves to the host, per rank, as the engines allocate them:
  * DeepSpeed offload_optimizer (stage_1_and_2.py / stage3.py): the fp32 master partition and
    the fp32 gradient partition, pinned when `offload_optimizer.pin_memory` (vramplan writes
    true), and the optimizer states (DeepSpeedCPUAdam's exp_avg / exp_avg_sq, fp32, pageable);
    at stage 3 also `grad_partitions_flat_buffer` (16-bit, pinned).
  * DeepSpeed offload_param (stage 3): the 16-bit parameter partitions, pinned.
  * FSDP CPUOffload(offload_params=True) (torch/distributed/fsdp/_flat_param.py
    `_init_shard_metadata` path in `FlatParamHandle.init_flat_param_attributes`): the sharded
    flat parameter `_local_shard.pin_memory()` and `_cpu_grad`, pinned, of the shard's size; the
    optimizer states are ordinary CPU tensors.
Not counted (named in the report instead): the Python process, CUDA's host-side context, the
dataloader workers and the checkpoint a save gathers. Pinned memory is page-locked: it cannot be
swapped, so it has to fit in RAM as it stands.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HostRam:
    pinned_bytes_per_gpu: int = 0
    pageable_bytes_per_gpu: int = 0
    gpus_per_node: int = 1

    @property
    def bytes_per_gpu(self) -> int:
        return self.pinned_bytes_per_gpu + self.pageable_bytes_per_gpu

    @property
    def bytes_per_node(self) -> int:
        return self.bytes_per_gpu * self.gpus_per_node

    def to_json(self) -> dict:
        return {
            "pinned_bytes_per_gpu": self.pinned_bytes_per_gpu,
            "pageable_bytes_per_gpu": self.pageable_bytes_per_gpu,
            "bytes_per_gpu": self.bytes_per_gpu,
            "gpus_per_node": self.gpus_per_node,
            "pinned_bytes_per_node": self.pinned_bytes_per_gpu * self.gpus_per_node,
            "bytes_per_node": self.bytes_per_node,
            "counts": "offloaded tensors only (pinned buffers and CPU optimizer states); not the "
                      "Python processes, dataloader workers or checkpoint saves",
        }

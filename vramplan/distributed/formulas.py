"""The published model-state formulas vramplan is checked against, quoted as their authors wrote them.

* ZeRO paper: Rajbhandari, Rasley, Ruwase, He, "ZeRO: Memory Optimizations Toward Training
  Trillion Parameter Models" (SC 2020, arXiv:1910.02054), section 3.1 and Figure 1: mixed-precision
  Adam keeps 2Ψ bytes of fp16 parameters, 2Ψ of fp16 gradients and KΨ of optimizer state with
  K = 12 (fp32 master parameters, momentum and variance); per GPU, baseline data parallelism
  needs (2 + 2 + K)Ψ, P_os 2Ψ + 2Ψ + KΨ/N, P_os+g 2Ψ + (2 + K)Ψ/N, P_os+g+p (2 + 2 + K)Ψ/N.
* DeepSpeed's estimators, copied from deepspeed/runtime/zero/stage_1_and_2.py
  (`estimate_zero2_model_states_mem_needs`, behind `..._all_cold`) and stage3.py
  (`estimate_zero3_model_states_mem_needs`), DeepSpeed 0.19.8, so that the comparison runs
  without DeepSpeed installed; tests/distributed/test_formulas.py calls the real functions when
  it is.

What both leave out, and vramplan counts: activations (for the per-GPU batch), frozen components
(VAE, text encoders), communication buckets (DDP's Reducer, DeepSpeed's ipg bucket of
`reduce_bucket_size` elements), the unsharded working set beyond DeepSpeed's 4 x largest layer,
the CUDA context and the allocator's reserve. The differences in the model states themselves are
spelled out in the tests.
"""

from __future__ import annotations

ZERO_PAPER_K = 12


def zero_paper_bytes(psi: int, stage: int, n: int, k: int = ZERO_PAPER_K) -> float:
    """Model-state bytes per GPU, Figure 1 of the ZeRO paper (stage 0 = plain data parallelism)."""
    if stage == 0:
        return (2 + 2 + k) * psi
    if stage == 1:
        return 2 * psi + 2 * psi + k * psi / n
    if stage == 2:
        return 2 * psi + (2 + k) * psi / n
    if stage == 3:
        return (2 + 2 + k) * psi / n
    raise ValueError(stage)


def deepspeed_zero2(total_params: int, num_gpus_per_node: int = 1, num_nodes: int = 1, cpu_offload: bool = True,
                    additional_buffer_factor: float = 1.5) -> tuple[int, int]:
    """(cpu_mem, gpu_mem): deepspeed/runtime/zero/stage_1_and_2.py estimate_zero2_model_states_mem_needs."""
    total_gpus = num_nodes * num_gpus_per_node
    if cpu_offload:
        gpu_mem = 2 * total_params
        cpu_mem = total_params * max(4 * total_gpus, 16) * additional_buffer_factor
    else:
        # GPU's total_params multipliers: 2 = params_16bit,
        # 18 = 2_grads_16bit + 4_grads_32bit + 4_params_32bit + 8_optimizer_states_32bit(momentum and variance)
        gpu_mem = 2 * total_params + int(18 * total_params / total_gpus)
        cpu_mem = total_params * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu_mem), int(gpu_mem)


def deepspeed_zero3(total_params: int, largest_layer_params: int, num_gpus_per_node: int = 1, num_nodes: int = 1,
                    cpu_offload: bool = True, cpu_offload_params: bool = True, zero_init: bool = True,
                    additional_buffer_factor: float = 1.5) -> tuple[int, int, int]:
    """(cpu_mem, gpu_mem, largest_layer_memory): deepspeed/runtime/zero/stage3.py
    estimate_zero3_model_states_mem_needs."""
    total_gpus = num_nodes * num_gpus_per_node
    gpus_factor = 1 / num_nodes
    largest_layer_memory = (4 * largest_layer_params)
    if cpu_offload:
        if cpu_offload_params:
            gpu_mem = largest_layer_memory
            if zero_init:
                cpu_mem = total_params * 18 * gpus_factor * additional_buffer_factor
            else:
                cpu_mem = total_params * max(4 * num_gpus_per_node, 18 * gpus_factor) * additional_buffer_factor
        else:
            gpu_mem = largest_layer_memory + int(2 * total_params / total_gpus)
            if zero_init:
                cpu_mem = total_params * 16 * gpus_factor * additional_buffer_factor
            else:
                cpu_mem = total_params * max(4 * num_gpus_per_node, 16 * gpus_factor) * additional_buffer_factor
    else:
        gpu_mem = largest_layer_memory + int(18 * total_params / total_gpus)
        if zero_init:
            cpu_mem = largest_layer_params * 4 * num_gpus_per_node * additional_buffer_factor
        else:
            cpu_mem = total_params * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu_mem), int(gpu_mem), largest_layer_memory

"""What lies around PyTorch's tensors: CUDA context, cuBLAS workspaces, the allocator's reserve.

Measured on the first GPU campaign (profiles/h200: NVIDIA H200, driver 580.159.04, torch
2.11.0+cu130, cuDNN 9.19; scripts/gpu_campaign.sh):
  * CUDA context and loaded kernels: NVML's used memory minus the allocator's reserved, read after
    the steps (`outside_allocator_bytes`), was 770.8 to 774.8 MiB over all 34 profiles, SD 1.5 and
    SDXL, every method and precision: we take the median, 772.8 MiB. It grows as kernels load
    (lazy loading): 618.8 MiB right after CUDA initialises, 692.8 MiB after a first matrix product
    and convolution (same machine), so a figure read at start-up (426 MiB on an RTX 6000 Ada,
    unslothai/unsloth-zoo#1053; 256 MiB on an RTX 3090, invoke-ai/InvokeAI#9413) is too small
    for training. Other cards were not measured; the H200 figure is used for every card.
  * cuBLAS workspace: PyTorch allocates it through the caching allocator, one per (handle,
    stream) -- 32 MiB on compute capability 9.0 (seen: 33554432-byte blocks in the H200 traces),
    8 MiB + 128 KiB elsewhere (aten/src/ATen/cuda/CublasHandlePool.cpp
    `parseChosenWorkspaceSize`). Handles are per thread: the forward runs on the main thread,
    backward on autograd's device thread, so two.
  * cuBLASLt workspace: 1 MiB more per thread that runs a Linear with bias forward (addmm through
    cublasLt; the traces show one 1 MiB block on the main thread, and one on autograd's thread
    when checkpointing reruns forwards there).
  * cuDNN convolution workspaces: vramplan/estimate/conv_workspaces.py (a measured table).
"""

from __future__ import annotations

from vramplan.gpus import Gpu
from vramplan.units import MIB

CUDA_CONTEXT_BYTES = 810_352_640     # 772.8125 MiB: the median of profiles/h200
CUDA_CONTEXT_SOURCE = ("772.8 MiB measured beside the allocator after training steps on an H200, "
                       "torch 2.11+cu130 (median of profiles/h200, 770.8-774.8 MiB); other cards "
                       "not yet measured")
CUBLAS_THREADS = 2
CUBLASLT_WORKSPACE_BYTES = 1 * MIB


def cublas_workspace_bytes(gpu: Gpu | None) -> int:
    if gpu is not None and gpu.compute_capability == "9.0":
        return 4096 * 8 * 1024
    return 4096 * 1024 * 2 + 16 * 1024 * 8


def cuda_context_bytes(gpu: Gpu | None) -> int:
    return CUDA_CONTEXT_BYTES

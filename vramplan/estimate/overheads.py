"""What lies around PyTorch's tensors: CUDA context, cuBLAS workspaces, the allocator's reserve.

PROVISIONAL until a GPU profile measures them (`vramplan profile`, issue 4); sources in
docs/research/cuda-overheads.md:
  * CUDA context: nvidia-smi shows 256 MiB for an RTX 3090 (torch 2.7.1+cu128,
    invoke-ai/InvokeAI#9413) and 426 MiB for an RTX 6000 Ada (torch 2.10+cu130,
    unslothai/unsloth-zoo#1053) right after CUDA initialises, with lazy module loading; it grows
    as kernels load. We take the larger measured figure for every card.
  * cuBLAS workspace: PyTorch allocates it through the caching allocator, one per (handle,
    stream) -- 32 MiB on compute capability 9.0, 8 MiB + 128 KiB elsewhere
    (aten/src/ATen/cuda/CublasHandlePool.cpp `parseChosenWorkspaceSize`). Handles are per
    thread: the forward runs on the main thread, backward on autograd's device thread, so two.
"""

from __future__ import annotations

from vramplan.gpus import Gpu
from vramplan.units import MIB

CUDA_CONTEXT_BYTES = 426 * MIB
CUDA_CONTEXT_SOURCE = ("426 MiB: nvidia-smi after CUDA init, RTX 6000 Ada, torch 2.10+cu130 "
                       "(unslothai/unsloth-zoo#1053); provisional until profiled")
CUBLAS_THREADS = 2


def cublas_workspace_bytes(gpu: Gpu | None) -> int:
    if gpu is not None and gpu.compute_capability == "9.0":
        return 4096 * 8 * 1024
    return 4096 * 1024 * 2 + 16 * 1024 * 8


def cuda_context_bytes(gpu: Gpu | None) -> int:
    return CUDA_CONTEXT_BYTES

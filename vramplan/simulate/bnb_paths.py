"""Make bitsandbytes take its CUDA code paths on fake CPU tensors.

bitsandbytes picks a kernel path by the tensor's device: for an int8 layer in training,
`bitsandbytes.autograd._functions.matmul` sends CPU/XPU tensors to `MatMul8bitFp` (dequantize the
weight to fp16, then a float matmul) and CUDA tensors to `MatMul8bitLt` (quantize the input to
int8, int8 matmul, dequantize). Fake tensors live on the CPU, so while simulating we route to the
CUDA path; its ops (`int8_vectorwise_quant`, `int8_scaled_mm`...) have registered fake kernels.

For the symbolic layer templates only: `bitsandbytes::gemm_4bit` takes the weight's shape as an
`int[]`, which would specialise symbolic widths; there we stand in a function that allocates the
same output (`A.shape[:-1] + (N,)`, A's dtype) so the template stays valid for any width.
"""

from __future__ import annotations

import contextlib
import types

import torch


@contextlib.contextmanager
def cuda_bitsandbytes(symbolic: bool = False):
    try:
        import bitsandbytes
        import bitsandbytes.autograd._functions as functions
    except ImportError:
        yield
        return
    original_matmul = functions.matmul

    def matmul(A, B, out=None, state=None, threshold=0.0, bias=None):
        state = state or functions.MatmulLtState()
        if threshold > 0.0:
            state.threshold = threshold
        return functions.MatMul8bitLt.apply(A, B, out, bias, state)

    functions.matmul = matmul
    bitsandbytes.matmul = matmul
    # MatMul8bitLt warns on every call that it casts fp32 inputs to fp16; that is expected here
    import logging

    logger = logging.getLogger(functions.__name__)
    level = logger.level
    logger.setLevel(logging.ERROR)
    original_torch = functions.torch
    if symbolic:
        functions.torch = _TorchWithSymbolicGemm4bit()
    try:
        yield
    finally:
        functions.matmul = original_matmul
        bitsandbytes.matmul = original_matmul
        functions.torch = original_torch
        logger.setLevel(level)


def _gemm_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias=None, **kwargs):
    return A.new_empty((*A.shape[:-1], shapeB[0]))


class _TorchWithSymbolicGemm4bit(types.SimpleNamespace):
    """`torch`, except `torch.ops.bitsandbytes.gemm_4bit.default` (see module docstring)."""

    def __getattr__(self, name):
        if name == "ops":
            return _Ops()
        return getattr(torch, name)


class _Ops:
    def __getattr__(self, name):
        if name == "bitsandbytes":
            return _Namespace(torch.ops.bitsandbytes)
        return getattr(torch.ops, name)


class _Namespace:
    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        if name == "gemm_4bit":
            return types.SimpleNamespace(default=_gemm_4bit)
        return getattr(self._real, name)

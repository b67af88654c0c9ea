"""What the optimizer step allocates besides the states: transient buffers, per optimizer.

Read off each implementation's step (the defaults the training scripts use):
  * torch AdamW, foreach (the CUDA default): `_multi_tensor_adam` builds
    `exp_avg_sq_sqrt = torch._foreach_sqrt(device_exp_avg_sqs)` for a whole (device, dtype) group
    at once before `_foreach_addcdiv_` (torch/optim/adam.py): one transient copy of every
    exp_avg_sq of the group;
  * torch SGD, foreach: in-place updates only (`_foreach_mul_`, `_foreach_add_`);
  * bitsandbytes AdamW8bit / Lion: one fused kernel per parameter, in place;
  * transformers Adafactor: per parameter, `update = grad**2 + eps` then the factored
    approximation (`_approx_sq_grad` builds a full-size tensor) -- two float32 tensors of the
    parameter's size alive at once, one parameter at a time;
  * prodigyopt Prodigy: per parameter, `denom = exp_avg_sq.sqrt().add_(...)` -- one transient of
    the parameter's size at a time.
Gradient clipping (`clip_grad_norm_`, foreach) adds one float32 scalar per gradient tensor.
"""

from __future__ import annotations

from vramplan.spec import Optimizer


def step_transients(optimizer: Optimizer, tensors: list[tuple[int, int]]) -> list[list[int]]:
    """`tensors`: (numel, state itemsize) per trainable tensor. Returns waves of allocations: each
    wave's tensors are alive together, then freed before the next wave."""
    if not tensors:
        return []
    if optimizer is Optimizer.ADAMW:
        return [[n * size for n, size in tensors]]
    if optimizer is Optimizer.ADAFACTOR:
        return [[n * 4, n * 4] for n, _ in tensors]
    if optimizer is Optimizer.PRODIGY:
        return [[n * size] for n, size in tensors]
    return []


def clip_scalars(count: int) -> list[int]:
    """torch.nn.utils.clip_grad_norm_ (foreach): `_foreach_norm` gives one 0-dim float32 per grad."""
    return [4] * count

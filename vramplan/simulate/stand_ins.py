"""Run real optimizer libraries on fake tensors, and the few stand-ins that cannot be avoided.

Fake tensors have no values, so library code that turns a tensor into a Python number stops
with DataDependentOutputException: transformers' Adafactor compares its RMS with a float
(`_get_lr`), prodigyopt's Prodigy calls `.item()` and `p.any()`, and bitsandbytes builds its
quantization map with `.tolist()` in the optimizer's constructor. Rather than re-implement those
optimizers, we run the libraries' own `step()` under `fake_scalars()`, which answers such
questions with a fixed number (allocations never depend on the answer, except `p.any()`, which
Prodigy uses to store a one-element `p0` for all-zero parameters: we answer it per parameter),
and build bitsandbytes optimizers outside the fake mode (their 256-entry maps are real CPU
tensors). Tests compare the bytes each allocates on fake tensors with a real CPU step.

GradScaler's `step()` must know whether a gradient overflowed (`found_inf.item()`), which has
no fixed answer that works for every optimizer, so under fake tensors it is replaced by
`FakeGradScaler`, which issues the same tensor ops (torch/amp/grad_scaler.py: the scale tensor,
`_amp_foreach_non_finite_check_and_unscale_` on the gradients, `found_inf`, `inv_scale`).
"""

from __future__ import annotations

import contextlib

import torch
from torch._subclasses.fake_tensor import FakeTensor


@contextlib.contextmanager
def fake_scalars(zero_params: set | None = None):
    """`.item()` on a fake tensor returns 1.0; `bool(fake)` is True; `p.any()` is False for the
    parameters in `zero_params` (ids) and True otherwise."""
    zero_params = zero_params or set()
    original_item = torch.Tensor.item
    original_bool = torch.Tensor.__bool__
    original_any = torch.Tensor.any

    def item(self):
        if isinstance(self, FakeTensor):
            return 1 if not self.is_floating_point() and self.dtype != torch.bool else 1.0
        return original_item(self)

    def boolean(self):
        if isinstance(self, FakeTensor):
            return True
        return original_bool(self)

    def any_(self, *args, **kwargs):
        if isinstance(self, FakeTensor) and not args and not kwargs:
            return id(self) not in zero_params
        return original_any(self, *args, **kwargs)

    torch.Tensor.item = item
    torch.Tensor.__bool__ = boolean
    torch.Tensor.any = any_
    try:
        yield
    finally:
        torch.Tensor.item = original_item
        torch.Tensor.__bool__ = original_bool
        torch.Tensor.any = original_any


class FakeGradScaler:
    """GradScaler's tensor work without its data-dependent skip decision (see module docstring)."""

    def __init__(self, device: str = "cpu", init_scale: float = 2.0 ** 16):
        self._device = device
        self._init_scale = init_scale
        self._scale = None
        self._growth_tracker = None
        self._found_inf = None

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        if self._scale is None:
            # GradScaler._lazy_init_scale_growth_tracker, on the first scale()
            self._scale = torch.full((), self._init_scale, dtype=torch.float32, device=self._device)
            self._growth_tracker = torch.full((), 0, dtype=torch.int32, device=self._device)
        return loss * self._scale.to(dtype=loss.dtype)

    def unscale_(self, optimizer) -> None:
        inv_scale = self._scale.double().reciprocal().float()
        found_inf = torch.full((), 0.0, dtype=torch.float32, device=self._scale.device)
        # `_MultiDeviceReplicator.get(device)` copies both per device (`.to(device, copy=True)`)
        device = self._scale.device
        inv_scale_here = inv_scale.to(device=device, copy=True)
        found_inf_here = found_inf.to(device=device, copy=True)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        by_dtype: dict = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for same in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(same, found_inf_here, inv_scale_here)
        self._found_inf = found_inf_here   # kept in the optimizer's state until update()

    def step(self, optimizer) -> None:
        optimizer.step()

    def update(self) -> None:
        self._found_inf = None

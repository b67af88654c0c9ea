"""Optimizer state: the tensors each optimizer allocates at its first step, counted exactly.

Every rule below is read off the library's own state initialisation (file and function named next
to it) and tested against a real `optimizer.step()` on CPU (`tests/estimate/test_optimizer.py`),
summing every tensor in `optimizer.state` with shared storages counted once. Rules are per parameter
tensor, not per element, because several optimizers decide per tensor: bitsandbytes keeps 32-bit
states below `min_8bit_size` elements, Adafactor factors only tensors of two or more dimensions,
torch keeps one `step` scalar per tensor. `optimizer_state_tensors` lists what is allocated, so that
a caller can round each allocation the way the CUDA caching allocator does (512 bytes).

No torch import: this is the analytic tier.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from math import prod
from typing import Callable, Sequence

from vramplan.errors import UsageError
from vramplan.spec import Optimizer

# bitsandbytes `Optimizer2State.__init__` / `Optimizer1State.__init__`: min_8bit_size=4096, and the
# 8-bit states are quantised blockwise in blocks of 256 (`init_state`: `blocksize = 256`).
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCKSIZE = 256
BNB_QMAP_LEN = 256  # bitsandbytes.functional.create_dynamic_map(): 256 float32 code values


@dataclass(frozen=True)
class StateTensor:
    """One tensor an optimizer keeps for one parameter (or, with `shared`, for all of them)."""

    name: str
    numel: int
    itemsize: int
    on_host: bool = False   # in CPU memory even when the parameters are on the GPU
    shared: bool = False    # one tensor for the whole optimizer, not one per parameter

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


def _numel(shape: tuple) -> int:
    return prod(int(d) for d in shape)  # prod(()) == 1: a 0-dim parameter holds one element


# ---- one rule per optimizer: (shape, param_bytes, momentum, all_zero) -> state tensors ----------

def _adamw(shape, param_bytes, momentum, all_zero):
    # torch/optim/adam.py `Adam._init_group` (AdamW subclasses Adam): exp_avg and exp_avg_sq are
    # `torch.zeros_like(p)` (the parameter's dtype); `step` is `torch.tensor(0.0,
    # dtype=_get_scalar_dtype(), device="cpu")` -- a float32 scalar on the CPU unless `capturable`
    # or `fused` (then on the parameter's device). amsgrad (off by default) would add max_exp_avg_sq.
    n = _numel(shape)
    return [StateTensor("exp_avg", n, param_bytes), StateTensor("exp_avg_sq", n, param_bytes),
            StateTensor("step", 1, 4, on_host=True)]


def _bnb_8bit_states(shape, names):
    # bitsandbytes/optim/optimizer.py `Optimizer2State.init_state` / `Optimizer1State.init_state`:
    # below min_8bit_size elements the states are float32 (`get_state_buffer(p, torch.float32)`),
    # whatever the parameter's dtype; otherwise uint8 states plus one float32 absmax per block of 256.
    # `step` is a Python int. The qmaps are shared (see `_bnb_qmaps`).
    n = _numel(shape)
    if n < BNB_MIN_8BIT_SIZE:
        return [StateTensor(state, n, 4) for state, _ in names]
    blocks = n // BNB_BLOCKSIZE + bool(n % BNB_BLOCKSIZE)
    out = []
    for state, absmax in names:
        out += [StateTensor(state, n, 1), StateTensor(absmax, blocks, 4)]
    return out


def _adamw8bit(shape, param_bytes, momentum, all_zero):
    # bitsandbytes/optim/adamw.py `AdamW8bit` -> `Optimizer2State("adam", ..., optim_bits=8)`.
    return _bnb_8bit_states(shape, [("state1", "absmax1"), ("state2", "absmax2")])


def _bnb_qmaps(shapes):
    # `Optimizer2State.init_state`: `state["qmap1"] = self.name2qmap["dynamic"]` and qmap2 =
    # name2qmap["udynamic"] -- one 256-entry float32 map each, created once by `fill_qmap()` and
    # moved to the parameters' device; every 8-bit parameter's state points at the same tensor.
    if any(_numel(s) >= BNB_MIN_8BIT_SIZE for s in shapes):
        return [StateTensor("qmap1", BNB_QMAP_LEN, 4, shared=True),
                StateTensor("qmap2", BNB_QMAP_LEN, 4, shared=True)]
    return []


def _adafactor(shape, param_bytes, momentum, all_zero):
    # transformers/optimization.py `Adafactor.step`: the gradient is cast to float32 when it is
    # fp16/bf16 and every state is created `.to(grad)`, so states are float32 for 16-bit params.
    # `_get_options`: factored when `len(shape) >= 2` -> exp_avg_sq_row of shape[:-1] and
    # exp_avg_sq_col of shape[:-2] + shape[-1:]; else a full exp_avg_sq. exp_avg only when beta1 is
    # set (None by default, as the diffusers / kohya scripts leave it). `state["RMS"] =
    # self._rms(p)` is a 0-dim float32 tensor on the parameter's device; `step` is a Python int.
    itemsize = max(param_bytes, 4)
    if len(shape) >= 2:
        states = [StateTensor("exp_avg_sq_row", _numel(shape[:-1]), itemsize),
                  StateTensor("exp_avg_sq_col", _numel(shape[:-2] + shape[-1:]), itemsize)]
    else:
        states = [StateTensor("exp_avg_sq", _numel(shape), itemsize)]
    return states + [StateTensor("RMS", 1, itemsize)]


def _lion(shape, param_bytes, momentum, all_zero):
    # "lion" is bitsandbytes.optim.Lion (the choice of library; kohya sd-scripts also offers
    # it as `Lion8bit`/`PagedLion`): Optimizer1State with optim_bits=32, whose `init_state` makes
    # `state1 = torch.zeros_like(p, dtype=torch.float32)` -- float32 whatever the parameter's
    # dtype -- and keeps `step` as a Python int.
    return [StateTensor("state1", _numel(shape), 4)]


def _prodigy(shape, param_bytes, momentum, all_zero):
    # prodigyopt/prodigy.py `Prodigy.step`, defaults (betas=(0.9, 0.999), slice_p=1):
    # s = zeros_like(p.flatten()[::slice_p]); p0 = p.flatten()[::slice_p].clone() -- but when
    # `p.any()` is false (an all-zero parameter, e.g. peft's zero-initialised lora_B) p0 is
    # `torch.tensor(0, dtype=p.dtype)`, one element; exp_avg (beta1 > 0) and exp_avg_sq are
    # zeros_like(p). All in the parameter's dtype; `step` is a Python int.
    n = _numel(shape)
    return [StateTensor("s", n, param_bytes), StateTensor("p0", 1 if all_zero else n, param_bytes),
            StateTensor("exp_avg", n, param_bytes), StateTensor("exp_avg_sq", n, param_bytes)]


def _sgd(shape, param_bytes, momentum, all_zero):
    # torch/optim/sgd.py `SGD.step` / `_single_tensor_sgd`: with momentum != 0 the first step stores
    # `momentum_buffer = grad.detach().clone()` (the gradient's dtype, i.e. the parameter's); with
    # momentum 0 nothing is stored.
    return [StateTensor("momentum_buffer", _numel(shape), param_bytes)] if momentum else []


@dataclass(frozen=True)
class _Rule:
    per_param: Callable
    shared: Callable = lambda shapes: []


RULES: dict[Optimizer, _Rule] = {
    Optimizer.ADAMW: _Rule(_adamw),
    Optimizer.ADAMW8BIT: _Rule(_adamw8bit, _bnb_qmaps),
    Optimizer.ADAFACTOR: _Rule(_adafactor),
    Optimizer.LION: _Rule(_lion),
    Optimizer.PRODIGY: _Rule(_prodigy),
    Optimizer.SGD: _Rule(_sgd),
}


def optimizer_state_tensors(optimizer: Optimizer, param_shapes: Sequence[tuple], param_bytes: int,
                            momentum: float | None = None, *,
                            zero_params: Sequence[bool] | None = None) -> list[StateTensor]:
    """Every state tensor `optimizer` holds after its first step over parameters of these shapes.

    `param_bytes` is the trainable parameters' element size (4 for float32, 2 for fp16/bf16).
    `momentum` is SGD's (None or 0: plain SGD, no state). `zero_params`, parallel to
    `param_shapes`, marks parameters that are all zeros at the first step (only Prodigy cares).
    """
    if param_bytes not in (2, 4, 8):
        raise UsageError(f"parameter element size {param_bytes} bytes is not 2, 4 or 8")
    shapes = [tuple(int(d) for d in s) for s in param_shapes]
    zeros = list(zero_params) if zero_params is not None else [False] * len(shapes)
    if len(zeros) != len(shapes):
        raise ValueError("zero_params must have one entry per parameter shape")
    out: list[StateTensor] = []
    for shape, all_zero in zip(shapes, zeros):
        out += _per_param(optimizer, shape, param_bytes, momentum, all_zero)
    return out + RULES[optimizer].shared(shapes)


@lru_cache(maxsize=8192)
def _per_param(optimizer: Optimizer, shape: tuple, param_bytes: int, momentum, all_zero: bool) -> tuple:
    """One parameter's states, kept: a model has a few hundred distinct shapes among thousands of
    adapted tensors, and fit asks again for every optimizer and rank it tries (StateTensor is frozen,
    so the tensors are shared safely)."""
    return tuple(RULES[optimizer].per_param(shape, param_bytes, momentum, all_zero))


def optimizer_state_bytes(optimizer: Optimizer, param_shapes: Sequence[tuple], param_bytes: int,
                          momentum: float | None = None, *, zero_params: Sequence[bool] | None = None,
                          device_only: bool = False) -> int:
    """Bytes of `optimizer_state_tensors`; `device_only` leaves out what torch keeps on the CPU."""
    return sum(t.nbytes for t in optimizer_state_tensors(optimizer, param_shapes, param_bytes, momentum,
                                                         zero_params=zero_params)
               if not (device_only and t.on_host))

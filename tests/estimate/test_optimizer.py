"""optimizer_state_bytes against the real optimizers' state after one real step on CPU.

Every tensor reachable from `optimizer.state` is summed by its untyped storage, each storage once
(bitsandbytes shares its quantisation maps between parameters), and must equal the prediction
exactly. Shapes cover a 1-D bias, a small 2-D weight (< 4096 elements: bitsandbytes keeps 32-bit
states), a large 2-D weight (> 4096, not a multiple of 256), a 4-D conv kernel and a 0-dim scalar.
"""

import pytest
import torch

from vramplan.estimate.optimizer import optimizer_state_bytes, optimizer_state_tensors
from vramplan.spec import Optimizer

SHAPES = [(77,), (24, 40), (96, 131), (32, 16, 3, 3), ()]
DTYPES = {4: torch.float32, 2: torch.bfloat16}


def make_params(dtype, zero=()):
    torch.manual_seed(0)
    params = []
    for i, shape in enumerate(SHAPES):
        p = torch.zeros(shape, dtype=dtype) if i in zero else torch.randn(shape, dtype=dtype)
        params.append(torch.nn.Parameter(p))
    return params


def step_once(optimizer):
    for p in optimizer.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    optimizer.step()


def state_bytes(optimizer) -> int:
    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                storage = value.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
    return total


def predicted(optimizer, param_bytes, **kwargs):
    return optimizer_state_bytes(optimizer, SHAPES, param_bytes, **kwargs)


@pytest.mark.parametrize("param_bytes", [4, 2])
def test_adamw(param_bytes):
    params = make_params(DTYPES[param_bytes])
    opt = torch.optim.AdamW(params, lr=1e-3)
    step_once(opt)
    assert state_bytes(opt) == predicted(Optimizer.ADAMW, param_bytes)
    # the float32 `step` scalars live on the CPU, not with the parameters
    host = sum(t.nbytes for t in optimizer_state_tensors(Optimizer.ADAMW, SHAPES, param_bytes) if t.on_host)
    assert host == 4 * len(SHAPES)
    assert predicted(Optimizer.ADAMW, param_bytes, device_only=True) == state_bytes(opt) - host


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("param_bytes", [4, 2])
def test_sgd(param_bytes, momentum):
    params = make_params(DTYPES[param_bytes])
    opt = torch.optim.SGD(params, lr=1e-3, momentum=momentum)
    step_once(opt)
    assert state_bytes(opt) == predicted(Optimizer.SGD, param_bytes, momentum=momentum)


@pytest.mark.parametrize("param_bytes", [4, 2])
def test_adafactor(param_bytes):
    from transformers.optimization import Adafactor

    params = make_params(DTYPES[param_bytes])
    # the diffusers / kohya defaults: relative step, scale_parameter, no warmup_init, beta1=None
    opt = Adafactor(params, lr=None, scale_parameter=True, relative_step=True, warmup_init=False)
    step_once(opt)
    assert state_bytes(opt) == predicted(Optimizer.ADAFACTOR, param_bytes)


@pytest.mark.parametrize("param_bytes", [4, 2])
def test_prodigy(param_bytes):
    prodigyopt = pytest.importorskip("prodigyopt")
    zero = {1, 3}  # like peft's zero-initialised lora_B: Prodigy keeps a 1-element p0 for them
    params = make_params(DTYPES[param_bytes], zero=zero)
    opt = prodigyopt.Prodigy(params, lr=1.0)
    step_once(opt)
    zero_params = [i in zero for i in range(len(SHAPES))]
    assert state_bytes(opt) == predicted(Optimizer.PRODIGY, param_bytes, zero_params=zero_params)
    assert state_bytes(opt) < predicted(Optimizer.PRODIGY, param_bytes)


@pytest.mark.parametrize("param_bytes", [4, 2])
def test_adamw8bit(param_bytes):
    bnb = pytest.importorskip("bitsandbytes")
    params = make_params(DTYPES[param_bytes])
    opt = bnb.optim.AdamW8bit(params, lr=1e-3)
    step_once(opt)
    assert state_bytes(opt) == predicted(Optimizer.ADAMW8BIT, param_bytes)
    tensors = optimizer_state_tensors(Optimizer.ADAMW8BIT, [(4096, 4096)], param_bytes)
    # NOTES.md: 2 x 16 Mi uint8 + 2 x 64 Ki float32 absmax + the two shared 256-entry maps
    assert sum(t.nbytes for t in tensors) == 2 * 4096 * 4096 + 2 * 4 * 65536 + 2 * 1024


def test_adamw8bit_without_large_params_has_no_qmaps():
    bnb = pytest.importorskip("bitsandbytes")
    small = [(77,), (24, 40)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in small]
    opt = bnb.optim.AdamW8bit(params, lr=1e-3)
    step_once(opt)
    assert state_bytes(opt) == optimizer_state_bytes(Optimizer.ADAMW8BIT, small, 4) == 2 * 4 * (77 + 960)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lion_bitsandbytes(dtype):
    # "lion" is bitsandbytes' 32-bit Lion: one float32 state whatever the parameter dtype.
    bnb = pytest.importorskip("bitsandbytes")
    params = make_params(dtype)
    opt = bnb.optim.Lion(params, lr=1e-4)
    step_once(opt)
    assert state_bytes(opt) == predicted(Optimizer.LION, 2 if dtype == torch.bfloat16 else 4)


def test_every_optimizer_has_a_rule():
    for optimizer in Optimizer:
        assert optimizer_state_bytes(optimizer, SHAPES, 4, momentum=0.9) >= 0

"""Where a library cannot run on fake tensors as it is, what stands in allocates what it does.

Optimizers run their own library code on fake tensors (vramplan/simulate/stand_ins.py answers
their data-dependent questions); bitsandbytes' quantized weights are plain Parameters carrying
bitsandbytes' own tensors; GradScaler is replaced by FakeGradScaler. Each is compared with the
real library on real CPU tensors.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from vramplan.simulate.stand_ins import FakeGradScaler
from vramplan.simulate.tracker import MemoryTracker
from vramplan.spec import build_spec
from vramplan.step.optimizers import build_optimizer

SHAPES = [(4096, 8), (300,), (16, 8, 3, 3), (33, 77)]


def state_bytes(optimizer) -> int:
    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                key = id(value.untyped_storage())
                if key not in seen:
                    seen.add(key)
                    total += value.untyped_storage().nbytes()
    return total


def run(optimizer_name: str, device: str, dtype=torch.float32, zero_last=False):
    spec = build_spec({"method": "full", "optimizer": optimizer_name,
                       **({"momentum": 0.9} if optimizer_name == "sgd" else {})})
    mode = FakeTensorMode() if device == "fake" else None
    ctx = mode if mode is not None else torch.device("cpu")
    with ctx:
        params = [torch.nn.Parameter(torch.randn(s, dtype=dtype) if device != "fake" else torch.empty(s, dtype=dtype))
                  for s in SHAPES]
        if zero_last:
            if device == "fake":
                params[-1]._vramplan_zero_init = True
            else:
                params[-1].data.zero_()
    optimizer = build_optimizer(spec, params, device, mode)
    tracker = MemoryTracker()
    with (mode if mode is not None else torch.device("cpu")):
        for p in params:
            p.grad = torch.randn_like(p) if device != "fake" else torch.empty_like(p)
        with tracker:
            optimizer.step()
            optimizer.step()
    return state_bytes(optimizer), tracker.peak


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "lion", "adafactor", "prodigy", "sgd"])
def test_optimizer_on_fake_tensors_allocates_what_it_does_on_real_ones(name):
    real_states, real_peak = run(name, "cpu")
    fake_states, fake_peak = run(name, "fake")
    assert fake_states == real_states
    assert fake_peak == real_peak


def test_prodigy_keeps_one_element_p0_for_zero_parameters_in_both():
    real_states, _ = run("prodigy", "cpu", zero_last=True)
    fake_states, _ = run("prodigy", "fake", zero_last=True)
    assert fake_states == real_states
    assert fake_states < run("prodigy", "cpu")[0]


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_fake_quantized_weight_holds_what_bitsandbytes_holds(quant):
    bnb = pytest.importorskip("bitsandbytes")
    from vramplan.spec import BaseQuant
    from vramplan.step.quantize import fake_quantized_weight, quant_tensors, quantize_linears

    def nbytes(weight):
        storages = {id(weight.untyped_storage()): weight.untyped_storage().nbytes()}
        for t in quant_tensors(weight).values():
            storages[id(t.untyped_storage())] = t.untyped_storage().nbytes()
        return sum(storages.values())

    real = torch.nn.Sequential(torch.nn.Linear(64, 48))
    quantize_linears(real, BaseQuant(quant), torch.float16, "cpu")
    with FakeTensorMode():
        fake = fake_quantized_weight(real[0], torch.float16)
        fake_bytes = nbytes(fake)
    assert fake_bytes == nbytes(real[0].weight)


def test_fake_grad_scaler_allocates_what_grad_scaler_does():
    def scaler_run(make, device):
        mode = FakeTensorMode() if device == "fake" else None
        tracker = MemoryTracker()
        with (mode if mode else torch.device("cpu")):
            params = [torch.nn.Parameter(torch.ones(64, 16)), torch.nn.Parameter(torch.ones(16))]
            optimizer = torch.optim.SGD(params, lr=0.1)
            scaler = make()
            with tracker:
                loss = (params[0].sum() + params[1].sum())
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                scaler.step(optimizer)
                scaler.update()
        return tracker.peak

    real = scaler_run(lambda: torch.amp.GradScaler("cpu"), "cpu")
    fake = scaler_run(lambda: FakeGradScaler("cpu"), "fake")
    assert fake == real

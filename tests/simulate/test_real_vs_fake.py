"""The fake trace is the real run: the same step on real CPU tensors, measured by the same
tracker, reaches exactly the peak the fake-tensor simulation reports."""

import pytest
import torch

from vramplan.simulate.autocast_policy import cuda_autocast_policy
from vramplan.simulate.bnb_paths import cuda_bitsandbytes
from vramplan.simulate.run import _records, simulate, trace_step
from vramplan.spec import build_spec
from vramplan.step.build import build_step
from vramplan.timeline import analyse


def real_peak(spec):
    torch.manual_seed(0)
    with cuda_autocast_policy(), cuda_bitsandbytes():
        step = build_step(spec, "cpu")
        tracker = trace_step(step, 2)
    records, phases = _records(tracker)
    return analyse(records, phases), records


def loss_at(records, event) -> int:
    """Bytes of loss tensors live at `event`. CPU's mse_loss kernel returns its 0-dim mean in a
    storage of more than 512 bytes; the meta kernel fake tensors use allocates exactly 4."""
    return sum(r.nbytes for r in records if r.op == "mse_loss" and r.alloc_at <= event
               and (r.free_at is None or r.free_at > event))


@pytest.mark.parametrize("options", [
    {"method": "lora", "rank": 4, "precision": "fp32"},
    {"method": "lora", "rank": 4, "precision": "bf16", "batch_size": 2},
    {"method": "full", "precision": "fp32", "gradient_checkpointing": True},
    {"method": "textual-inversion", "precision": "bf16"},
])
def test_real_cpu_tensors_reach_the_fake_peak(tiny_pipeline, options):
    spec = build_spec({"model": str(tiny_pipeline / "model"), "resolution": 64, **options})
    real, real_records = real_peak(spec)
    fake = simulate(spec)
    # the tracker sees every storage of both runs; the footprint adds workspaces to the fake one
    fake_records = [r for r in fake.records if r.category.value != "workspaces"]
    fake_peak = analyse(fake_records, fake.phases)
    # the only difference allowed is the loss scalar's storage, alive through backward
    kernel_difference = loss_at(real_records, real.peak_event) - loss_at(fake_records, fake_peak.peak_event)
    assert real.peak_bytes == fake_peak.peak_bytes + kernel_difference
    assert real.peak_phase == fake_peak.peak_phase

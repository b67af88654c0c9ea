"""The CUDA measurement's bookkeeping, on a stand-in for torch.cuda and the step (no GPU here):
phases split at the hook's boundaries, totals over the steps only, the context from NVML, an
out-of-memory recorded where it struck. The real thing runs in scripts/gpu_campaign.sh."""

from types import SimpleNamespace

import pytest
import torch

import vramplan.profile.measure as measure
import vramplan.step.build
from vramplan.errors import UsageError
from vramplan.profile.measure import catalog_key_for, check_steps, started_with_malloc_setting
from vramplan.profile.nvml import NvmlMemory
from vramplan.spec import build_spec

MIB = 2**20
CONTEXT = 500 * MIB
TOTAL = 81559 * MIB


class FakeAllocator:
    """torch.cuda's counters: allocated, reserved (grows in 2 MiB steps, never shrinks until
    empty_cache), the peaks since the last reset."""

    def __init__(self):
        self.allocated = self.reserved = self.peak_allocated = self.peak_reserved = 0
        self.context = False

    def alloc(self, n):
        self.allocated += n
        while self.reserved < self.allocated:
            self.reserved += 2 * MIB
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def free(self, n):
        self.allocated -= n

    def reset(self):
        self.peak_allocated, self.peak_reserved = self.allocated, self.reserved

    def empty_cache(self):
        self.reserved = -(-self.allocated // (2 * MIB)) * 2 * MIB


class FakeNvml:
    def __init__(self, allocator):
        self.allocator, self.handle = allocator, object()

    def used(self):
        a = self.allocator
        return (CONTEXT if a.context else 0) + a.reserved

    def memory(self):
        return NvmlMemory(TOTAL, self.used(), 479 * MIB)

    def name(self):
        return "NVIDIA H100 80GB HBM3"

    def driver(self):
        return "580.159.04"

    def match_uuid(self, uuid):
        return False


class FakeStep:
    """Weights of 1 GiB; each step: batch 10 MiB, forward saves 300 MiB, backward frees them and
    makes 100 MiB of gradients, the optimizer keeps 200 MiB of state from the first step on."""

    def __init__(self, allocator, oom_at=None):
        self.a, self.oom_at = allocator, oom_at
        self.models, self.trainable, self.ema = {}, [], None
        self.spec = build_spec({"method": "lora"})
        self.a.alloc(2048 * MIB)      # random init in fp32 ...
        self.a.free(1024 * MIB)       # ... cast to fp16
        self.states = False

    def make_batch(self):
        self.a.alloc(10 * MIB)
        return "batch"

    def run_step(self, batch, hook):
        a = self.a
        hook("encode")
        hook("forward")
        if self.oom_at == "forward":
            a.alloc(60_000 * MIB)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 30.00 GiB\nmore")
        a.alloc(300 * MIB)
        hook("backward")
        a.free(300 * MIB)
        a.alloc(100 * MIB)
        hook("optimizer")
        if not self.states:
            a.alloc(200 * MIB)
            self.states = True
        a.alloc(50 * MIB)             # the optimizer's transient
        a.free(50 * MIB)
        a.free(100 * MIB)             # zero_grad(set_to_none=True)
        a.free(10 * MIB)              # the batch


@pytest.fixture
def fake_cuda(monkeypatch):
    a = FakeAllocator()
    cuda = torch.cuda

    def init():
        a.context = True

    props = SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=TOTAL - 700 * MIB, major=9, minor=0,
                            uuid="GPU-1234")
    for name, fn in {
        "is_available": lambda: True, "is_initialized": lambda: a.context, "init": init,
        "get_device_properties": lambda index=0: props, "synchronize": lambda: None,
        "memory_allocated": lambda: a.allocated, "memory_reserved": lambda: a.reserved,
        "max_memory_allocated": lambda: a.peak_allocated, "max_memory_reserved": lambda: a.peak_reserved,
        "reset_peak_memory_stats": a.reset, "empty_cache": a.empty_cache,
    }.items():
        monkeypatch.setattr(cuda, name, fn)
    real_empty = torch.empty

    def empty(*size, device=None, **kwargs):
        if device == "cuda":
            a.reserved = max(a.reserved, 2 * MIB)   # a one-element tensor: a small segment
            return SimpleNamespace()
        return real_empty(*size, device=device, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(measure, "_measured_gpu",
                        lambda props, nvml: measure.MeasuredGpu(nvml.name(), TOTAL, "9.0",
                                                                catalog_key_for(nvml.name(), TOTAL)))
    import vramplan.profile.nvml

    monkeypatch.setattr(vramplan.profile.nvml.Nvml, "open", classmethod(lambda cls, index=None: FakeNvml(a)))
    return a


def test_phases_totals_and_context(fake_cuda, monkeypatch):
    monkeypatch.setattr(vramplan.step.build, "build_step", lambda spec, device: FakeStep(fake_cuda))
    spec = build_spec({"method": "lora"})
    profile = measure.measure_cuda(spec, steps=3)

    assert profile.fits and profile.device == "cuda" and profile.steps == 3
    assert profile.gpu.catalog_key == "h100" and profile.gpu_key == "h100"
    assert profile.capacity_bytes == TOTAL
    # NVML after the probe, minus before, minus the 2 MiB segment the probe sits in
    assert profile.cuda_context_bytes == CONTEXT
    names = [p.phase for p in profile.phases]
    assert names == ["load", "encode", "forward", "backward", "optimizer",
                     "step 2 encode", "step 2 forward", "step 2 backward", "step 2 optimizer",
                     "step 3 encode", "step 3 forward", "step 3 backward", "step 3 optimizer"]
    peaks = {p.phase: p.peak_allocated_bytes for p in profile.phases}
    weights = 1024 * MIB
    assert peaks["load"] == 2048 * MIB                       # the fp32 random init, kept apart
    assert peaks["forward"] == weights + 10 * MIB + 300 * MIB
    assert peaks["step 2 forward"] == weights + 200 * MIB + 10 * MIB + 300 * MIB
    assert peaks["step 2 optimizer"] == weights + 200 * MIB + 10 * MIB + 100 * MIB + 50 * MIB
    # totals: the highest over the steps, never the load's random-initialisation peak
    assert profile.peak_allocated_bytes == weights + 510 * MIB
    assert profile.peak_reserved_bytes == max(p.peak_reserved_bytes for p in profile.phases[1:])
    assert profile.device_used_bytes == CONTEXT + profile.peak_reserved_bytes
    assert profile.steady_allocated_bytes == weights + 200 * MIB
    assert profile.outside_allocator_bytes == CONTEXT
    assert len(profile.step_seconds) == 3 and profile.oom_phase is None
    assert profile.environment["driver"] == "580.159.04"


def test_out_of_memory_is_a_measurement(fake_cuda, monkeypatch):
    monkeypatch.setattr(vramplan.step.build, "build_step",
                        lambda spec, device: FakeStep(fake_cuda, oom_at="forward"))
    profile = measure.measure_cuda(build_spec({"method": "lora"}), steps=3)
    assert not profile.fits
    assert profile.oom_phase == "forward"
    assert profile.oom_message == "CUDA out of memory. Tried to allocate 30.00 GiB"
    assert profile.capacity_bytes == TOTAL and profile.steps == 0
    assert profile.phases[-1].phase == "forward"
    assert profile.peak_allocated_bytes == 1024 * MIB + 10 * MIB + 60_000 * MIB
    assert profile.steady_allocated_bytes is None


def test_other_errors_are_not_swallowed(fake_cuda, monkeypatch):
    def broken(spec, device):
        raise RuntimeError("a bug")

    monkeypatch.setattr(vramplan.step.build, "build_step", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        measure.measure_cuda(build_spec({"method": "lora"}), steps=2)


@pytest.mark.parametrize("name, mib, key", [
    ("NVIDIA H100 80GB HBM3", 81559, "h100"),
    ("NVIDIA H200", 143771, "h200"),
    ("NVIDIA A100-SXM4-40GB", 40960, "a100-40g"),
    ("NVIDIA A100-SXM4-80GB", 81920, "a100-80g"),
    ("NVIDIA L4", 23034, "l4"),
    ("NVIDIA L40S", 46068, "l40s"),
    ("NVIDIA GeForce RTX 4090", 24564, "rtx4090"),
    ("NVIDIA GeForce RTX 4090", 24000, None),        # a total the catalog does not list
    ("NVIDIA GeForce RTX 5090", 32607, None),
])
def test_catalog_key_for(name, mib, key):
    assert catalog_key_for(name, mib * MIB) == key


def test_steps_and_devices_are_checked():
    with pytest.raises(UsageError, match="at least 2"):
        check_steps(1)
    with pytest.raises(UsageError, match="--device"):
        measure.profile(build_spec({"method": "lora"}), device="tpu")


def test_this_process_did_not_start_with_the_malloc_setting(monkeypatch):
    # setting it now changes nothing for glibc, and the check knows it
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert not started_with_malloc_setting()


class _Pynvml:
    """NVML as pynvml is: every lookup returns a new handle object, even for the same device."""

    def __init__(self, uuids):
        self.uuids = uuids

    def nvmlDeviceGetCount(self):
        return len(self.uuids)

    def nvmlDeviceGetHandleByIndex(self, i):
        return SimpleNamespace(index=i)

    def nvmlDeviceGetUUID(self, handle):
        return self.uuids[handle.index].encode()


def test_match_uuid_tells_another_device_from_a_new_handle_of_the_same():
    from vramplan.profile.nvml import Nvml

    lib = _Pynvml(["GPU-aaaa", "GPU-bbbb"])
    nvml = Nvml(lib, lib.nvmlDeviceGetHandleByIndex(0))
    # the first campaign lost every context figure to this: same device, new handle object
    assert nvml.match_uuid("GPU-aaaa") is False and nvml.handle.index == 0
    assert nvml.match_uuid("gpu-BBBB") is True and nvml.handle.index == 1
    assert nvml.match_uuid("GPU-cccc") is False and nvml.handle.index == 1   # not found: unchanged
    assert nvml.match_uuid("") is False

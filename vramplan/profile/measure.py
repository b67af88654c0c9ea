"""Measure the spec's real training step: `profile(spec, device, steps)` -> `Profile`.

The step is `vramplan.step.build.build_step(spec, device)` -- the one simulate traces and train
runs -- with random weights built from the configs (memory does not depend on their values).

CUDA: the context is measured first (NVML used after CUDA initialises and holds a one-element
tensor, minus before, minus what the allocator reserved for that tensor). The model is built,
its weights placed again in load order (see `place_like_a_checkpoint`), then `steps` steps run;
at each phase boundary the hook synchronises, reads `max_memory_allocated` /
`max_memory_reserved` and NVML's used memory for the phase that ends, and resets the peaks. The
totals are the highest over the steps' phases. `torch.cuda.OutOfMemoryError` is a measurement:
"does not fit", in the phase it struck, with the card's capacity.

CPU: the same real step on CPU tensors, under CUDA's autocast policy (so the dtypes are those a
CUDA run has), measured by the simulate tier's `MemoryTracker` through `trace_step`, plus the
process's peak RSS growth. glibc keeps freed heap blocks below a dynamic threshold, which puts
RSS well above the live bytes (NOTES.md: 2.23 vs 1.96 GiB); `MALLOC_MMAP_THRESHOLD_=65536` stops
that, but glibc reads it only when the process starts, so a process started without it measures
in a child started with it (`python -m vramplan.profile.worker`).
"""

from __future__ import annotations

import gc
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from vramplan.profile.rss import reset_peak_rss, status_bytes
from vramplan.errors import UsageError
from vramplan.gpus import CATALOG
from vramplan.profile.result import MeasuredGpu, PhaseMeasure, Profile, slugify
from vramplan.spec import BaseQuant, TrainingSpec

Progress = Callable[[str], None]
DEVICES = ("cuda", "cpu")
DEFAULT_STEPS = 3   # the second step is the first with optimizer state; the third shows it is steady
MALLOC_SETTING = ("MALLOC_MMAP_THRESHOLD_", "65536")
PROGRESS_PREFIX = "vramplan-progress: "
PACKAGES = ("torch", "diffusers", "peft", "transformers", "accelerate", "bitsandbytes",
            "nvidia-ml-py", "vramplan")
ALLOCATOR_VARIABLES = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF", "CUDA_MODULE_LOADING",
                       "CUBLAS_WORKSPACE_CONFIG", "CUBLASLT_WORKSPACE_SIZE", "MALLOC_MMAP_THRESHOLD_")


def profile(spec: TrainingSpec, device: str = "cuda", steps: int = DEFAULT_STEPS,
            progress: Progress | None = None) -> Profile:
    say = progress or (lambda message: None)
    check_steps(steps)
    if device == "cuda":
        require_cuda()
        return measure_cuda(spec, steps, say)
    if device == "cpu":
        if started_with_malloc_setting():
            return measure_cpu(spec, steps, say)
        return measure_cpu_in_child(spec, steps, say)
    raise UsageError(f"--device: {device!r} is not one of {', '.join(DEVICES)}")


def check_steps(steps: int) -> None:
    if steps < 2:
        raise UsageError(f"--steps: {steps} is too few: the second step is the first that runs "
                         f"with optimizer state (at least 2)")


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise UsageError("--device cuda: this machine has no CUDA device "
                         "(torch.cuda.is_available() is False); --device cpu measures the same "
                         "step on the CPU")


def store_folder(device: str) -> str | None:
    """The profile store's folder for this machine's card ("cpu" on the CPU), known before
    measuring so that a stored case is found first; None where NVML cannot name the card.
    Never initialises CUDA (a campaign forks its cases from this process)."""
    if device == "cpu":
        return "cpu"
    from vramplan.profile.nvml import Nvml, cuda_device_count

    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # is_available() must not init CUDA
    if cuda_device_count() == 0:
        require_cuda()   # no NVML: let torch say whether there is a device at all
        return None
    nvml = Nvml.open()
    if nvml is None:
        return None
    try:
        name, total = nvml.name(), nvml.memory().total
    finally:
        nvml.close()
    return catalog_key_for(name, total) or slugify(name.removeprefix("NVIDIA "))


# -- CUDA ----------------------------------------------------------------------------------------

class _Phases:
    """Per-phase peaks from the allocator's peak counters, reset at every boundary."""

    def __init__(self, torch, nvml):
        self.torch, self.nvml = torch, nvml
        self.measures: list[PhaseMeasure] = []
        self.current: str | None = None

    def boundary(self, phase: str | None) -> None:
        if phase == self.current:
            return   # the step's own "encode" after the batch was made under it
        self.close_current()
        self.current = phase

    def close_current(self) -> None:
        cuda = self.torch.cuda
        cuda.synchronize()
        if self.current is not None:
            used = self.nvml.used() if self.nvml is not None else None
            self.measures.append(PhaseMeasure(self.current, int(cuda.max_memory_allocated()),
                                              int(cuda.max_memory_reserved()), used))
        cuda.reset_peak_memory_stats()
        self.current = None


def measure_cuda(spec: TrainingSpec, steps: int = DEFAULT_STEPS, progress: Progress | None = None) -> Profile:
    import torch

    from vramplan.profile.nvml import Nvml
    from vramplan.step.build import build_step

    say = progress or (lambda message: None)
    nvml = Nvml.open()
    notes = []
    say("initialising CUDA")
    before = nvml.used() if nvml is not None else None
    torch.cuda.init()
    props = torch.cuda.get_device_properties(0)
    if nvml is not None and nvml.match_uuid(str(getattr(props, "uuid", "") or "")):
        before = None   # NVML's device 0 was another card: the first reading is not this one's
    probe = torch.empty(1, device="cuda")
    torch.cuda.synchronize()
    context = None
    if nvml is not None and before is not None:
        context = nvml.used() - before - int(torch.cuda.memory_reserved())
    del probe
    torch.cuda.empty_cache()
    gpu = _measured_gpu(props, nvml)
    capacity = gpu.memory_bytes
    if nvml is None:
        notes.append("NVML unavailable: no device-used figure and no context measurement")

    phases = _Phases(torch, nvml)
    step_seconds: list[float] = []
    oom_phase = oom_message = None
    step = None
    torch.cuda.reset_peak_memory_stats()
    try:
        say("building the model on the GPU (random weights)")
        phases.boundary("load")
        step = build_step(spec, "cuda")
        place_like_a_checkpoint(step, torch)
        phases.close_current()
        for i in range(steps):
            prefix = "" if i == 0 else f"step {i + 1} "
            say(f"step {i + 1} of {steps}")
            phases.boundary(prefix + "encode")
            started = time.perf_counter()
            batch = step.make_batch()
            step.run_step(batch, hook=lambda phase, prefix=prefix: phases.boundary(prefix + phase))
            del batch
            phases.close_current()
            step_seconds.append(time.perf_counter() - started)
    except Exception as error:  # noqa: BLE001 - only out-of-memory is a measurement
        if not _is_oom(error, torch):
            raise
        oom_phase = phases.current or "load"
        oom_message = str(error).strip().splitlines()[0][:500] if str(error).strip() else type(error).__name__
        phases.close_current()
        del error
    steady_allocated = int(torch.cuda.memory_allocated()) if oom_phase is None else None
    steady_reserved = int(torch.cuda.memory_reserved()) if oom_phase is None else None
    outside = None
    if nvml is not None:
        outside = nvml.used() - int(torch.cuda.memory_reserved())
    environment = collect_environment(torch, nvml)
    step = None
    gc.collect()
    torch.cuda.empty_cache()

    measured = [p for p in phases.measures if p.phase != "load"] or list(phases.measures)
    used = [p.device_used_bytes for p in measured if p.device_used_bytes is not None]
    return Profile(
        spec=spec.to_json(), device="cuda", fits=oom_phase is None,
        peak_allocated_bytes=max(p.peak_allocated_bytes for p in measured) if measured else None,
        peak_reserved_bytes=max(p.peak_reserved_bytes for p in measured) if measured else None,
        device_used_bytes=max(used) if used else None, gpu=gpu, steps=len(step_seconds),
        phases=tuple(phases.measures), step_seconds=tuple(round(s, 4) for s in step_seconds),
        cuda_context_bytes=context, outside_allocator_bytes=outside,
        steady_allocated_bytes=steady_allocated, steady_reserved_bytes=steady_reserved,
        capacity_bytes=capacity, oom_phase=oom_phase, oom_message=oom_message,
        environment=environment, measured_at=_now(),
        notes=tuple(notes + ["totals are the highest over the steps' phases; the load phase is "
                             "kept apart (random initialisation builds fp32 weights, then casts)"]))


def place_like_a_checkpoint(step, torch) -> None:
    """Move every weight, buffer and EMA copy to the host and back, one after another.

    `build_step(spec, "cuda")` initialises weights randomly in fp32 on the GPU and then casts
    them, which leaves the caching allocator's segments full of holes; a checkpoint load puts
    each tensor down once, in order. Re-placing them gives the allocator the state a real run
    starts from, which is what the reserve prediction replays. bitsandbytes' quantized weights
    stay where they are (moving them would quantize again).
    """
    from vramplan.step.quantize import is_quantized

    tensors, seen = [], set()
    skip = {id(m.weight) for module in step.models.values() for m in module.modules() if is_quantized(m)} \
        if step.spec.base_quant is not BaseQuant.NONE else set()
    for module in step.models.values():
        for t in list(module.parameters()) + list(module.buffers()):
            if id(t) not in seen and id(t) not in skip:
                seen.add(id(t))
                tensors.append(t)
    for t in step.trainable:
        if id(t) not in seen:
            seen.add(id(t))
            tensors.append(t)
    shadow = list(step.ema.shadow_params) if step.ema is not None else []
    with torch.no_grad():
        for t in tensors:
            t.data = t.data.cpu()
        host_shadow = [p.cpu() for p in shadow]
        if step.ema is not None:
            step.ema.shadow_params = []
        del shadow
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        for t in tensors:
            t.data = t.data.to("cuda")
        if step.ema is not None:
            step.ema.shadow_params = [p.to("cuda") for p in host_shadow]
    torch.cuda.synchronize()


def _is_oom(error: BaseException, torch) -> bool:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    # cuBLAS / cuDNN failing to get workspace report it as a RuntimeError
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text.lower()
                                                 or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def _measured_gpu(props, nvml) -> MeasuredGpu:
    name = nvml.name() if nvml is not None else str(props.name)
    total = nvml.memory().total if nvml is not None else int(props.total_memory)
    capability = f"{props.major}.{props.minor}"
    return MeasuredGpu(name=name, memory_bytes=total, compute_capability=capability,
                       catalog_key=catalog_key_for(name, total))


def catalog_key_for(name: str, memory_bytes: int) -> str | None:
    """The catalog card this is: its key's model number in the name, the same total memory
    (within 1%, which older drivers' smaller totals stay inside; the nearest wins)."""
    squashed = re.sub(r"[^a-z0-9]", "", str(name).lower())
    best = None
    for gpu in CATALOG.values():
        if gpu.key.split("-")[0] not in squashed:
            continue
        off = abs(gpu.memory_bytes - memory_bytes) / gpu.memory_bytes
        if off <= 0.01 and (best is None or off < best[0]):
            best = (off, gpu.key)
    return None if best is None else best[1]


def collect_environment(torch=None, nvml=None) -> dict:
    from importlib import metadata

    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    if torch is not None:
        versions["torch"] = torch.__version__
    from vramplan import __version__

    versions["vramplan"] = __version__   # also when run from a checkout that pip never installed
    env = {"python": platform.python_version(), "platform": platform.platform(),
           "versions": versions,
           "variables": {k: os.environ[k] for k in ALLOCATOR_VARIABLES if k in os.environ}}
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        env["torch_total_memory_bytes"] = int(torch.cuda.get_device_properties(0).total_memory)
    if nvml is not None:
        env["driver"] = nvml.driver()
        memory = nvml.memory()
        env["nvml_total_bytes"] = memory.total
        env["nvml_reserved_bytes"] = memory.reserved
    return env


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


# -- CPU -----------------------------------------------------------------------------------------

def started_with_malloc_setting() -> bool:
    """Whether this process *started* with MALLOC_MMAP_THRESHOLD_=65536 (glibc reads it then,
    so setting os.environ later changes nothing): /proc/self/environ is the starting environment."""
    name, value = MALLOC_SETTING
    try:
        start = Path("/proc/self/environ").read_bytes().split(b"\0")
    except OSError:
        return os.environ.get(name) == value
    return f"{name}={value}".encode() in start


def measure_cpu(spec: TrainingSpec, steps: int = DEFAULT_STEPS, progress: Progress | None = None) -> Profile:
    import torch

    from vramplan.simulate.autocast_policy import cuda_autocast_policy
    from vramplan.simulate.run import trace_step
    from vramplan.step.build import build_step

    say = progress or (lambda message: None)
    notes = ["measured on the CPU under CUDA's autocast policy: peak allocated is the tracker's "
             "peak of live tensor bytes, rounded as the CUDA allocator rounds"]
    if not started_with_malloc_setting():
        notes.append("MALLOC_MMAP_THRESHOLD_=65536 was not set at process start: RSS keeps freed "
                     "heap memory and overstates the peak")
    starts: list[float] = []

    def step_clock(message: str) -> None:
        if message.startswith("step "):
            starts.append(time.perf_counter())
        say(message)

    with cuda_autocast_policy():
        say("building the model on the CPU (random weights)")
        step = build_step(spec, "cpu")
        # RSS is measured from here, the weights resident: imports and the random
        # initialisation's fp32 copies before this point are no part of the step.
        gc.collect()
        baseline = status_bytes("VmRSS")
        if not reset_peak_rss():
            notes.append("could not reset the peak RSS after the build: it includes the random "
                         "initialisation's fp32 weights")
        tracker = trace_step(step, steps, step_clock)
        finished = time.perf_counter()
    peak_rss = status_bytes("VmHWM")
    step_seconds = [b - a for a, b in zip(starts, starts[1:] + [finished])]

    peaks = tracker.phase_peaks()
    measures, seen = [], set()
    for name, _ in tracker.timeline.phases:
        if name in seen or name == "end" or name not in peaks:
            continue
        seen.add(name)
        measures.append(PhaseMeasure(name, int(peaks[name][0])))
    step_measures = [m for m in measures if m.phase != "load"] or measures
    steady = int(tracker.live)
    del step, tracker
    gc.collect()
    return Profile(
        spec=spec.to_json(), device="cpu", fits=True,
        peak_allocated_bytes=max(m.peak_allocated_bytes for m in step_measures),
        steps=steps, phases=tuple(measures), step_seconds=tuple(round(s, 4) for s in step_seconds),
        steady_allocated_bytes=steady, rss_baseline_bytes=baseline, rss_peak_bytes=peak_rss,
        environment=collect_environment(torch), measured_at=_now(), notes=tuple(notes))


def measure_cpu_in_child(spec: TrainingSpec, steps: int = DEFAULT_STEPS,
                         progress: Progress | None = None) -> Profile:
    """`measure_cpu` in a new Python process started with MALLOC_MMAP_THRESHOLD_=65536; its
    progress lines come back on stderr, its profile as a JSON file."""
    say = progress or (lambda message: None)
    name, value = MALLOC_SETTING
    with tempfile.TemporaryDirectory(prefix="vramplan-profile-") as folder:
        spec_file, out_file = Path(folder) / "spec.json", Path(folder) / "profile.json"
        spec_file.write_text(json.dumps(spec.to_json()))
        command = [sys.executable, "-m", "vramplan.profile.worker", "--spec", str(spec_file),
                   "--steps", str(steps), "--out", str(out_file)]
        env = dict(os.environ, **{name: value})
        tail: deque = deque(maxlen=30)
        with subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) as child:
            for line in child.stderr:
                if line.startswith(PROGRESS_PREFIX):
                    say(line[len(PROGRESS_PREFIX):].rstrip("\n"))
                elif line.strip():
                    tail.append(line.rstrip("\n"))
            code = child.wait()
        if code == 2:
            message = next((l for l in reversed(tail) if l.startswith("vramplan: error: ")), None)
            raise UsageError(message.removeprefix("vramplan: error: ") if message
                             else "the CPU measurement rejected the spec")
        if code != 0 or not out_file.exists():
            last = tail[-1] if tail else f"exit code {code}"
            raise RuntimeError(f"the CPU measurement (python -m vramplan.profile.worker) failed: {last}")
        return Profile.from_json(json.loads(out_file.read_text()))

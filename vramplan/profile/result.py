"""What one `vramplan profile` run measured, and its JSON form in the profile store.

A `Profile` holds the spec it measured (as `TrainingSpec.to_json()`, so a profile still loads when
its local model folder is gone), where it ran, the three measured totals named as the tools that
measure them name them, the peak of every phase, and the environment. An out-of-memory is a
measurement too: `fits` is False, the totals are what was reached before it, `capacity_bytes` is
the card's.

On the CPU (`device == "cpu"`) peak allocated is the simulate tracker's peak of live tensor bytes
(rounded as the CUDA allocator rounds, so it predicts `max_memory_allocated`), there is no reserve
or NVML figure, and the process's peak RSS growth is kept beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from vramplan.errors import UsageError

SCHEMA = "vramplan.profile"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class PhaseMeasure:
    """The highest bytes seen in one phase ("load", "encode", ..., "step 2 optimizer")."""

    phase: str
    peak_allocated_bytes: int
    peak_reserved_bytes: int | None = None
    device_used_bytes: int | None = None    # NVML used at the phase's end (reserve only grows)

    def to_json(self) -> dict:
        return {"phase": self.phase, "peak_allocated_bytes": self.peak_allocated_bytes,
                "peak_reserved_bytes": self.peak_reserved_bytes,
                "device_used_bytes": self.device_used_bytes}

    @classmethod
    def from_json(cls, data: dict) -> "PhaseMeasure":
        return cls(phase=str(data["phase"]), peak_allocated_bytes=int(data["peak_allocated_bytes"]),
                   peak_reserved_bytes=_int_or_none(data.get("peak_reserved_bytes")),
                   device_used_bytes=_int_or_none(data.get("device_used_bytes")))


@dataclass(frozen=True)
class MeasuredGpu:
    """The card a CUDA profile ran on: NVML's name and total, torch's compute capability, and
    the catalog key when the card is one `vramplan gpus` lists (then predictions use that entry)."""

    name: str
    memory_bytes: int
    compute_capability: str | None = None
    catalog_key: str | None = None

    def to_json(self) -> dict:
        return {"name": self.name, "memory_bytes": self.memory_bytes,
                "compute_capability": self.compute_capability, "catalog_key": self.catalog_key}

    @classmethod
    def from_json(cls, data: dict) -> "MeasuredGpu":
        return cls(name=str(data["name"]), memory_bytes=int(data["memory_bytes"]),
                   compute_capability=data.get("compute_capability"),
                   catalog_key=data.get("catalog_key"))


@dataclass(frozen=True)
class Profile:
    spec: dict                              # TrainingSpec.to_json()
    device: str                             # "cuda" | "cpu"
    fits: bool                              # False: out of memory, measured
    peak_allocated_bytes: int | None        # torch.cuda.max_memory_allocated (cpu: tracker peak)
    peak_reserved_bytes: int | None = None  # torch.cuda.max_memory_reserved
    device_used_bytes: int | None = None    # NVML used, highest sample (what nvidia-smi shows)
    gpu: MeasuredGpu | None = None
    steps: int = 0                          # steps completed
    phases: tuple = ()                      # PhaseMeasure, in order, "load" first
    step_seconds: tuple = ()                # wall time of each completed step
    cuda_context_bytes: int | None = None   # NVML used after CUDA init minus before, minus reserved
    outside_allocator_bytes: int | None = None  # NVML used minus reserved, at the end: context + libraries
    steady_allocated_bytes: int | None = None   # memory_allocated after the last step
    steady_reserved_bytes: int | None = None
    capacity_bytes: int | None = None       # the card's NVML total (set for every CUDA profile)
    oom_phase: str | None = None            # the phase that ran out of memory
    oom_message: str | None = None          # the first line of the error
    rss_baseline_bytes: int | None = None   # cpu: VmRSS once the model is built (weights resident)
    rss_peak_bytes: int | None = None       # cpu: VmHWM after the steps (reset at the baseline)
    environment: dict = field(default_factory=dict)   # versions, driver, allocator settings
    measured_at: str = ""                   # ISO 8601, UTC
    notes: tuple = ()

    @property
    def gpu_key(self) -> str:
        """The store folder: "cpu", the catalog key, or a slug of the card's name."""
        if self.device == "cpu":
            return "cpu"
        if self.gpu is None:
            return "unknown-gpu"
        return self.gpu.catalog_key or slugify(self.gpu.name.removeprefix("NVIDIA "))

    @property
    def load_allocated_bytes(self) -> int | None:
        """Bytes live once the model is built: the "load" phase's peak (CPU: the weights)."""
        return next((p.peak_allocated_bytes for p in self.phases if p.phase == "load"), None)

    @property
    def rss_growth_bytes(self) -> int | None:
        """cpu: how far the process's RSS rose above the built model during the steps; NOTES.md
        compares it with the tracked bytes above the weights (6% above them, measured)."""
        if self.rss_peak_bytes is None or self.rss_baseline_bytes is None:
            return None
        return self.rss_peak_bytes - self.rss_baseline_bytes

    def to_json(self) -> dict:
        out = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "phases":
                value = [p.to_json() for p in value]
            elif f.name == "gpu":
                value = None if value is None else value.to_json()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data) -> "Profile":
        """Read a stored profile; a file that is not one raises `UsageError` saying why."""
        if not isinstance(data, dict):
            raise UsageError(f"not a profile: a JSON {type(data).__name__}, not an object")
        if data.get("schema") != SCHEMA:
            raise UsageError(f"not a vramplan profile (no \"schema\": \"{SCHEMA}\")")
        version = data.get("schema_version")
        if not isinstance(version, int) or version > SCHEMA_VERSION or version < 1:
            raise UsageError(f"profile schema version {version!r}: this vramplan reads "
                             f"version {SCHEMA_VERSION} (a newer vramplan wrote it?)")
        try:
            spec = data["spec"]
            if not isinstance(spec, dict) or "model" not in spec:
                raise UsageError("its \"spec\" is not a training spec object")
            device = data["device"]
            if device not in ("cuda", "cpu"):
                raise UsageError(f"unknown device {device!r}")
            return cls(
                spec=spec, device=device, fits=bool(data["fits"]),
                peak_allocated_bytes=_int_or_none(data.get("peak_allocated_bytes")),
                peak_reserved_bytes=_int_or_none(data.get("peak_reserved_bytes")),
                device_used_bytes=_int_or_none(data.get("device_used_bytes")),
                gpu=None if data.get("gpu") is None else MeasuredGpu.from_json(data["gpu"]),
                steps=int(data.get("steps", 0)),
                phases=tuple(PhaseMeasure.from_json(p) for p in data.get("phases", ())),
                step_seconds=tuple(float(s) for s in data.get("step_seconds", ())),
                cuda_context_bytes=_int_or_none(data.get("cuda_context_bytes")),
                outside_allocator_bytes=_int_or_none(data.get("outside_allocator_bytes")),
                steady_allocated_bytes=_int_or_none(data.get("steady_allocated_bytes")),
                steady_reserved_bytes=_int_or_none(data.get("steady_reserved_bytes")),
                capacity_bytes=_int_or_none(data.get("capacity_bytes")),
                oom_phase=data.get("oom_phase"), oom_message=data.get("oom_message"),
                rss_baseline_bytes=_int_or_none(data.get("rss_baseline_bytes")),
                rss_peak_bytes=_int_or_none(data.get("rss_peak_bytes")),
                environment=dict(data.get("environment") or {}),
                measured_at=str(data.get("measured_at", "")),
                notes=tuple(str(n) for n in data.get("notes", ())))
        except UsageError:
            raise
        except (KeyError, TypeError, ValueError) as error:
            what = f"missing key {error}" if isinstance(error, KeyError) else str(error)
            raise UsageError(f"malformed profile: {what}") from None


def slugify(text: str) -> str:
    """"H100 80GB HBM3" -> "h100-80gb-hbm3": lower case letters and digits joined by dashes."""
    out, dash = [], False
    for ch in str(text).lower():
        if ch.isascii() and ch.isalnum():
            out.append(ch)
            dash = False
        elif not dash and out:
            out.append("-")
            dash = True
    return "".join(out).strip("-") or "x"


def _int_or_none(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"a size is {value!r}, not a number of bytes")
    return int(value)

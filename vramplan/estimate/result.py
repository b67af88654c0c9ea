"""The answer `vramplan estimate` gives, and its JSON contract (later tools rely on the keys)."""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.footprint import ComponentParams, Footprint
from vramplan.gpus import Gpu
from vramplan.spec import TrainingSpec


@dataclass(frozen=True)
class Estimate:
    spec: TrainingSpec
    parameters: dict            # component name -> ComponentParams
    footprint: Footprint
    adapter_file_bytes: int | None = None
    notes: tuple = ()           # assumptions and provisional figures, one line each
    distributed: object | None = None   # vramplan.distributed.plan.DistributedPlan: per GPU, host RAM

    @property
    def gpu(self) -> Gpu | None:
        return self.spec.gpu

    @property
    def headroom_bytes(self) -> int | None:
        """Card capacity minus what nvidia-smi would show in use; negative is a shortfall."""
        if self.gpu is None:
            return None
        return self.gpu.memory_bytes - self.footprint.device_used_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.gpu is None else self.headroom_bytes >= 0

    @property
    def trainable_params(self) -> int:
        return sum(p.trainable for p in self.parameters.values())

    def to_json(self) -> dict:
        fp = self.footprint
        out = {
            "spec": self.spec.to_json(),
            "parameters": {name: p.to_json() for name, p in self.parameters.items()},
            "categories": fp.categories_json(),
            "peak_allocated_bytes": fp.peak_allocated_bytes,
            "peak_reserved_bytes": fp.peak_reserved_bytes,
            "device_used_bytes": fp.device_used_bytes,
            "peak_phase": fp.peak_phase,
            "phases": [{"phase": p.phase, "peak_bytes": p.peak_bytes} for p in fp.phases],
            "gpu": None if self.gpu is None else {"name": self.gpu.name,
                                                   "memory_bytes": self.gpu.memory_bytes},
            "fits": self.fits,
            "headroom_bytes": self.headroom_bytes,
            "notes": list(self.notes),
        }
        if self.adapter_file_bytes is not None:
            out["adapter_file_bytes"] = self.adapter_file_bytes
        if self.distributed is not None:
            # the totals above are one GPU's already; these say how the GPUs share the work
            out["per_gpu"] = self.distributed.per_gpu_json(self)
            out["host"] = self.distributed.host.to_json()
        return out


__all__ = ["Estimate", "ComponentParams", "Footprint"]

"""What nvidia-smi shows, read through NVML (nvidia-ml-py's `pynvml`), without touching CUDA.

NVML needs no CUDA context, so the device's used memory can be read before torch initialises
CUDA (the context's own size is the difference) and a campaign's parent process can look at the
card without poisoning the CUDA state its forked children start from.

"Used" is NVML's v2 memory info where the driver has it: since R525 nvidia-smi prints that figure,
which leaves out the part the driver reserves for itself ("Reserved" in `nvidia-smi -q`); the v1
figure includes it and so shows some hundred MiB in use on an idle card.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class NvmlMemory:
    total: int
    used: int
    reserved: int | None = None   # driver-reserved (v2 only)


class Nvml:
    """One device's NVML handle. `Nvml.open()` returns None where NVML is not available."""

    def __init__(self, pynvml, handle):
        self._nvml = pynvml
        self.handle = handle

    @classmethod
    def open(cls, index: int | None = None) -> "Nvml | None":
        try:
            import pynvml

            pynvml.nvmlInit()
            if index is None:
                index = visible_index()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except Exception:  # library missing, no driver, no such device: all mean "no NVML"
            return None
        return cls(pynvml, handle)

    def match_uuid(self, uuid: str | None) -> bool:
        """Point at the device whose UUID torch reports (CUDA_VISIBLE_DEVICES may reorder).
        True when that is another device than the one open (compared by UUID: NVML hands out a
        new handle object for every lookup, even of the same device)."""
        if not uuid:
            return False
        nvml = self._nvml
        wanted = str(uuid).lower().removeprefix("gpu-")
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            found = _text(nvml.nvmlDeviceGetUUID(handle)).lower().removeprefix("gpu-")
            if found == wanted:
                current = _text(nvml.nvmlDeviceGetUUID(self.handle)).lower().removeprefix("gpu-")
                self.handle = handle
                return current != wanted
        return False

    def memory(self) -> NvmlMemory:
        nvml = self._nvml
        version = getattr(nvml, "nvmlMemory_v2", None)
        if version is not None:
            try:
                info = nvml.nvmlDeviceGetMemoryInfo(self.handle, version=version)
                return NvmlMemory(int(info.total), int(info.used), int(info.reserved))
            except Exception:  # drivers before R510 have no v2 call
                pass
        info = nvml.nvmlDeviceGetMemoryInfo(self.handle)
        return NvmlMemory(int(info.total), int(info.used))

    def used(self) -> int:
        return self.memory().used

    def name(self) -> str:
        return _text(self._nvml.nvmlDeviceGetName(self.handle))

    def driver(self) -> str | None:
        try:
            return _text(self._nvml.nvmlSystemGetDriverVersion())
        except Exception:
            return None

    def process_used(self, pid: int | None = None) -> int | None:
        """This process's memory on the device as NVML accounts it (None where hidden)."""
        pid = os.getpid() if pid is None else pid
        try:
            for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
                if proc.pid == pid and proc.usedGpuMemory is not None:
                    return int(proc.usedGpuMemory)
        except Exception:
            return None
        return None

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:
            pass


def visible_index() -> int:
    """The NVML index of CUDA device 0: the first CUDA_VISIBLE_DEVICES entry when it is a number."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def cuda_device_count() -> int:
    """Devices NVML sees; 0 where NVML is missing. Never initialises CUDA."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return 0


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)

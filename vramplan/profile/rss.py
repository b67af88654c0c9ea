"""The process's resident memory, as the CPU measurements (profile --device cpu, train) read it.

Linux's /proc/self/status gives the current (VmRSS) and peak (VmHWM) resident set; writing 5 to
/proc/self/clear_refs (Linux 4.0+) resets the peak to the current value, so a phase can be
measured on its own. Elsewhere psutil / getrusage stand in.
"""

from __future__ import annotations

from pathlib import Path


def status_bytes(field: str) -> int | None:
    """VmRSS / VmHWM from /proc/self/status, in bytes (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    value = status_bytes("VmRSS")
    if value is not None:
        return value
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    value = status_bytes("VmHWM")
    if value is not None:
        return value
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False

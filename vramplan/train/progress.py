"""Live memory and the progress bar of a run.

On a GPU, memory is torch's own count (`memory_allocated` / `max_memory_allocated`, what the
estimate predicts as peak allocated). On the CPU it is the process's resident set above what it
held before the models were loaded: current from /proc, peak from the kernel's high-water mark
(VmHWM, reset through /proc/self/clear_refs where the kernel allows, else getrusage). RSS also
holds the allocator's free lists; NOTES.md measured it within 6% of the tensor bytes with
MALLOC_MMAP_THRESHOLD_=65536 set before Python starts.
"""

from __future__ import annotations

import os
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from vramplan.profile.rss import peak_rss_bytes, reset_peak_rss, rss_bytes
from vramplan.units import format_bytes


class MemoryMeter:
    """Two spans: loading (models read, caches encoded, a checkpoint restored) and the steps.

    The estimate predicts the steps, so `peak()` is theirs once `start_steps()` has been called;
    loading's peak is kept apart (`load_peak`), as `vramplan profile` keeps its "load" phase
    apart. On a CPU whose kernel will not reset the high-water mark, the steps' peak includes
    loading (`split` False) and the report says so."""

    def __init__(self, device: str):
        self.device = device
        self.load_peak: int | None = None
        self.load_peak_reserved: int | None = None
        self.split = True
        self._steps: tuple[int, int | None] | None = None
        if device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
            self.baseline = 0
            self.kind = "GPU"
        else:
            reset_peak_rss()
            self.baseline = rss_bytes()
            self.kind = "RSS"

    def start_steps(self) -> None:
        """Close the loading span and start counting the steps' peak from what is held now."""
        self.load_peak, self.load_peak_reserved = self._peak_now(), self._reserved_now()
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
        else:
            self.split = reset_peak_rss()

    def end_steps(self) -> None:
        """Freeze the steps' peaks (saving the result afterwards is not a step)."""
        self._steps = (self._peak_now(), self._reserved_now())

    def current(self) -> int:
        if self.device == "cuda":
            import torch

            return torch.cuda.memory_allocated()
        return max(rss_bytes() - self.baseline, 0)

    def peak(self) -> int:
        return self._steps[0] if self._steps is not None else self._peak_now()

    def peak_reserved(self) -> int | None:
        return self._steps[1] if self._steps is not None else self._reserved_now()

    def _peak_now(self) -> int:
        if self.device == "cuda":
            import torch

            return torch.cuda.max_memory_allocated()
        return max(peak_rss_bytes() - self.baseline, 0)

    def _reserved_now(self) -> int | None:
        if self.device == "cuda":
            import torch

            return torch.cuda.max_memory_reserved()
        return None

    def label(self) -> str:
        return f"{self.kind} {format_bytes(self.current())} / peak {format_bytes(self.peak())}"


class RateColumn(ProgressColumn):
    """Optimizer steps per second since the run (or the resume) began."""

    def render(self, task) -> Text:
        started = task.fields.get("started")
        done = task.completed - task.fields.get("first", 0)
        if not started or done <= 0:
            return Text("- it/s", style="dim")
        rate = done / max(time.perf_counter() - started, 1e-9)
        return Text(f"{rate:.2f} it/s" if rate >= 0.1 else f"{1 / rate:.1f} s/it", style="cyan")


def progress_bar(console: Console | None = None, enabled: bool = True) -> Progress:
    return Progress(
        TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), RateColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        TextColumn("{task.fields[memory]}", style="magenta"),
        console=console or Console(stderr=True), disable=not enabled, transient=False)


def cpu_note() -> str | None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        return ("RSS includes glibc's kept free memory; set MALLOC_MMAP_THRESHOLD_=65536 before "
                "starting for a closer figure")
    return None

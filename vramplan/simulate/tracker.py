"""Live tensor bytes over a training step, seen from inside the dispatcher.

A TorchDispatchMode sees every op; each output's storage is recorded the first time it appears
and freed by `weakref.finalize` when its last tensor dies, so the live total follows the real
lifetimes (Python references, autograd's saved tensors, the optimizer's state). Sizes are
rounded up to 512 bytes as PyTorch's CUDA caching allocator does (kMinBlockSize in
c10/cuda/CUDACachingAllocator.cpp), so the peak predicts `torch.cuda.max_memory_allocated`.

Categories are decided after the fact (a storage allocated during backward may turn out to be a
parameter's gradient): the tracker keeps one record per storage with when it was allocated and
freed, and `classify()` labels them once the step is over. The same tracker measures real CPU
tensors (profile --device cpu), which is how tests check the fake trace against a real run.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vramplan.footprint import Category

CUDA_BLOCK = 512
WEIGHTS = (Category.FROZEN_WEIGHTS, Category.TRAINABLE_WEIGHTS)


def cuda_rounded(nbytes: int) -> int:
    return -(-nbytes // CUDA_BLOCK) * CUDA_BLOCK if nbytes else 0


@dataclass
class StorageRecord:
    sid: int
    nbytes: int             # rounded as the CUDA allocator would
    alloc_at: int           # event index
    free_at: int | None = None
    op: str = ""
    module: str = ""
    phase: str = ""
    category: Category | None = None   # fixed at registration (params, buffers, inputs) or later
    saved: bool = False                # packed by autograd for backward at least once
    shape: tuple = ()
    dtype: str = ""


@dataclass
class Timeline:
    """(event index, live bytes) after each allocation or free, and phase boundaries."""
    points: list = field(default_factory=list)
    phases: list = field(default_factory=list)   # (phase name, first event index)


@contextlib.contextmanager
def global_module_hooks(pre, post):
    """Forward pre/post hooks on every module, for as long as the context is open."""
    h1 = torch.nn.modules.module.register_module_forward_pre_hook(pre)
    h2 = torch.nn.modules.module.register_module_forward_hook(post)
    try:
        yield
    finally:
        h1.remove()
        h2.remove()


class MemoryTracker(TorchDispatchMode):
    """`conv_workspaces`: add the cuDNN workspace each CUDA convolution would borrow for its call
    (vramplan/estimate/conv_workspaces.py), as the estimate's replay does -- for fake tensors
    standing in for CUDA ones, not for a real CPU run, whose convolutions borrow nothing."""

    def __init__(self, conv_workspaces: bool = False):
        super().__init__()
        self.conv_workspaces = conv_workspaces
        self.records: dict[int, StorageRecord] = {}
        self._by_storage: dict[int, int] = {}   # id(storage object) -> sid, while alive
        self.live = 0
        self.peak = 0
        self.peak_event = 0
        self.event = 0
        self.phase = ""
        self.module_stack: list[str] = []
        self.timeline = Timeline()
        self._next_sid = 0
        self._phase_peaks: dict[str, tuple[int, int]] = {}  # phase -> (peak bytes, event)

    # -- storage bookkeeping ---------------------------------------------------------------
    def _sid_of(self, tensor: torch.Tensor) -> int | None:
        try:
            storage = tensor.untyped_storage()
        except (NotImplementedError, RuntimeError):
            return None
        return self._by_storage.get(id(storage))

    def track(self, tensor: torch.Tensor, category: Category | None = None, op: str = "") -> int | None:
        """Record `tensor`'s storage if new; returns its storage id."""
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return None
        try:
            storage = tensor.untyped_storage()
        except (NotImplementedError, RuntimeError):
            return None
        key = id(storage)
        sid = self._by_storage.get(key)
        if sid is not None:
            if category is not None and self.records[sid].category is None:
                self.records[sid].category = category
            return sid
        sid = self._next_sid
        self._next_sid += 1
        nbytes = cuda_rounded(int(storage.nbytes()))
        self.event += 1
        self.records[sid] = StorageRecord(
            sid=sid, nbytes=nbytes, alloc_at=self.event, op=op,
            module=self.module_stack[-1] if self.module_stack else "", phase=self.phase,
            category=category, shape=tuple(tensor.shape), dtype=str(tensor.dtype).removeprefix("torch."))
        self._by_storage[key] = sid
        weakref.finalize(storage, self._free, key, sid)
        self._add(nbytes)
        return sid

    def _free(self, key: int, sid: int) -> None:
        if self._by_storage.get(key) == sid:
            del self._by_storage[key]
        record = self.records[sid]
        if record.free_at is None:
            self.event += 1
            record.free_at = self.event
            self._add(-record.nbytes)

    def _add(self, delta: int) -> None:
        self.live += delta
        self.timeline.points.append((self.event, self.live))
        if self.live > self.peak:
            self.peak, self.peak_event = self.live, self.event
        best = self._phase_peaks.get(self.phase)
        if best is None or self.live > best[0]:
            self._phase_peaks[self.phase] = (self.live, self.event)

    def set_phase(self, phase: str) -> None:
        """Events from the next one on belong to `phase` (same convention as the estimate's)."""
        if self.phase == phase:
            return
        self.phase = phase
        self.timeline.phases.append((phase, self.event + 1))
        self._phase_peaks.setdefault(phase, (self.live, self.event))

    def mark_saved(self, tensor: torch.Tensor) -> None:
        sid = self._sid_of(tensor)
        if sid is not None:
            self.records[sid].saved = True

    # -- dispatch ----------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket.__name__) if hasattr(func, "overloadpacket") else str(func)
        category = None
        if name == "_to_copy" and args and isinstance(args[0], torch.Tensor):
            # autocast's cached low-precision copy of a weight
            sid = self._sid_of(args[0])
            if sid is not None and self.records[sid].category in WEIGHTS:
                category = Category.AUTOCAST_CACHE
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.track(value, category, op=name)
        if self.conv_workspaces and name in ("convolution", "convolution_backward"):
            self._conv_workspace(name, args, out)
        return out

    def _conv_workspace(self, name: str, args, out) -> None:
        from vramplan.estimate.conv_workspaces import backward_kind, conv_key, workspace_bytes

        if name == "convolution":   # (input, weight, bias, stride, padding, dilation, transposed, ...)
            x, w, y, transposed, kind = args[0], args[1], out, args[6], "forward"
        else:   # (grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed, ..., mask)
            y, x, w, transposed, mask = args[0], args[1], args[2], args[7], args[10]
            kind = backward_kind(bool(mask[0]), bool(mask[1] or mask[2]))
        if transposed or kind is None:
            return
        key = conv_key(tuple(x.shape), tuple(w.shape), tuple(y.shape))
        nbytes = workspace_bytes(key, str(x.dtype).removeprefix("torch."), kind)
        if nbytes:
            self.transient(nbytes, Category.WORKSPACES, name)

    def transient(self, nbytes: int, category: Category, op: str = "") -> None:
        """An allocation made and freed within one call (a library's workspace)."""
        sid = self._next_sid
        self._next_sid += 1
        nbytes = cuda_rounded(nbytes)
        self.event += 1
        self.records[sid] = StorageRecord(sid=sid, nbytes=nbytes, alloc_at=self.event, op=op,
                                          module=self.module_stack[-1] if self.module_stack else "",
                                          phase=self.phase, category=category)
        self._add(nbytes)
        self.event += 1
        self.records[sid].free_at = self.event
        self._add(-nbytes)

    # -- module attribution ----------------------------------------------------------------
    def module_hooks(self, roots: dict):
        """Name the module running each allocation (for the top-layers report)."""
        names = {id(m): f"{prefix}.{n}" if n else prefix
                 for prefix, root in roots.items() for n, m in root.named_modules()}

        def pre(module, args):
            name = names.get(id(module))
            if name is not None:
                self.module_stack.append(name)

        def post(module, args, output):
            if names.get(id(module)) is not None and self.module_stack:
                self.module_stack.pop()

        return global_module_hooks(pre, post)

    # -- results -----------------------------------------------------------------------------
    def live_at(self, event: int) -> list[StorageRecord]:
        return [r for r in self.records.values()
                if r.alloc_at <= event and (r.free_at is None or r.free_at > event)]

    def phase_peaks(self) -> dict[str, tuple[int, int]]:
        return dict(self._phase_peaks)

"""Make CPU autocast behave like CUDA autocast while simulating.

CPU autocast's op lists are not CUDA's: under CUDA autocast `group_norm`, `layer_norm`,
`upsample_nearest2d`... run in fp32 and `softmax`, `sum`... produce fp32, while CPU autocast
leaves them in 16 bits (NOTES.md measures +25% to +121% activation error if ignored). We read the
CUDA lists from the installed torch's own header (`torch/include/ATen/autocast_mode.h`, the macros
that `aten/src/ATen/autocast_mode.cpp` registers for the CUDA `Autocast` key), and while the
context is active we register Python kernels on the `AutocastCPU` key that apply CUDA's policy to
every op of those lists and pass every other op CPU autocast would touch through unchanged.

It is process-global (dispatcher registrations): install it only around a simulated step.
"""

from __future__ import annotations

import contextlib
import re
import threading
import warnings
import weakref
from functools import lru_cache
from pathlib import Path

import torch

POLICIES = {
    "AT_FORALL_LOWER_PRECISION_FP": "lower_precision_fp",
    "AT_FORALL_FP32": "fp32",
    "AT_FORALL_FP32_SET_OPT_DTYPE": "fp32_set_opt_dtype",
    "AT_FORALL_PROMOTE": "promote",
}


def _header() -> Path:
    return Path(torch.__file__).parent / "include" / "ATen" / "autocast_mode.h"


@lru_cache(maxsize=1)
def cuda_autocast_lists() -> dict[str, str]:
    """{"aten::op.overload": policy} for CUDA autocast, parsed from the installed header."""
    text = _header().read_text()
    ops: dict[str, str] = {}
    for macro, policy in POLICIES.items():
        match = re.search(r"#define " + macro + r"\(_\)(.*?)(?:\n\s*\n|\n#)", text, re.S)
        if not match:
            raise RuntimeError(f"cannot find {macro} in {_header()}: torch layout changed")
        for name, overload in re.findall(r"_\((\w+)(?:,\s*(\w+))?\)", match.group(1)):
            ops[f"aten::{name}" + (f".{overload}" if overload else "")] = policy
    # `norm` has CUDA's fp32_append_dtype policy (AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE).
    ops["aten::norm.Scalar"] = ops["aten::norm.ScalarOpt_dim"] = "fp32_append_dtype"
    return ops


def _op(qualified: str):
    name, _, overload = qualified.removeprefix("aten::").partition(".")
    packet = getattr(torch.ops.aten, name, None)
    if packet is None:
        return None
    return getattr(packet, overload or "default", None)


class _CastCache:
    """CUDA autocast caches the low-precision casts of fp32 leaf weights that require grad until
    the outermost autocast region exits (`cached_cast` in autocast_mode.cpp); we do the same."""

    def __init__(self):
        self.casts: dict[int, tuple] = {}

    def get(self, tensor, dtype):
        key = id(tensor)
        hit = self.casts.get(key)
        if hit is not None and hit[0]() is tensor:
            return hit[1]
        cast = tensor.to(dtype)
        self.casts[key] = (weakref.ref(tensor), cast)
        return cast

    def clear(self):
        self.casts.clear()


_state = threading.local()


def _cache() -> _CastCache:
    if not hasattr(_state, "cache"):
        _state.cache = _CastCache()
    return _state.cache


def _eligible(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.device.type == "cpu"


def _map(value, fn):
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_map(v, fn) for v in value)
    return value


def _cast_to(dtype, low: torch.dtype):
    def cast(tensor):
        if not _eligible(tensor) or tensor.dtype == dtype:
            return tensor
        if (dtype == low and tensor.dtype == torch.float32 and tensor.requires_grad
                and tensor.is_leaf and not tensor._is_view()):
            return _cache().get(tensor, dtype)
        return tensor.to(dtype)
    return cast


def _tensors(args, kwargs):
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, torch.Tensor))


_EXCLUDE = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


def _kernel(op, policy: str):
    dtype_index = next((i for i, a in enumerate(op._schema.arguments) if a.name == "dtype"), None)

    def run(*args, **kwargs):
        low = torch.get_autocast_dtype("cpu")
        if policy == "lower_precision_fp":
            cast = _cast_to(low, low)
            args, kwargs = [_map(a, cast) for a in args], {k: _map(v, cast) for k, v in kwargs.items()}
        elif policy == "fp32":
            cast = _cast_to(torch.float32, low)
            args, kwargs = [_map(a, cast) for a in args], {k: _map(v, cast) for k, v in kwargs.items()}
        elif policy in ("fp32_set_opt_dtype", "fp32_append_dtype"):
            first = next(_tensors(args, kwargs), None)
            if first is not None and _eligible(first):
                if policy == "fp32_append_dtype":
                    kwargs = dict(kwargs, dtype=torch.float32)
                elif dtype_index is not None and dtype_index < len(args):
                    if args[dtype_index] is None:
                        args = list(args)
                        args[dtype_index] = torch.float32
                elif kwargs.get("dtype") is None:
                    kwargs = dict(kwargs, dtype=torch.float32)
        elif policy == "promote":
            widest = low
            for t in _tensors(args, kwargs):
                if _eligible(t):
                    widest = torch.promote_types(widest, t.dtype)
            cast = _cast_to(widest, low)
            args, kwargs = [_map(a, cast) for a in args], {k: _map(v, cast) for k, v in kwargs.items()}
        with torch._C._ExcludeDispatchKeyGuard(_EXCLUDE):
            return op(*args, **kwargs)

    return run


def _passthrough(op):
    def run(*args, **kwargs):
        with torch._C._ExcludeDispatchKeyGuard(_EXCLUDE):
            return op(*args, **kwargs)
    return run


_lock = threading.Lock()
_installed = 0
_library = None


@contextlib.contextmanager
def cuda_autocast_policy():
    """While active, CPU autocast applies CUDA's per-op policy (see module docstring)."""
    global _installed, _library
    with _lock:
        if _installed == 0:
            _library = torch.library.Library("aten", "IMPL")
            warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel.*")
            warnings.filterwarnings("ignore", message=".*Warning only once for all operators.*")
            cuda = cuda_autocast_lists()
            cpu_ops = [n for n in torch._C._dispatch_get_all_op_names()
                       if n.startswith("aten::")
                       and torch._C._dispatch_has_kernel_for_dispatch_key(n, "AutocastCPU")]
            for name in sorted(set(cpu_ops) | set(cuda)):
                op = _op(name)
                if op is None:
                    continue
                short = name.removeprefix("aten::")
                fn = _kernel(op, cuda[name]) if name in cuda else _passthrough(op)
                _library.impl(short, fn, "AutocastCPU")
            _patch_clear()
        _installed += 1
    try:
        yield
    finally:
        with _lock:
            _installed -= 1
            if _installed == 0:
                _library._destroy()
                _library = None
                _cache().clear()
                _unpatch_clear()


_original_clear = None


def _patch_clear() -> None:
    """torch.autocast.__exit__ calls `torch.clear_autocast_cache()` when the outermost region
    exits (also the one a checkpoint opens to recompute): drop our cache at the same moment."""
    global _original_clear
    _original_clear = torch.clear_autocast_cache

    def clear():
        _original_clear()
        _cache().clear()

    torch.clear_autocast_cache = clear


def _unpatch_clear() -> None:
    global _original_clear
    if _original_clear is not None:
        torch.clear_autocast_cache = _original_clear
        _original_clear = None


@contextlib.contextmanager
def autocast_region(dtype: torch.dtype):
    """`torch.autocast("cpu", dtype)` whose weight-cast cache is dropped on exit, as CUDA's is."""
    with torch.autocast("cpu", dtype=dtype):
        try:
            yield
        finally:
            _cache().clear()

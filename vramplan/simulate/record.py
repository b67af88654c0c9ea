"""Record a forward pass as an op graph with symbolic sizes: the data the analytic tier replays.

The estimator must not import torch, yet its activation model has to know what every op of a
real diffusers forward allocates. So, once per catalog model and variant, we run the real forward
on fake tensors whose batch and latent sizes are *symbols* (torch's ShapeEnv), under the CUDA
autocast policy, and write down every aten op: its inputs, its outputs (dtype, shape and storage
size as formulas in B, H, W), which storages are views of which, when Python frees each one,
which module ran it, and where gradient-checkpointed regions begin and end. `estimate` evaluates
the formulas at the user's sizes and replays the graph with autograd's saving rules.

Autograd's own saving is disabled while recording (a saved-tensor hook that keeps nothing), so
the recorded frees are the Python lifetimes alone; which tensors autograd would keep depends on
what is trainable, which the replay decides.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SKIP_OPS = {"prim::device", "prim::layout"}


@dataclass
class Graph:
    exprs: list = field(default_factory=list)       # formula strings over the symbols
    modules: list = field(default_factory=list)     # module paths
    opnames: list = field(default_factory=list)
    dtypes: list = field(default_factory=list)
    tensors: list = field(default_factory=list)     # [sid, dtype idx, [shape expr idx], param name or None]
    storages: list = field(default_factory=list)    # [nbytes expr idx, alloc op or -1, free op or None]
    ops: list = field(default_factory=list)         # [opname idx, module idx, [[arg, tid]...], [tid...], [scalar args]]
    calls: list = field(default_factory=list)       # [module idx, first op, last op, [in tids], [out tids]]
    regions: list = field(default_factory=list)     # gradient-checkpointed calls, same layout
    functions: list = field(default_factory=list)   # custom autograd.Function calls, same layout
    inputs: dict = field(default_factory=dict)      # role -> tid (latents, timesteps, context...)
    outputs: dict = field(default_factory=dict)
    markers: dict = field(default_factory=dict)     # e.g. autocast_exit -> op index
    guards: list = field(default_factory=list)      # formulas that held while recording
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class GraphRecorder(TorchDispatchMode):
    """Dispatch mode that appends every op to a `Graph` (see module docstring)."""

    def __init__(self, symbols: dict | None = None):
        super().__init__()
        self.graph = Graph()
        self.symbols = symbols or {}   # sympy symbol -> our name
        self._expr_idx: dict[str, int] = {}
        self._names = {"op": {}, "module": {}, "dtype": {}}
        self._tids: dict[int, tuple] = {}       # id(tensor) -> (weakref, tid)
        self._sids: dict[int, int] = {}         # id(storage) -> sid
        self._storage_refs: dict[int, object] = {}
        self.module_stack: list[int] = []
        self.module_names: dict[int, str] = {}  # id(module) -> path
        self._open_calls: list = []
        self.after_last_op = False

    # -- interning -------------------------------------------------------------------------------
    def expr(self, value) -> int:
        text = self._format(value)
        idx = self._expr_idx.get(text)
        if idx is None:
            idx = self._expr_idx[text] = len(self.graph.exprs)
            self.graph.exprs.append(text)
        return idx

    def _format(self, value) -> str:
        if isinstance(value, int):
            return str(value)
        node = value.node.expr if hasattr(value, "node") else value
        if self.symbols:
            node = node.xreplace(self.symbols)
        return str(node)

    def _intern(self, kind: str, name: str, table: list) -> int:
        names = self._names[kind]
        idx = names.get(name)
        if idx is None:
            idx = names[name] = len(table)
            table.append(name)
        return idx

    def module_idx(self, path: str) -> int:
        return self._intern("module", path, self.graph.modules)

    # -- tensors and storages -----------------------------------------------------------------
    def tid(self, tensor: torch.Tensor, param: str | None = None, alloc_op: int = -1) -> int:
        hit = self._tids.get(id(tensor))
        if hit is not None and hit[0]() is tensor:
            return hit[1]
        storage = tensor.untyped_storage()
        sid = self._sids.get(id(storage))
        if sid is None or self._storage_refs.get(sid) is None or self._storage_refs[sid]() is not storage:
            sid = len(self.graph.storages)
            self.graph.storages.append([self.expr(storage.nbytes()), alloc_op, None])
            self._sids[id(storage)] = sid
            self._storage_refs[sid] = weakref.ref(storage)
            weakref.finalize(storage, self._freed, sid)
        tid = len(self.graph.tensors)
        dtype = self._intern("dtype", str(tensor.dtype).removeprefix("torch."), self.graph.dtypes)
        self.graph.tensors.append([sid, dtype, [self.expr(s) for s in tensor.shape], param])
        self._tids[id(tensor)] = (weakref.ref(tensor), tid)
        return tid

    def _freed(self, sid: int) -> None:
        if self.graph.storages[sid][2] is None:
            # after_last_op: frees from now on are told apart from those before (templates)
            self.graph.storages[sid][2] = len(self.graph.ops) - 1 + (1 if self.after_last_op else 0)

    def register_params(self, root: torch.nn.Module, prefix: str = "") -> None:
        from vramplan.step.quantize import quant_tensors

        for name, param in root.named_parameters(remove_duplicate=False):
            self.tid(param, param=prefix + name)
            for extra, tensor in quant_tensors(param).items():
                self.tid(tensor, param=f"{prefix}{name}.{extra}")
        for name, buf in root.named_buffers():
            self.tid(buf, param=prefix + name)
        for name, mod in root.named_modules():
            self.module_names[id(mod)] = prefix + name

    # -- dispatch ------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.name() if hasattr(func, "name") else str(func)
        if name in SKIP_OPS:
            return out
        op_index = len(self.graph.ops)
        inputs, scalars = [], []
        schema_args = func._schema.arguments
        for i, value in enumerate(args):
            self._collect(schema_args[i].name if i < len(schema_args) else str(i), value, inputs, scalars)
        for key, value in kwargs.items():
            self._collect(key, value, inputs, scalars)
        outputs = []
        flat = out if isinstance(out, (tuple, list)) else (out,)
        for value in flat:
            if isinstance(value, torch.Tensor):
                outputs.append(self.tid(value, alloc_op=op_index))
            elif isinstance(value, (tuple, list)):
                outputs.extend(self.tid(v, alloc_op=op_index) for v in value if isinstance(v, torch.Tensor))
        module = self.module_stack[-1] if self.module_stack else self.module_idx("")
        full = name.removeprefix("aten::")
        opname = self._intern("op", full if "." in full else full + ".default", self.graph.opnames)
        self.graph.ops.append([opname, module, inputs, outputs, scalars])
        return out

    def _collect(self, name, value, inputs, scalars):
        if isinstance(value, torch.Tensor):
            inputs.append([name, self.tid(value)])
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) or v is None for v in value):
            for j, v in enumerate(value):
                if v is not None:
                    inputs.append([f"{name}[{j}]", self.tid(v)])
        elif isinstance(value, (bool, float, int)) and not isinstance(value, torch.SymInt):
            scalars.append([name, value])
        elif isinstance(value, torch.dtype):
            scalars.append([name, str(value).removeprefix("torch.")])

    # -- module calls and checkpoint regions -------------------------------------------------------
    @contextlib.contextmanager
    def module_hooks(self):
        def pre(module, args):
            path = self.module_names.get(id(module))
            if path is None:
                return
            idx = self.module_idx(path)
            self.module_stack.append(idx)
            self._open_calls.append((idx, len(self.graph.ops), self._tensor_ids(args)))

        def post(module, args, output):
            path = self.module_names.get(id(module))
            if path is None:
                return
            idx, start, in_tids = self._open_calls.pop()
            self.module_stack.pop()
            if any(True for _ in module.parameters(recurse=False)):
                self.graph.calls.append([idx, start, len(self.graph.ops) - 1, in_tids,
                                         self._tensor_ids(output)])

        from vramplan.simulate.tracker import global_module_hooks

        with global_module_hooks(pre, post):
            yield

    def _tensor_ids(self, value) -> list:
        from torch.utils._pytree import tree_flatten

        return [self.tid(t) for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)
                and t.device.type != "meta"]

    def checkpoint_func(self):
        """A `gradient_checkpointing_func` for diffusers that records the region and runs it plainly."""
        def run(module, *args):
            path = self.module_names.get(id(module), "?")
            start = len(self.graph.ops)
            in_tids = self._tensor_ids(args)
            out = module(*args)
            self.graph.regions.append([self.module_idx(path), start, len(self.graph.ops) - 1, in_tids,
                                       self._tensor_ids(out)])
            return out
        return run

    @contextlib.contextmanager
    def autograd_functions(self):
        """Record where custom `torch.autograd.Function`s run (peft's LoHa `HadaWeight`...):
        their inner ops run without autograd; the function is one node that keeps its inputs."""
        function_cls = torch.autograd.Function
        original = function_cls.__dict__["apply"]
        recorder = self

        @classmethod
        def apply(cls, *args, **kwargs):
            start = len(recorder.graph.ops)
            in_tids = recorder._tensor_ids(args)
            out = original.__func__(cls, *args, **kwargs)
            recorder.graph.functions.append([recorder.module_stack[-1] if recorder.module_stack else 0,
                                             start, len(recorder.graph.ops) - 1, in_tids,
                                             recorder._tensor_ids(out), cls.__name__])
            return out

        function_cls.apply = apply
        try:
            yield
        finally:
            function_cls.apply = original

    def mark(self, name: str) -> None:
        self.graph.markers[name] = len(self.graph.ops) - 1


@contextlib.contextmanager
def no_saved_tensors():
    """Autograd builds its graph but keeps no saved tensor (lifetimes stay Python's own)."""
    with torch.autograd.graph.saved_tensors_hooks(lambda t: None, lambda p: None):
        yield

"""Record what one adapted layer does, with symbolic sizes: the templates the analytic tier
splices into a recorded base graph wherever a method wraps a module.

A template is the real peft layer (LoRA / LoHa / LoKr, as the method's `peft_config` builds it)
or hypernetwork wrapper around one Linear or Conv2d, run on fake tensors whose sizes are symbols:
the input's leading dims (D0, D1 or D0, D2, D3), the layer's widths (IN, OUT; LoKr's factors
IM, IN_N, OL, OK) and the rank R. Weight dims that are products (IN*k*k, IM*IN_N) are built from
the same symbols, so every formula stays exact for any size. One template per (method, layer
kind, bias, precision variant, input dtype[, LoKr regime]) -- a few dozen, model independent.
"""

from __future__ import annotations

import contextlib
import time

import sympy
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from vramplan.simulate.autocast_policy import autocast_region, cuda_autocast_policy
from vramplan.simulate.bnb_paths import cuda_bitsandbytes
from vramplan.simulate.record import GraphRecorder, no_saved_tensors
from vramplan.simulate.record_model import VARIANTS, _symbolic, symbolic_interpolate
from vramplan.simulate.variants import DtypePolicy

# Hints for the symbols: distinct, > 3 (kernel sizes stay concrete), no two products equal.
LINEAR_HINTS = {"D0": 9, "D1": 14, "IN": 40, "OUT": 56, "R": 6}
CONV_HINTS = {"D0": 9, "D2": 22, "D3": 26, "IN": 40, "OUT": 56, "R": 6}
LOKR_HINTS = {"IM": 6, "IN_N": 11, "OL": 7, "OK": 13}   # in 66 = 6*11, out 91 = 7*13


def _sym(name: str):
    return sympy.Symbol(name, integer=True, positive=True)


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.target = layer


def template_key(method: str, kind: str, bias: bool, variant: str, x_dtype: str, regime: str = "") -> str:
    return "|".join([method, kind, "bias" if bias else "nobias", variant, x_dtype] + ([regime] if regime else []))


def record_template(method: str, kind: str, bias: bool, variant: str, x_dtype: str,
                    regime: str = "", layers=(1, 2, 1)):
    """`kind`: "linear2", "linear3" (input rank) or "conv:k3:s1:p1" / "conv:k1:s1:p0" / ...
    `regime` (LoKr): "w2" (full w2) or "w2ab" (w2 decomposed). Returns the recorded Graph."""
    from vramplan.methods import get_method
    from vramplan.spec import Method, build_spec

    from vramplan.simulate.record_model import split_quant

    base_variant, quant = split_quant(variant)
    precision, _ = VARIANTS[base_variant]
    policy = DtypePolicy(precision)
    conv = kind.startswith("conv")
    hints = dict(CONV_HINTS if conv else LINEAR_HINTS)
    if method == "lokr":
        hints.pop("IN"), hints.pop("OUT")
        hints.update(LOKR_HINTS)
        # peft decomposes w2 when r < max(out_k, in_n) / 2 = 6.5
        hints["R"] = 5 if regime == "w2ab" else 17
    if method == "hypernetwork":
        hints.pop("R")
    k = s = p = 1
    if conv:
        _, kk, ss, pp = kind.split(":")
        k, s, p = int(kk[1:]), int(ss[1:]), int(pp[1:])
    in_dim = hints["IM"] * hints["IN_N"] if method == "lokr" else hints["IN"]
    out_dim = hints["OL"] * hints["OK"] if method == "lokr" else hints["OUT"]

    with torch.device("meta"):
        base = nn.Conv2d(in_dim, out_dim, k, stride=s, padding=p, bias=bias) if conv \
            else nn.Linear(in_dim, out_dim, bias=bias)
    holder = _Holder(base)
    if quant.value != "none":
        from vramplan.step.quantize import quantize_linears

        quantize_linears(holder, quant, policy.low, "meta")
    if method == "hypernetwork":
        from vramplan.step.modules import HyperLinear, HypernetworkMLP

        with torch.device("meta"):
            holder.target = HyperLinear(base, HypernetworkMLP(in_dim, layers))
        adapter_names = ("hyper.",)
    else:
        from peft import inject_adapter_in_model

        spec = build_spec({"method": method, "rank": hints["R"], "alpha": hints["R"]})
        inject_adapter_in_model(get_method(Method(method)).peft_config(spec, ["target"]), holder)
        adapter_names = ("lora_", "hada_", "lokr_")
        if method in ("loha", "lokr"):
            holder.target.eval()   # skips the module-dropout draw (dropouts are 0), see NOTES.md

    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env, static_shapes=False)
    names = list(hints)
    dummy = _symbolic(mode, tuple(hints[n] for n in names), [True] * len(names), torch.float32)
    sym = dict(zip(names, dummy.shape))
    symbols = {v.node.expr: _sym(n) for n, v in sym.items()}
    if method == "lokr":
        sym["IN"], sym["OUT"] = sym["IM"] * sym["IN_N"], sym["OL"] * sym["OK"]
    by_value = {}
    for name, value in sym.items():
        hint = hints.get(name, in_dim if name == "IN" else out_dim if name == "OUT" else None)
        by_value[hint] = value
    for name in ("IN", "IN_N"):
        if name in sym and conv:
            by_value[hints.get(name, in_dim) * k * k] = sym[name] * (k * k)
    if method == "hypernetwork":
        for w in layers:
            if w != 1:
                by_value[int(in_dim * w)] = sym["IN"] * w if float(w).is_integer() else None

    def symbolic_shape(shape):
        out = []
        for d in shape:
            v = by_value.get(d)
            out.append(int(v) if isinstance(v, float) else (v if v is not None else d))
        return out

    recorder = GraphRecorder(symbols)
    started = time.time()
    with mode:
        done = {}
        from vramplan.step.quantize import quant_tensors, symbolic_quantized_weight, is_quantized

        for mod_name, mod in holder.named_modules():
            for pname, param in list(mod._parameters.items()):
                if param is None:
                    continue
                full = f"{mod_name}.{pname}" if mod_name else pname
                if pname == "weight" and is_quantized(mod):
                    mod._parameters[pname] = symbolic_quantized_weight(mod, sym["OUT"], sym["IN"], policy.low)
                    continue
                adapter = any(a in full for a in adapter_names)
                dtype = policy.trainable if adapter else policy.frozen
                if id(param) not in done:
                    done[id(param)] = nn.Parameter(torch.empty(symbolic_shape(param.shape), dtype=dtype),
                                                   requires_grad=adapter)
                mod._parameters[pname] = done[id(param)]
        for name, param in holder.named_parameters():
            role = "adapter" if any(a in name for a in adapter_names) else "base"
            relative = name.removeprefix("target.").replace(".default", "")
            recorder.tid(param, param=f"{role}:{relative}")
            for extra, tensor in quant_tensors(param).items():
                recorder.tid(tensor, param=f"{role}:{relative}.{extra}")
        for name, mod in holder.named_modules():
            recorder.module_names[id(mod)] = name.removeprefix("target").lstrip(".")
        if conv:
            x = torch.empty(sym["D0"], sym["IN"], sym["D2"], sym["D3"], dtype=getattr(torch, x_dtype))
        elif kind == "linear2":
            x = torch.empty(sym["D0"], sym["IN"], dtype=getattr(torch, x_dtype))
        else:
            x = torch.empty(sym["D0"], sym["D1"], sym["IN"], dtype=getattr(torch, x_dtype))
        recorder.graph.inputs["x"] = recorder.tid(x)
        with contextlib.ExitStack() as stack:
            stack.enter_context(cuda_autocast_policy())
            stack.enter_context(symbolic_interpolate())
            stack.enter_context(cuda_bitsandbytes(symbolic=True))
            stack.enter_context(recorder)
            stack.enter_context(recorder.module_hooks())
            stack.enter_context(recorder.autograd_functions())
            stack.enter_context(no_saved_tensors())
            region = autocast_region(policy.low) if policy.autocast else contextlib.nullcontext()
            with region:
                y = holder.target(x)
                recorder.after_last_op = True   # what dies from here on dies with the autocast cache
            recorder.mark("autocast_exit")
            recorder.graph.outputs["y"] = recorder.tid(y)
            del y
            recorder.mark("end")
    graph = recorder.graph
    graph.guards = [str(g.expr.xreplace(symbols)) for g in env.guards]
    graph.meta = {"template": template_key(method, kind, bias, variant, x_dtype, regime),
                  "hints": hints, "torch": torch.__version__, "seconds": round(time.time() - started, 2)}
    return graph

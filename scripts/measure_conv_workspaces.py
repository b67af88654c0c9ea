"""Measure the cuDNN workspace of every convolution the shipped models run, on this machine's GPU.

    python scripts/measure_conv_workspaces.py --out conv_workspaces.json [--deadline 150]
    python scripts/measure_conv_workspaces.py --list          # the cases, no GPU needed

Why: a CUDA convolution asks cuDNN for a workspace, which PyTorch takes from the caching
allocator for the length of the call. The first GPU campaign (profiles/h200) found it to be the
largest thing the estimator did not count: SDXL's VAE encoder at 1024 px allocates a 1.0 GiB
workspace on top of a 0.5 GiB output (scripts/gpu_trace.py, resnet conv2 of its first down
block), which made SDXL LoRA with checkpointing 6-11 % under. Its size is whatever plan cuDNN's
heuristics pick for the shape, dtype and card, so it is measured, not derived.

Cases: each distinct convolution of the recorded graphs (vramplan/models/traces: every model's
denoiser and VAE) at batch 1, 2, 4, 8 and 512, 768 and 1024 px, in float32, float16 and bfloat16;
the forward for all, and for the denoiser's also the three backward kinds training runs
(grad of the input only: adapters and a frozen conv; of the weight and bias only: the first conv
of a trained model, measured for that conv alone; both: full fine-tuning). Each is run once on tensors of its shape and the
allocator's peak above its inputs and outputs is its workspace (`extra_bytes`). The shipped
models come first and the biggest cases last, so a deadline cuts what matters least.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODELS = ("sd15", "sdxl", "sd21", "sd35-medium", "flux-dev")
RESOLUTIONS = (512, 1024, 768)
BATCHES = (1, 2, 4, 8)
DTYPES = ("float16", "bfloat16", "float32")
BACKWARD = {"input": (True, False, False), "weight": (False, True, True), "both": (True, True, True)}


def conv_shapes(model: str, component: str, variant: str, batch: int, pixels: int) -> list[tuple]:
    """(N, Cin, H, W, Cout, kh, kw, stride, padding, groups) of each convolution of one recorded
    graph at a size, keyed as the estimator looks them up (`conv_workspaces.conv_key`: stride
    and padding read back from the recorded input/output shapes)."""
    from vramplan.estimate.concrete import concretize
    from vramplan.estimate.conv_workspaces import conv_key
    from vramplan.estimate.graph import load_graph

    graph = load_graph(model, f"{component}.{variant}.sdpa")
    side = pixels if component == "vae" else pixels // 8     # the denoisers' H, W are latent
    concrete = concretize(graph, {"B": batch, "H": side, "W": side})
    out = []
    for op in concrete.ops:
        if concrete.opnames[op[0]] != "convolution.default":
            continue
        args = dict(op[2])
        x, w, y = concrete.t_shape[args["input"]], concrete.t_shape[args["weight"]], concrete.t_shape[op[3][0]]
        key = conv_key(x, w, y)
        if key is not None:
            out.append(key)
    return out   # in graph order: the first is the model's input convolution


def cases() -> list[dict]:
    seen, out = set(), []
    for model in MODELS:
        denoiser = "unet" if model in ("sd15", "sdxl", "sd21") else "transformer"
        for pixels in RESOLUTIONS:
            for batch in BATCHES:
                for component, variant in ((denoiser, "amp-frozen"), ("vae", "pure")):
                    for index, shape in enumerate(conv_shapes(model, component, variant, batch, pixels)):
                        for dtype in DTYPES:
                            kinds = ("forward",)
                            if component != "vae":   # the VAE is frozen: it never runs backward
                                # only the input convolution has no input gradient to make
                                kinds += ("input", "both") + (("weight",) if index == 0 else ())
                            for kind in kinds:
                                key = shape + (dtype, kind)
                                if key not in seen:
                                    seen.add(key)
                                    out.append({"model": model, "component": component,
                                                "shape": list(shape), "dtype": dtype, "kind": kind})
    return out


def measure(case: dict, torch) -> dict:
    n, cin, h, w, cout, kh, kw, stride, padding, groups = case["shape"]
    dtype = getattr(torch, case["dtype"])
    cuda = torch.cuda
    x = torch.empty((n, cin, h, w), dtype=dtype, device="cuda")
    weight = torch.empty((cout, cin // groups, kh, kw), dtype=dtype, device="cuda")
    bias = torch.empty((cout,), dtype=dtype, device="cuda")
    conv = (x, weight)
    args = ((stride, stride), (padding, padding), (1, 1), False, (0, 0), groups)
    cuda.synchronize()
    cuda.reset_peak_memory_stats()
    base = cuda.memory_allocated()
    started = time.perf_counter()
    if case["kind"] == "forward":
        outputs = [torch.ops.aten.convolution(x, weight, bias, *args)]
    else:
        ho = (h + 2 * padding - kh) // stride + 1
        wo = (w + 2 * padding - kw) // stride + 1
        grad = torch.empty((n, cout, ho, wo), dtype=dtype, device="cuda")
        cuda.synchronize()
        cuda.reset_peak_memory_stats()
        base = cuda.memory_allocated()
        outputs = [t for t in torch.ops.aten.convolution_backward(
            grad, *conv, [cout], *args, list(BACKWARD[case["kind"]])) if t is not None]
    cuda.synchronize()
    seconds = time.perf_counter() - started
    out_bytes = sum(-(-t.untyped_storage().nbytes() // 512) * 512 for t in outputs)
    extra = cuda.max_memory_allocated() - base - out_bytes
    del outputs
    return dict(case, extra_bytes=int(extra), out_bytes=int(out_bytes), seconds=round(seconds, 5))


def write(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--deadline", type=float, default=150.0, help="seconds; stop measuring after")
    parser.add_argument("--list", action="store_true", help="print the cases and stop")
    args = parser.parse_args(argv)
    todo = cases()
    if args.list:
        for case in todo:
            print(json.dumps(case))
        print(f"{len(todo)} cases", file=sys.stderr)
        return 0
    import torch

    started = time.monotonic()
    torch.backends.cudnn.benchmark = False      # what a training run uses (PyTorch's default)
    props = torch.cuda.get_device_properties(0)
    # one small convolution first: cuDNN's handle and library load are no case's workspace
    torch.ops.aten.convolution(torch.ones(1, 4, 8, 8, device="cuda"), torch.ones(4, 4, 3, 3, device="cuda"),
                               None, (1, 1), (1, 1), (1, 1), False, (0, 0), 1)
    environment = {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}",
                   "torch": torch.__version__, "cuda": torch.version.cuda,
                   "cudnn": torch.backends.cudnn.version(),
                   "allow_tf32": torch.backends.cudnn.allow_tf32}
    results, failed = [], []
    for number, case in enumerate(todo):
        if time.monotonic() - started > args.deadline:
            print(f"deadline: {len(todo) - number} cases not measured", file=sys.stderr)
            break
        try:
            results.append(measure(case, torch))
        except Exception as error:  # noqa: BLE001 - an out-of-memory or a refused shape is noted
            failed.append(dict(case, error=f"{type(error).__name__}: {str(error)[:200]}"))
            torch.cuda.empty_cache()
        if number % 500 == 0 and args.out:
            write(args.out, {"environment": environment, "cases": results, "failed": failed})
    torch.cuda.empty_cache()
    if args.out:
        write(args.out, {"environment": environment, "cases": results, "failed": failed,
                         "seconds": round(time.monotonic() - started, 1), "total_cases": len(todo)})
    print(f"{len(results)} measured, {len(failed)} failed, of {len(todo)}, in "
          f"{time.monotonic() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

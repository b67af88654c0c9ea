"""cuDNN convolution workspaces: how much a CUDA convolution borrows from the caching allocator.

A convolution on CUDA runs the plan cuDNN's heuristics pick for its shape, dtype and card, and
PyTorch allocates that plan's workspace from the caching allocator for the length of the call.
It is invisible to a tensor count and it is large: SDXL's VAE encoder at 1024 px borrows 1.0 GiB
for a 3x3 convolution whose output is 0.5 GiB, which is the step's peak when the denoiser uses
gradient checkpointing (profiles/h200: SDXL LoRA with checkpointing was 6-11 % under before this).

The sizes are measured, not derived: `data/cudnn-workspaces.json` holds the allocator's peak
above inputs and outputs for each convolution of the shipped models' recorded graphs, at batch
1/2/4/8 and 512/768/1024 px, in float32 (TF32 allowed, PyTorch's default), float16 and bfloat16,
forward and the three backward kinds, measured by `scripts/measure_conv_workspaces.py` on an
NVIDIA H200 (compute capability 9.0, torch 2.11.0+cu130, cuDNN 9.19.0; its `source` field).
Other sizes of a measured convolution are interpolated linearly in output elements N*Ho*Wo,
and extrapolated past the largest along the last segment. The workspace mostly follows N*Ho*Wo
-- measured points of equal N*Ho*Wo but other N and Ho agree at the median, and where the
workspace exceeds 64 MiB they are at most 13 % apart -- but smaller plans can differ by up to
52 MiB (cuDNN picked another plan), so a size between measured ones is not exact; where two
measured points share N*Ho*Wo the larger workspace is taken. A convolution the table does not hold (a local model's
unusual channel count, a transposed convolution) gets none, and other cards' heuristics may pick
other plans: both are limits of a table measured on one card.
"""

from __future__ import annotations

import bisect
import json
from functools import lru_cache
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data" / "cudnn-workspaces.json"
KINDS = ("forward", "input", "weight", "both")   # backward kinds: which gradients it makes


def conv_key(x: tuple, w: tuple, y: tuple) -> tuple | None:
    """(N, Cin, H, W, Cout, kh, kw, stride, padding, groups) of a 2-d convolution from its input,
    weight and output shapes: the smallest stride, then padding, giving the output size (no
    dilation). None for what that cannot explain (a transposed convolution, 1-d or 3-d)."""
    if len(x) != 4 or len(w) != 4 or len(y) != 4 or not w[1]:
        return None
    n, cin, h, wd = x
    cout, per_group, kh, kw = w
    if cin % per_group:
        return None
    ho, wo = y[2], y[3]
    for stride in range(1, max(kh, kw, 2) + 1):
        for padding in range(0, max(kh, kw)):
            if (h + 2 * padding - kh) // stride + 1 == ho and (wd + 2 * padding - kw) // stride + 1 == wo:
                return (n, cin, h, wd, cout, kh, kw, stride, padding, cin // per_group)
    return None


def config_of(key: tuple, dtype: str, kind: str) -> str:
    """The table's key: everything but the sizes that the workspace is interpolated over."""
    _, cin, _, _, cout, kh, kw, stride, padding, groups = key
    return f"{cin},{cout},{kh},{kw},{stride},{padding},{groups},{dtype},{kind}"


def output_elements(key: tuple) -> int:
    n, _, h, w, _, kh, kw, stride, padding, _ = key
    return n * ((h + 2 * padding - kh) // stride + 1) * ((w + 2 * padding - kw) // stride + 1)


def compact(measured: dict) -> dict:
    """scripts/measure_conv_workspaces.py's output as the shipped table: per config, the points
    [N, H, W, workspace bytes] sorted by output elements."""
    table: dict[str, list] = {}
    for case in measured["cases"]:
        key = tuple(case["shape"])
        table.setdefault(config_of(key, case["dtype"], case["kind"]), []).append(
            [key[0], key[2], key[3], int(case["extra_bytes"])])
    for config, points in table.items():
        shape = tuple(int(v) for v in config.split(",")[:7])
        points.sort(key=lambda p: (output_elements((p[0], shape[0], p[1], p[2]) + shape[1:]), p))
    return {"source": dict(measured["environment"], script="scripts/measure_conv_workspaces.py",
                           cases=len(measured["cases"])),
            "convs": dict(sorted(table.items()))}


@lru_cache(maxsize=1)
def _table() -> dict:
    with open(DATA) as f:
        convs = json.load(f)["convs"]
    index = {}
    for config, points in convs.items():
        shape = tuple(int(v) for v in config.split(",")[:7])
        exact = {(n, h, w): extra for n, h, w, extra in points}
        curve: dict[int, int] = {}
        for n, h, w, extra in points:   # one value per output size: the largest measured
            e = output_elements((n, shape[0], h, w) + shape[1:])
            curve[e] = max(curve.get(e, 0), extra)
        xs = sorted(curve)
        index[config] = (exact, xs, [curve[x] for x in xs])
    return index


def source() -> dict:
    with open(DATA) as f:
        return json.load(f)["source"]


@lru_cache(maxsize=4096)
def workspace_bytes(key: tuple | None, dtype: str, kind: str) -> int:
    """The measured (or interpolated) workspace of one convolution call; 0 where none is known."""
    if key is None:
        return 0
    entry = _table().get(config_of(key, dtype, kind))
    if entry is None:
        return 0
    exact, xs, ys = entry
    hit = exact.get((key[0], key[2], key[3]))
    if hit is not None:
        return hit
    e = output_elements(key)
    i = bisect.bisect_left(xs, e)
    if i == 0:
        return ys[0]          # below the smallest measured size: its workspace (they level off)
    if i == len(xs):
        if len(xs) == 1:
            return ys[-1]
        i -= 1                # past the largest: along the last segment
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(0, round(y0 + (y1 - y0) * (e - x0) / (x1 - x0)))


def backward_kind(input_grad: bool, weight_grad: bool) -> str | None:
    if input_grad and weight_grad:
        return "both"
    if input_grad:
        return "input"
    if weight_grad:
        return "weight"
    return None

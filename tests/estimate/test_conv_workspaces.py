"""cuDNN convolution workspaces: the measured table, its lookup, and both tiers adding them."""

import json

import pytest
import torch

from vramplan.estimate import conv_workspaces as cw
from vramplan.estimate.conv_workspaces import backward_kind, conv_key, workspace_bytes

MIB = 2**20


@pytest.mark.parametrize("n, cin, h, w, cout, k, stride, padding", [
    (1, 128, 1024, 1024, 128, 3, 1, 1), (2, 320, 64, 64, 320, 3, 2, 1), (1, 128, 1025, 1025, 128, 3, 2, 0),
    (4, 640, 32, 32, 1280, 1, 1, 0), (1, 16, 128, 128, 1536, 2, 2, 0), (3, 8, 17, 23, 8, 5, 3, 2)])
def test_conv_key_reads_stride_and_padding_back_from_the_shapes(n, cin, h, w, cout, k, stride, padding):
    x, weight = torch.empty(n, cin, h, w, device="meta"), torch.empty(cout, cin, k, k, device="meta")
    y = torch.nn.functional.conv2d(x, weight, stride=stride, padding=padding)
    key = conv_key(tuple(x.shape), tuple(weight.shape), tuple(y.shape))
    # the key is the smallest stride and padding giving that output: the same convolution
    assert key[:7] == (n, cin, h, w, cout, k, k) and key[9] == 1
    again = torch.nn.functional.conv2d(x, weight, stride=key[7], padding=key[8])
    assert again.shape == y.shape


def test_conv_key_groups_and_what_it_cannot_explain():
    assert conv_key((1, 64, 8, 8), (64, 16, 3, 3), (1, 64, 8, 8))[9] == 4
    assert conv_key((1, 64, 8, 8), (64, 16, 3, 3, 3), (1, 64, 8, 8)) is None      # 3-d
    assert conv_key((1, 4, 8, 8), (4, 4, 3, 3), (1, 4, 17, 17)) is None            # transposed
    assert workspace_bytes(None, "float16", "forward") == 0


def test_the_measured_h200_figure_of_sdxls_vae():
    # scripts/gpu_trace.py on the H200: SDXL's VAE encoder, resnet conv2 of down block 0 at
    # 1024 px in float32 allocated a 1,080,623,667-byte workspace (rounded to 512 by the allocator)
    key = (1, 128, 1024, 1024, 128, 3, 3, 1, 1, 1)
    assert workspace_bytes(key, "float32", "forward") == 1_080_624_128
    # and the UNet's 1280-channel 3x3 at 32x32 in bfloat16 (SDXL at 1024 px): 38,666,895 bytes
    assert workspace_bytes((1, 1280, 32, 32, 1280, 3, 3, 1, 1, 1), "bfloat16", "forward") == 38_667_264


def test_sizes_between_and_beyond_the_measured_are_interpolated():
    exact, xs, ys = cw._table()["128,128,3,3,1,1,1,float16,forward"]
    assert xs == sorted(xs) and len(xs) >= 8
    # 640 px, batch 1 (409,600 output elements): between 512 px (262,144) and 512 px x 2 (524,288)
    key = (1, 128, 640, 640, 128, 3, 3, 1, 1, 1)
    e = 640 * 640
    i = next(j for j, x in enumerate(xs) if x >= e)
    expected = ys[i - 1] + (ys[i] - ys[i - 1]) * (e - xs[i - 1]) / (xs[i] - xs[i - 1])
    assert workspace_bytes(key, "float16", "forward") == round(expected)
    assert min(ys[i - 1], ys[i]) <= round(expected) <= max(ys[i - 1], ys[i])
    # smaller than anything measured: the smallest measured workspace
    assert workspace_bytes((1, 128, 64, 64, 128, 3, 3, 1, 1, 1), "float16", "forward") == ys[0]
    # batch 16 at 1024 px: along the last segment (float16 here: 512 bytes per output element)
    beyond = workspace_bytes((16, 128, 1024, 1024, 128, 3, 3, 1, 1, 1), "float16", "forward")
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    assert beyond == round(ys[-1] + slope * (16 * 1024 * 1024 - xs[-1]))
    assert 8 * 2**30 - 64 * MIB < beyond < 8 * 2**30 + 64 * MIB
    # a convolution no model of the catalog has: none known
    assert workspace_bytes((1, 7, 64, 64, 9, 3, 3, 1, 1, 1), "float16", "forward") == 0


def test_every_convolution_of_the_shipped_graphs_is_in_the_table():
    """At the campaign's sizes every convolution has its exact measured point (SD 1.5 at 512 px
    and SDXL at 1024 px, batch 1-8, every dtype and each backward kind a method runs)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "measure_conv_workspaces.py"
    spec = importlib.util.spec_from_file_location("measure_conv_workspaces", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = cw._table()
    cases = module.cases()
    assert len(cases) > 4000
    missing = [c for c in cases
               if (tuple(c["shape"])[0], tuple(c["shape"])[2], tuple(c["shape"])[3])
               not in table.get(cw.config_of(tuple(c["shape"]), c["dtype"], c["kind"]), ({},))[0]]
    assert missing == []
    assert cw.source()["gpu"] == "NVIDIA H200" and cw.source()["cudnn"] == 91900


def test_compact_keeps_every_point():
    measured = {"environment": {"gpu": "X"}, "cases": [
        {"shape": [2, 4, 8, 8, 4, 3, 3, 1, 1, 1], "dtype": "float16", "kind": "forward", "extra_bytes": 2048},
        {"shape": [1, 4, 8, 8, 4, 3, 3, 1, 1, 1], "dtype": "float16", "kind": "forward", "extra_bytes": 1024},
        {"shape": [1, 4, 8, 8, 4, 3, 3, 1, 1, 1], "dtype": "float16", "kind": "input", "extra_bytes": 512}]}
    table = cw.compact(measured)
    assert table["source"]["gpu"] == "X" and table["source"]["cases"] == 3
    assert table["convs"]["4,4,3,3,1,1,1,float16,forward"] == [[1, 8, 8, 1024], [2, 8, 8, 2048]]
    assert table["convs"]["4,4,3,3,1,1,1,float16,input"] == [[1, 8, 8, 512]]
    json.dumps(table)


def test_backward_kind():
    assert backward_kind(True, True) == "both" and backward_kind(True, False) == "input"
    assert backward_kind(False, True) == "weight" and backward_kind(False, False) is None


# -- both tiers add them -------------------------------------------------------------------------

def test_the_estimate_borrows_the_vae_workspace_at_sdxls_checkpointed_peak(h):
    """SDXL LoRA with checkpointing peaks in the VAE encoder (profiles/h200: 10.07 GiB measured):
    the peak holds the 1 GiB workspace of the float32 3x3 convolution in flight."""
    from vramplan.footprint import Category

    fp = h.estimate(model="sdxl", method="lora", precision="bf16", gradient_checkpointing=True,
                    gpu="h200").footprint
    assert fp.peak_phase.endswith("encode")
    assert fp.category_bytes(Category.WORKSPACES) >= 1_080_624_128
    cached = h.estimate(model="sdxl", method="lora", precision="bf16", gradient_checkpointing=True,
                              gpu="h200", cache_latents=True).footprint
    assert not cached.peak_phase.endswith("encode")     # no VAE, no such peak


def test_the_tracker_adds_them_for_fake_cuda_steps_only():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from vramplan.footprint import Category
    from vramplan.simulate.tracker import MemoryTracker

    def run(flag):
        tracker = MemoryTracker(conv_workspaces=flag)
        with FakeTensorMode():
            x = torch.empty(1, 320, 64, 64, dtype=torch.float16, requires_grad=True)
            w = torch.empty(320, 320, 3, 3, dtype=torch.float16)
            with tracker:
                y = torch.nn.functional.conv2d(x, w, padding=1)
                y.sum().backward()
        return [r for r in tracker.records.values() if r.category is Category.WORKSPACES]

    assert run(False) == []
    forward, backward = run(True)
    key = (1, 320, 64, 64, 320, 3, 3, 1, 1, 1)
    assert forward.nbytes == workspace_bytes(key, "float16", "forward") > 0
    assert backward.nbytes == workspace_bytes(key, "float16", "input") > 0    # the weight is frozen
    assert forward.free_at == forward.alloc_at + 1 and backward.op == "convolution_backward"

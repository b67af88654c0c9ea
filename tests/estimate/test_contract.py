"""The JSON contract of `estimate(spec).to_json()` (issue 2) and the identities between its totals."""

import json
import os
import subprocess
import sys

import pytest

from vramplan.footprint import Category
from vramplan.spec import build_spec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The top-level keys, and the extras the result documents (phase breakdown and notes).
CONTRACT = {"spec", "parameters", "categories", "peak_allocated_bytes", "peak_reserved_bytes",
            "device_used_bytes", "gpu", "fits", "headroom_bytes"}
EXTRAS = {"peak_phase", "phases", "notes"}
REQUIRED_CATEGORIES = {"frozen_weights", "trainable_weights", "block_slack", "cuda_context",
                       "allocator_reserve"}
ALL_CATEGORIES = {c.value for c in Category}
METHODS = ["full", "dreambooth", "lora", "loha", "lokr", "textual-inversion", "hypernetwork"]


@pytest.mark.parametrize("method", METHODS)
def test_top_level_keys(h, method):
    data = h.estimate(method=method, gpu="16GB").to_json()
    adapter = method not in ("full", "dreambooth")
    assert set(data) == CONTRACT | EXTRAS | ({"adapter_file_bytes"} if adapter else set())
    if adapter:
        assert isinstance(data["adapter_file_bytes"], int) and data["adapter_file_bytes"] > 0


@pytest.mark.parametrize("method", METHODS)
def test_values_and_identities(h, method):
    est = h.estimate(method=method, gpu="16GB")
    data = est.to_json()
    assert json.loads(json.dumps(data)) == data
    assert data["spec"] == est.spec.to_json() and data["spec"]["method"] == method
    assert data["gpu"] == {"name": "16GB card", "memory_bytes": 16 * 10**9}

    assert set(data["parameters"]) == {"unet", "vae", "text_encoder"}
    for counts in data["parameters"].values():
        assert set(counts) == {"total", "trainable"}
        assert all(isinstance(v, int) for v in counts.values())
        assert 0 <= counts["trainable"] <= counts["total"]

    categories = data["categories"]
    assert REQUIRED_CATEGORIES <= set(categories) <= ALL_CATEGORIES
    assert all(isinstance(v, int) and v >= 0 for v in categories.values())
    assert categories.get("optimizer_states", 0) > 0    # the second step runs with states resident

    allocated = data["peak_allocated_bytes"]
    # the categories are the composition at the peak plus the allocator's whole-block slack:
    # outside context and reserve they sum to it
    inside = sum(v for k, v in categories.items() if k not in ("cuda_context", "allocator_reserve"))
    assert inside == allocated
    assert data["peak_reserved_bytes"] >= allocated
    assert data["peak_reserved_bytes"] == allocated + categories["allocator_reserve"]
    assert data["device_used_bytes"] == data["peak_reserved_bytes"] + categories["cuda_context"]
    assert sum(categories.values()) == data["device_used_bytes"]
    assert data["headroom_bytes"] == 16 * 10**9 - data["device_used_bytes"]
    assert data["fits"] is (data["headroom_bytes"] >= 0)

    assert data["peak_phase"] in [p["phase"] for p in data["phases"]]
    # the phases' peaks are the tensors' (no block slack)
    assert max(p["peak_bytes"] for p in data["phases"]) == allocated - categories["block_slack"]
    assert categories["block_slack"] > 0      # SD 1.5's weights alone leave some
    assert all(isinstance(n, str) for n in data["notes"])


def test_no_gpu_means_no_verdict(h):
    data = h.estimate().to_json()
    assert data["gpu"] is None and data["fits"] is None and data["headroom_bytes"] is None


def test_a_card_too_small_does_not_fit(h):
    est = h.estimate(method="full", precision="fp32", gpu="16GB")
    assert est.fits is False and est.headroom_bytes < 0
    assert est.to_json()["fits"] is False
    assert h.estimate(method="full", precision="fp32", gpu="a100-80g").fits is True


def test_the_gpu_changes_the_verdict_not_the_tensors(h):
    plain, card = h.estimate(), h.estimate(gpu="rtx4090")
    assert card.to_json()["gpu"] == {"name": "NVIDIA GeForce RTX 4090 24 GB", "memory_bytes": 24564 * 2**20}
    # off Hopper the cuBLAS workspaces are the same size: everything the allocator holds is equal
    inside = [c for c in Category if c.in_allocator]
    assert [card.footprint.category_bytes(c) for c in inside] == [plain.footprint.category_bytes(c) for c in inside]
    assert card.footprint.peak_allocated_bytes == plain.footprint.peak_allocated_bytes
    hopper = h.estimate(gpu="h100").footprint
    # cuBLAS takes a 32 MiB workspace per handle on compute capability 9.0 (two handles), and
    # cuBLASLt 1 MiB on the thread that runs Linear-with-bias forwards (the main one: no
    # checkpointing reruns them on autograd's); SD 1.5 LoRA's peak has no convolution in flight
    assert hopper.category_bytes(Category.WORKSPACES) == 2 * 32 * 2**20 + 2**20


def test_estimate_is_deterministic():
    from vramplan.estimate import estimate

    spec = build_spec({"method": "loha", "rank": 8})
    assert estimate(spec).to_json() == estimate(spec).to_json()


def test_the_analytic_path_imports_no_torch():
    code = ("import sys; from vramplan.spec import build_spec; from vramplan.estimate import estimate; "
            "estimate(build_spec({})); estimate(build_spec({'method': 'full', 'gpu': '16GB'})); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

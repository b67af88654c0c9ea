"""Hypernetworks (A1111 / NovelAI): one pair of MLPs per cross-attention context width."""

import os

import pytest
import torch

from vramplan.errors import UsageError
from vramplan.methods import get_method
from vramplan.methods.hypernetwork import context_widths
from vramplan.models.inventory import load_inventory, load_model_inventories
from vramplan.spec import Method, build_spec

HN = get_method(Method.HYPERNETWORK)


class HypernetworkModule(torch.nn.Module):
    """A1111's HypernetworkModule with its defaults (linear activation, no norm, no dropout)."""

    def __init__(self, dim, layer_structure):
        super().__init__()
        self.linear = torch.nn.Sequential(*[
            torch.nn.Linear(int(dim * layer_structure[i]), int(dim * layer_structure[i + 1]))
            for i in range(len(layer_structure) - 1)])


def a1111_state(widths, layers) -> dict:
    return {f"{w}.{j}.{k}": v for w in widths for j in (0, 1)
            for k, v in HypernetworkModule(w, layers).state_dict().items()}


@pytest.mark.parametrize("model,width", [("sd15", 768), ("sd21", 1024), ("sdxl", 2048)])
def test_context_widths(model, width):
    assert context_widths(load_inventory(model, "unet")) == [width]


@pytest.mark.parametrize("layers", ["1,2,1", "1,1.5,0.5,1", "1,0.3,1"])
@pytest.mark.parametrize("model", ["sd15", "sd21", "sdxl"])
def test_counts_match_a1111_modules(model, layers):
    spec = build_spec({"model": model, "method": "hypernetwork", "hypernetwork_layers": layers})
    inventories = {"unet": load_inventory(model, "unet")}
    widths = context_widths(inventories["unet"])
    state = a1111_state(widths, spec.hypernetwork_layers)
    assert HN.trainable(spec, inventories) == {"unet": sum(v.numel() for v in state.values())}
    assert {t.name: t.shape for t in HN.trainable_tensors(spec, inventories)["unet"]} == \
        {k: tuple(v.shape) for k, v in state.items()}


def test_sd15_default_size():
    spec = build_spec({"model": "sd15", "method": "hypernetwork"})
    # 2 x (Linear(768, 1536) + Linear(1536, 768)), biases included
    assert HN.trainable(spec, {"unet": load_inventory("sd15", "unet")}) == {"unet": 2 * (2 * 768 * 1536 + 1536 + 768)}


def test_file_size_matches_save(tmp_path):
    from safetensors.torch import save_file

    spec = build_spec({"model": "sd15", "method": "hypernetwork", "hypernetwork_layers": "1,1.5,1"})
    inventories = {"unet": load_inventory("sd15", "unet")}
    state = {k: v.to(torch.float16) for k, v in a1111_state([768], spec.hypernetwork_layers).items()}
    save_file(state, str(tmp_path / "hn.safetensors"))
    assert os.path.getsize(tmp_path / "hn.safetensors") == HN.adapter_file_bytes(spec, inventories)


@pytest.mark.parametrize("model", ["flux-dev", "sd35-large"])
def test_mmdit_models_refuse(model):
    spec = build_spec({"model": model, "method": "hypernetwork"})
    with pytest.raises(UsageError, match="cross-attention"):
        HN.trainable(spec, load_model_inventories(spec.model))

"""Textual inversion: new embedding rows per trained text encoder; the learned_embeds files."""

import os

import pytest
import torch

from vramplan.methods import get_method
from vramplan.methods.textual_inversion import PLACEHOLDER_TOKEN
from vramplan.models.inventory import load_model_inventories
from vramplan.spec import Method, build_spec

TI = get_method(Method.TEXTUAL_INVERSION)


@pytest.mark.parametrize("model,widths", [
    ("sd15", {"text_encoder": 768}),
    ("sd21", {"text_encoder": 1024}),
    ("sdxl", {"text_encoder": 768, "text_encoder_2": 1280}),
    ("sd35-medium", {"text_encoder": 768, "text_encoder_2": 1280}),
    ("flux-dev", {"text_encoder": 768}),  # CLIP-L only, as train_dreambooth_lora_flux_advanced.py
])
@pytest.mark.parametrize("vectors", [1, 8])
def test_counts_on_shipped_inventories(model, widths, vectors):
    spec = build_spec({"model": model, "method": "textual-inversion", "num_vectors": vectors})
    assert TI.trainable(spec, load_model_inventories(spec.model)) == {k: vectors * w for k, w in widths.items()}


def test_new_rows_match_resize_token_embeddings(tiny):
    te = tiny.clip()
    spec = tiny.spec(model="sd15", method="textual-inversion", num_vectors=3)
    counts = TI.trainable(spec, {"text_encoder": tiny.walk(te, "text_encoder")})
    before = te.get_input_embeddings().weight.numel()
    te.resize_token_embeddings(te.get_input_embeddings().num_embeddings + 3)
    assert counts == {"text_encoder": te.get_input_embeddings().weight.numel() - before}


@pytest.mark.parametrize("dtype", ["F16", "F32"])
def test_file_sizes_match_save_progress(tiny, tmp_path, dtype):
    from safetensors.torch import save_file

    te1, te2 = tiny.clip(), tiny.clip(projection=True)
    inventories = {"text_encoder": tiny.walk(te1, "text_encoder"), "text_encoder_2": tiny.walk(te2, "text_encoder_2")}
    spec = tiny.spec(model="sdxl", method="textual-inversion", num_vectors=5)
    torch_dtype = {"F16": torch.float16, "F32": torch.float32}[dtype]
    total = 0
    for i, te in enumerate((te1, te2)):
        # textual_inversion_sdxl.py `save_progress`: the new rows under the placeholder token
        rows = te.get_input_embeddings().weight[-5:].detach().to(torch_dtype)
        path = tmp_path / f"learned_embeds{'_2' if i else ''}.safetensors"
        save_file({PLACEHOLDER_TOKEN: rows}, str(path), metadata={"format": "pt"})
        total += os.path.getsize(path)
    assert TI.adapter_file_bytes(spec, inventories, dtype=dtype) == total

"""Shipped inventories: exact parameter counts (no torch), and equal to a fresh meta-device build."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vramplan.models.catalog import MODELS
from vramplan.models.inventory import (Inventory, inventory_path, load_inventory,
                                       load_model_inventories, numel)

ROOT = Path(__file__).resolve().parents[2]

# Independent reference counts (docs/NOTES.md: diffusers/transformers configs on the meta device;
# published figures agree: SD 1.5 "860M UNet, 123M text encoder", SDXL "2.6B UNet", SD 2 "865M",
# T5-XXL "4.7B", SD3.5 Large "8B", Flux 11,906,077,760 - 4,669,440 LoRA parameters by peft).
SD15_UNET = 859_520_964
SD_VAE = 83_653_863
CLIP_L = 123_060_480
SDXL_UNET = 2_567_463_684
CLIP_G_PROJ = 694_659_840
SD2_UNET = 865_910_724
OPENCLIP_H_23 = 340_387_840
FLUX_DEV = 11_901_408_320
T5_XXL = 4_762_310_656
SD35_LARGE = 8_056_627_520
VAE_16CH = 83_819_683
# Measured here, with their published figures:
# SD3.5 Medium MMDiT-X (24 layers, dual attention in 0-12): 2,243,171,520 parameters; Stability
# publishes "2.5B", which counts the 384x384x1536 positional table (226,492,416) that the
# original checkpoint stores as a weight and diffusers keeps as a buffer: 2,469,663,936.
SD35_MEDIUM = 2_243_171_520
SD35_MEDIUM_POS_EMBED = 384 * 384 * 1536
# CLIP-L with its 768x768 text projection (SD3's first encoder): CLIP_L + 589,824 ("124M").
CLIP_L_PROJ = 123_650_304

EXPECTED = {
    ("sd15", "unet"): SD15_UNET, ("sd15", "vae"): SD_VAE, ("sd15", "text_encoder"): CLIP_L,
    ("sd21", "unet"): SD2_UNET, ("sd21", "vae"): SD_VAE, ("sd21", "text_encoder"): OPENCLIP_H_23,
    ("sdxl", "unet"): SDXL_UNET, ("sdxl", "vae"): SD_VAE, ("sdxl", "text_encoder"): CLIP_L,
    ("sdxl", "text_encoder_2"): CLIP_G_PROJ,
    ("sd35-medium", "transformer"): SD35_MEDIUM, ("sd35-medium", "vae"): VAE_16CH,
    ("sd35-medium", "text_encoder"): CLIP_L_PROJ, ("sd35-medium", "text_encoder_2"): CLIP_G_PROJ,
    ("sd35-medium", "text_encoder_3"): T5_XXL,
    ("sd35-large", "transformer"): SD35_LARGE, ("sd35-large", "vae"): VAE_16CH,
    ("sd35-large", "text_encoder"): CLIP_L_PROJ, ("sd35-large", "text_encoder_2"): CLIP_G_PROJ,
    ("sd35-large", "text_encoder_3"): T5_XXL,
    ("flux-dev", "transformer"): FLUX_DEV, ("flux-dev", "vae"): VAE_16CH,
    ("flux-dev", "text_encoder"): CLIP_L, ("flux-dev", "text_encoder_2"): T5_XXL,
}


def test_expected_covers_every_catalog_component():
    assert set(EXPECTED) == {(k, c.name) for k, m in MODELS.items() for c in m.components}


@pytest.mark.parametrize("key,component", sorted(EXPECTED))
def test_exact_parameter_counts(key, component):
    inventory = load_inventory(key, component)
    assert inventory.total_params == EXPECTED[key, component]
    assert sum(numel(shape) for _, shape in inventory.params) == inventory.total_params
    assert sum(m.params for m in inventory.modules) == inventory.total_params


def test_counts_load_without_torch():
    code = (
        "import json, sys\n"
        "from vramplan.models.catalog import MODELS\n"
        "from vramplan.models.inventory import load_inventory\n"
        "counts = {f'{k}/{c.name}': load_inventory(k, c.name).total_params\n"
        "          for k, m in MODELS.items() for c in m.components}\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'counts': counts}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    result = json.loads(out.stdout)
    assert result["torch"] is False
    assert result["counts"] == {f"{k}/{c}": n for (k, c), n in EXPECTED.items()}


def test_sd35_medium_positional_table_is_the_published_difference():
    inventory = load_inventory("sd35-medium", "transformer")
    (pos,) = [b for b in inventory.buffers if b.name == "pos_embed.pos_embed"]
    assert pos.numel == SD35_MEDIUM_POS_EMBED and pos.persistent
    assert inventory.total_params + pos.numel == 2_469_663_936  # "2.5B"
    # MMDiT-X: 13 of the 24 blocks carry a second image-only attention.
    assert len(inventory.find("attn2.to_q")) == 13
    assert len(load_inventory("sd35-large", "transformer").find("attn2.to_q")) == 0


def test_sd15_unet_attention_projections():
    inventory = load_inventory("sd15", "unet")
    projections = inventory.find(("to_q", "to_k", "to_v", "to_out.0"), kind="Linear")
    assert len(projections) == 128
    assert sum(m.in_features + m.out_features for m in projections) == 199_296
    assert all(m.is_linear for m in projections)
    # Only to_out.0 has a bias; cross-attention keys read the 768-wide CLIP-L states.
    assert {m.name.rsplit(".", 1)[-1] if not m.name.endswith("to_out.0") else "to_out.0"
            for m in projections if m.bias} == {"to_out.0"}
    assert {m.in_features for m in inventory.find("attn2.to_k")} == {768}


def test_module_geometry():
    unet = load_inventory("sd15", "unet")
    conv_in = unet.module("conv_in")
    assert (conv_in.kind, conv_in.in_channels, conv_in.out_channels) == ("Conv2d", 4, 320)
    assert (conv_in.kernel_size, conv_in.stride, conv_in.padding, conv_in.groups) == (
        (3, 3), (1, 1), (1, 1), 1)
    assert conv_in.shape("weight") == (320, 4, 3, 3) and conv_in.bias
    assert conv_in.fan_in == 4 and conv_in.fan_out == 320
    assert len(unet.convs()) == 98 and len(unet.linears()) == 184
    norm = unet.module("conv_norm_out")
    assert (norm.kind, norm.num_groups, norm.num_channels) == ("GroupNorm", 32, 320)
    text = load_inventory("sd15", "text_encoder")
    # transformers 5 builds CLIPTextModel without the checkpoints' "text_model." prefix.
    token = text.module("embeddings.token_embedding")
    assert (token.kind, token.num_embeddings, token.embedding_dim) == ("Embedding", 49408, 768)
    assert text.module("final_layer_norm").normalized_shape == (768,)
    # position_ids is an int64 buffer that is not saved.
    assert [(b.name, b.dtype, b.persistent) for b in text.buffers] == [
        ("embeddings.position_ids", "int64", False)]
    flux = load_inventory("flux-dev", "transformer")
    assert flux.of_kind("RMSNorm") and flux.params_under("single_transformer_blocks.") > 0


def test_tied_t5_embedding_is_counted_once():
    t5 = load_inventory("flux-dev", "text_encoder_2")
    tied = [m for m in t5.modules if m.tied]
    assert [(m.name, m.tied, m.params) for m in tied] == [("encoder.embed_tokens", "shared.weight", 0)]
    assert t5.module("shared").params == 32128 * 4096


def test_load_inventory_is_cached_and_frozen():
    a = load_inventory("sdxl", "unet")
    assert a is load_inventory("sdxl", "unet")
    assert isinstance(a, Inventory)
    with pytest.raises(Exception):
        a.total_params = 0


def test_unknown_model_or_component_is_a_usage_error():
    from vramplan.errors import UsageError

    with pytest.raises(UsageError, match="sd15 has no component 'transformer'"):
        load_inventory("sd15", "transformer")
    with pytest.raises(UsageError, match="no shipped inventory"):
        load_inventory("nope", "unet")


def test_load_model_inventories_for_a_catalog_model():
    inventories = load_model_inventories(MODELS["sdxl"])
    assert set(inventories) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert inventories["text_encoder_2"].total_params == CLIP_G_PROJ


def _build_script():
    spec = importlib.util.spec_from_file_location("build_inventory", ROOT / "scripts" / "build_inventory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Every rebuild takes well under a second on the meta device (about 7 s in all, with imports).
@pytest.mark.parametrize("key,component", sorted(EXPECTED))
def test_shipped_inventory_equals_a_fresh_build(key, component):
    pytest.importorskip("diffusers")
    build = _build_script()
    fresh = build.build_inventory(key, component)
    shipped = json.loads(inventory_path(key, component).read_text())
    assert build._differences(shipped, fresh) == []
    fresh.pop("built_with"), shipped.pop("built_with")
    assert shipped == json.loads(json.dumps(fresh))


def test_check_mode_reports_a_difference(tmp_path, monkeypatch, capsys):
    pytest.importorskip("diffusers")
    build = _build_script()
    assert build.main(["--model", "sd15", "--check"]) == 0
    # A shipped file that lost a module and got another total must fail the check.
    data = json.loads(inventory_path("sd15", "vae").read_text())
    data["modules"].pop()
    data["total_params"] += 1
    fake = tmp_path / "sd15" / "vae.json"
    fake.parent.mkdir()
    fake.write_text(json.dumps(data))
    real = build.inventory_path
    monkeypatch.setattr(build, "inventory_path",
                        lambda k, c: fake if (k, c) == ("sd15", "vae") else real(k, c))
    assert build.main(["--model", "sd15", "--check"]) == 1
    out = capsys.readouterr().out
    assert "DIFFERS sd15/vae" in out and "total_params 83,653,864 -> 83,653,863" in out
    assert "modules: 0 removed, 1 added" in out

"""--lora-targets: which modules each preset selects, on the shipped inventories and tiny models."""

import pytest
from peft import LoraConfig

from vramplan.methods.targets import MMDIT_ATTN, denoiser_targets, text_encoder_targets
from vramplan.models.inventory import load_inventory
from vramplan.spec import LoraTargets


def _spec(tiny, model, targets="attn"):
    return tiny.spec(model=model, method="lora", lora_targets=targets)


def test_sd15_attn(tiny):
    targets = denoiser_targets(_spec(tiny, "sd15"), load_inventory("sd15", "unet"))
    assert len(targets) == 128  # 16 transformer blocks x (attn1, attn2) x (q, k, v, out)
    assert sum(m.in_features + m.out_features for m in targets) == 199_296


def test_sdxl_attn(tiny):
    targets = denoiser_targets(_spec(tiny, "sdxl"), load_inventory("sdxl", "unet"))
    assert len(targets) == 70 * 2 * 4  # 70 transformer blocks in SDXL base


def test_flux_attn(tiny):
    targets = denoiser_targets(_spec(tiny, "flux-dev"), load_inventory("flux-dev", "transformer"))
    # 19 double blocks x 8 projections of 3072 -> 3072, 38 single blocks x (q, k, v)
    assert len(targets) == 19 * 8 + 38 * 3
    assert sum(m.in_features + m.out_features for m in targets) == (19 * 8 + 38 * 3) * 6144


@pytest.mark.parametrize("model,component", [("sd15", "unet"), ("sd21", "unet"), ("sdxl", "unet"),
                                             ("sd35-medium", "transformer"), ("flux-dev", "transformer")])
def test_presets_nest(tiny, model, component):
    inventory = load_inventory(model, component)
    sets = [{m.name for m in denoiser_targets(_spec(tiny, model, t.value), inventory)} for t in LoraTargets]
    assert sets[0] < sets[1] < sets[2] <= sets[3]  # Flux has no Conv2d
    assert sets[2] == {m.name for m in inventory.linears()}
    assert sets[3] - sets[2] == {m.name for m in inventory.modules if m.kind == "Conv2d"}


def test_flux_attn_matches_the_scripts_list_with_peft(tiny):
    transformer = tiny.flux()
    ours = [m.name for m in denoiser_targets(_spec(tiny, "flux-dev"), tiny.walk(transformer, "transformer"))]
    tiny.add(transformer, LoraConfig(r=2, target_modules=list(MMDIT_ATTN)))
    assert sorted(tiny.adapted(transformer)) == sorted(ours)


def test_flux_attn_mlp_adds_feed_forwards_and_single_block_mlp(tiny):
    inventory = tiny.walk(tiny.flux(), "transformer")
    attn = {m.name for m in denoiser_targets(_spec(tiny, "flux-dev"), inventory)}
    mlp = {m.name for m in denoiser_targets(_spec(tiny, "flux-dev", "attn-mlp"), inventory)} - attn
    assert mlp == {"transformer_blocks.0.ff.net.0.proj", "transformer_blocks.0.ff.net.2",
                   "transformer_blocks.0.ff_context.net.0.proj", "transformer_blocks.0.ff_context.net.2",
                   "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.proj_out"}


def test_sd3_attn_leaves_attn2_as_the_script_does(tiny):
    transformer = tiny.sd3()
    inventory = tiny.walk(transformer, "transformer")
    attn = [m.name for m in denoiser_targets(_spec(tiny, "sd35-medium"), inventory)]
    assert not any(".attn2." in name for name in attn)
    # the last block is context_pre_only: no to_add_out
    assert sorted(n for n in attn if n.startswith("transformer_blocks.1.")) == sorted(
        f"transformer_blocks.1.attn.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0",
                                                   "add_q_proj", "add_k_proj", "add_v_proj"))
    tiny.add(transformer, LoraConfig(r=2, target_modules=list(MMDIT_ATTN)))
    assert sorted(tiny.adapted(transformer)) == sorted(attn)


def test_text_encoder_targets(tiny):
    assert len(text_encoder_targets(load_inventory("sd15", "text_encoder"))) == 12 * 4
    assert len(text_encoder_targets(load_inventory("sdxl", "text_encoder_2"))) == 32 * 4

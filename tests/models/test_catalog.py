"""The catalog: every model resolves, and every component has its real config and an inventory."""

import json

import pytest

from vramplan.models.catalog import MODELS, ModelInfo, find_model
from vramplan.models.inventory import config_path, inventory_path, load_config


@pytest.mark.parametrize("key", sorted(MODELS))
def test_each_model_resolves_by_key_and_aliases(key):
    model = MODELS[key]
    assert find_model(key) is model
    assert find_model(key.upper()) is model
    for alias in model.aliases:
        assert find_model(alias) is model


def test_unknown_model_is_none():
    assert find_model("sd9") is None


@pytest.mark.parametrize("key", sorted(MODELS))
def test_every_component_has_a_config_and_an_inventory(key):
    model = MODELS[key]
    assert sum(c.role == "denoiser" for c in model.components) == 1
    assert sum(c.role == "vae" for c in model.components) == 1
    for component in model.components:
        assert config_path(key, component.name).is_file(), component.name
        assert inventory_path(key, component.name).is_file(), component.name
        inventory = json.loads(inventory_path(key, component.name).read_text())
        # The inventory was built from the shipped config, unchanged, and with the catalog's class.
        assert inventory["config"] == load_config(key, component.name)
        assert (inventory["cls"], inventory["library"]) == (component.cls, component.library)


@pytest.mark.parametrize("key", sorted(MODELS))
def test_configs_agree_with_the_catalog_facts(key):
    model = MODELS[key]
    vae = load_config(key, "vae")
    assert vae["_class_name"] == "AutoencoderKL"
    assert vae["latent_channels"] == model.latent_channels
    assert 2 ** (len(vae["block_out_channels"]) - 1) == model.vae_scale
    denoiser = load_config(key, model.denoiser.name)
    assert denoiser["_class_name"] == model.denoiser.cls
    if "sample_size" in denoiser:
        assert denoiser["sample_size"] * model.vae_scale == model.native_resolution
    for te in model.text_encoders:
        config = load_config(key, te.name)
        assert config["architectures"] == [te.cls]
        if config["model_type"] == "clip_text_model":
            assert config["max_position_embeddings"] == model.text_lengths[te.name]
    assert set(model.trainable_text_encoders) <= {c.name for c in model.text_encoders}


def test_new_optional_fields_default_to_none():
    model = MODELS["sd15"]
    assert isinstance(model, ModelInfo)
    assert (model.local_path, model.base_model, model.checkpoint_dtype) == (None, None, None)

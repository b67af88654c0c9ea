"""Local diffusers folders: described from their own configs, inventories built once and cached."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vramplan.errors import UsageError
from vramplan.models import local
from vramplan.models.inventory import load_model_inventories
from vramplan.models.local import config_digest, local_model_info
from vramplan.models.resolve import resolve_model

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("VRAMPLAN_CACHE", str(folder))
    return folder


def _tiny_clip(projection=False, hidden=32):
    config = transformers.CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=hidden, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=1000, projection_dim=hidden,
        max_position_embeddings=77)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config)


def _tiny_vae(latent_channels=4):
    return diffusers.AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=32, sample_size=64)


def _save(folder: Path, pipeline_cls: str, components: dict, scheduler: dict | None = None):
    """Write a pipeline folder the way save_pretrained lays it out (configs only, no weights)."""
    folder.mkdir(parents=True)
    index = {"_class_name": pipeline_cls, "_diffusers_version": diffusers.__version__,
             "tokenizer": ["transformers", "CLIPTokenizer"], "safety_checker": [None, None]}
    for name, module in components.items():
        (folder / name).mkdir()
        if isinstance(module, transformers.PreTrainedModel):
            index[name] = ["transformers", type(module).__name__]
            module.config.save_pretrained(folder / name)
        else:
            index[name] = ["diffusers", type(module).__name__]
            module.save_config(folder / name)
    if scheduler is not None:
        index["scheduler"] = ["diffusers", "DDPMScheduler"]
        (folder / "scheduler").mkdir()
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def _counts(components: dict) -> dict:
    return {name: sum(p.numel() for p in module.parameters()) for name, module in components.items()}


@pytest.fixture
def tiny_sd(tmp_path):
    torch.manual_seed(0)
    components = {
        "unet": diffusers.UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
            out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
            attention_head_dim=8, norm_num_groups=32),
        "vae": _tiny_vae(),
        "text_encoder": _tiny_clip(),
    }
    folder = _save(tmp_path / "tiny-sd", "StableDiffusionPipeline", components,
                   scheduler={"_class_name": "DDPMScheduler", "prediction_type": "v_prediction"})
    return folder, components


def test_tiny_sd_folder(tiny_sd, cache):
    folder, components = tiny_sd
    model = local_model_info(folder)
    assert (model.key, model.local_path, model.family) == (str(folder), str(folder), "sd1")
    assert [(c.name, c.cls, c.library, c.role) for c in model.components] == [
        ("unet", "UNet2DConditionModel", "diffusers", "denoiser"),
        ("vae", "AutoencoderKL", "diffusers", "vae"),
        ("text_encoder", "CLIPTextModel", "transformers", "text_encoder")]
    # Two VAE levels: 1/2 latents; UNet sample 32 -> 64 px; two UNet levels: multiple 2 * 2.
    assert (model.vae_scale, model.native_resolution, model.resolution_multiple) == (2, 64, 4)
    assert (model.latent_channels, model.prediction) == (4, "v_prediction")
    assert model.text_lengths == {"text_encoder": 77}
    assert model.trainable_text_encoders == ("text_encoder",)
    assert not model.bf16_traces

    inventories = load_model_inventories(model)
    assert {k: v.total_params for k, v in inventories.items()} == _counts(components)
    for name, module in components.items():
        assert dict(inventories[name].params) == {k: tuple(p.shape) for k, p in module.named_parameters()}
    assert resolve_model(str(folder)) == model

    # Cached under the sha256 of the configs, one JSON per component.
    _, comps, configs = local._folder_components(folder)
    cached = cache / "inventories" / config_digest(comps, configs)
    assert sorted(p.name for p in cached.iterdir()) == ["text_encoder.json", "unet.json", "vae.json"]


def test_cached_inventories_are_not_rebuilt(tiny_sd, monkeypatch):
    folder, components = tiny_sd
    local_model_info(folder)

    def no_build(*args):
        raise AssertionError("rebuilt despite the cache")

    monkeypatch.setattr(local, "build_module", no_build)
    model = local_model_info(folder)
    assert load_model_inventories(model)["unet"].total_params == _counts(components)["unet"]


def test_cached_folder_loads_without_torch(tiny_sd, cache):
    folder, components = tiny_sd
    local_model_info(folder)
    code = ("import json, sys\n"
            "from vramplan.models.local import local_model_info\n"
            "from vramplan.models.inventory import load_model_inventories\n"
            f"inv = load_model_inventories(local_model_info({str(folder)!r}))\n"
            "print(json.dumps([inv['unet'].total_params, 'torch' in sys.modules]))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={**__import__("os").environ, "VRAMPLAN_CACHE": str(cache)})
    assert json.loads(out.stdout) == [_counts(components)["unet"], False]


def test_a_changed_config_gets_its_own_cache_entry(tiny_sd, cache):
    folder, _ = tiny_sd
    local_model_info(folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["layers_per_block"] = 1
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    smaller = load_model_inventories(local_model_info(folder))["unet"].total_params
    with torch.device("meta"):
        expected = sum(p.numel() for p in diffusers.UNet2DConditionModel.from_config(config).parameters())
    assert smaller == expected
    assert len(list((cache / "inventories").iterdir())) == 2


def test_tiny_sdxl_folder(tmp_path):
    components = {
        "unet": diffusers.UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4,
            out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80, norm_num_groups=32),
        "vae": _tiny_vae(),
        "text_encoder": _tiny_clip(),
        "text_encoder_2": _tiny_clip(projection=True),
    }
    folder = _save(tmp_path / "tiny-xl", "StableDiffusionXLPipeline", components)
    model = local_model_info(folder)
    assert model.family == "sdxl" and model.prediction == "epsilon"
    assert model.trainable_text_encoders == ("text_encoder", "text_encoder_2")
    assert model.text_lengths == {"text_encoder": 77, "text_encoder_2": 77}
    inventories = load_model_inventories(model)
    assert {k: v.total_params for k, v in inventories.items()} == _counts(components)


def test_tiny_flux_folder(tmp_path, cache):
    components = {
        "transformer": diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
            axes_dims_rope=[4, 4, 8], guidance_embeds=True),
        "vae": _tiny_vae(latent_channels=4),
        "text_encoder": _tiny_clip(),
        "text_encoder_2": transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            feed_forward_proj="gated-gelu")),
    }
    folder = _save(tmp_path / "tiny-flux", "FluxPipeline", components)
    model = local_model_info(folder)
    assert (model.family, model.prediction, model.resolution_multiple) == ("flux", "flow_matching", 4)
    assert model.text_lengths == {"text_encoder": 77, "text_encoder_2": 512}
    assert model.trainable_text_encoders == ("text_encoder",)
    inventories = load_model_inventories(model)
    assert {k: v.total_params for k, v in inventories.items()} == _counts(components)
    # T5's shared embedding is tied into the encoder: counted once, as torch does.
    assert any(m.tied for m in inventories["text_encoder_2"].modules)
    # FLUX's blocks clip in fp16 only: a bf16 estimate records and replays bf16 graphs
    assert model.bf16_traces
    from vramplan.estimate import estimate
    from vramplan.spec import build_spec

    for precision, graph in (("bf16", "transformer.amp-frozen-bf16.sdpa"), ("fp16", "transformer.amp-frozen.sdpa")):
        estimate(build_spec({"model": str(folder), "method": "lora", "rank": 2, "precision": precision,
                             "resolution": 32, "cache_latents": True, "cache_text_embeddings": True}))
        recorded = {p.name for p in (cache / "traces").rglob("transformer.*")}
        assert f"{graph}.json.gz" in recorded, recorded


def test_folder_errors(tiny_sd, tmp_path):
    folder, _ = tiny_sd
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="model_index.json: missing"):
        local_model_info(empty)

    (folder / "vae" / "config.json").write_text("{not json")
    with pytest.raises(UsageError, match=r"vae/config.json: cannot read the vae config"):
        local_model_info(folder)
    (folder / "vae" / "config.json").unlink()
    with pytest.raises(UsageError, match=r"vae/config.json: missing"):
        local_model_info(folder)

    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({"text_encoder": index["text_encoder"]}))
    with pytest.raises(UsageError, match="names no unet or transformer"):
        local_model_info(folder)


def test_unknown_denoiser_and_unbuildable_config(tiny_sd):
    folder, _ = tiny_sd
    index = json.loads((folder / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet2DModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UsageError, match="denoiser UNet2DModel is not one vramplan knows"):
        local_model_info(folder)

    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    config = json.loads((folder / "unet" / "config.json").read_text())
    config["block_out_channels"] = [32, 64, 128]  # three widths for two blocks
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match=r"unet/config.json: cannot build UNet2DConditionModel: ") as err:
        local_model_info(folder)
    assert "\n" not in str(err.value)

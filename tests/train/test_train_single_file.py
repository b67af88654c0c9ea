"""`train --model file.safetensors`: an original-layout single-file checkpoint is converted once
by diffusers' own single-file loader into the cache and trained like a folder. The files here are
small SD 1.x-, 2.x- and SDXL-shaped pipelines written under the original key names
(ldm_checkpoint.py), shaped where the header reader and diffusers' loader look: SD 1.x's 768-wide
cross-attention, SD 2.x's 1024-wide one with a linear proj_in, SDXL's 2816-wide added
conditioning and two text encoders of different widths (diffusers tells them apart by it)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm_checkpoint import ldm_state_dict, ldm_state_dict_sd2, ldm_state_dict_xl
from vramplan.errors import UsageError
from vramplan.train.single_file import converted_folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny):
    """(reference diffusers folder, the same weights as one original-layout .safetensors)."""
    folder, file, _ = _small_pipeline(tmp_path_factory.mktemp("single-file"), tiny, "sd1")
    return folder, file


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VRAMPLAN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_converted_once_with_the_same_weights(checkpoint, cache):
    import diffusers

    folder, file = checkpoint
    said = []
    converted = converted_folder(file, folder, say=said.append)
    assert converted.parent == cache / "converted" and (converted / "model_index.json").is_file()
    a = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    b = diffusers.StableDiffusionPipeline.from_pretrained(converted, local_files_only=True, safety_checker=None)
    for name in ("unet", "vae", "text_encoder"):
        left, right = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert left.keys() == right.keys()
        assert all(torch.equal(left[k], right[k]) for k in left), name
    assert converted_folder(file, folder, say=said.append) == converted     # the second time: the cache
    assert "converting it once" in said[0] and "converted before" in said[1]
    assert not [p for p in converted.parent.iterdir() if p != converted]    # no staging folder left


def test_train_from_the_single_file(checkpoint, cache, tiny, kit, tmp_path):
    from vramplan.train import train

    folder, file = checkpoint
    spec = kit.spec(folder, method="lora", rank=2)
    options = kit.options(file, tiny[1], tmp_path / "run", steps=2)
    options = type(options)(**{**options.__dict__, "checkpoint_config": folder})
    result = train(spec, options, kit.console())
    assert result.steps == 2 and (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "vramplan-run.json").read_text())["model"].startswith(str(cache))


def test_without_configs_nor_cached_tokenizer_it_says_what_to_give(checkpoint, cache):
    from huggingface_hub import constants

    if any(Path(constants.HF_HUB_CACHE).glob("models--stable-diffusion-v1-5--stable-diffusion-v1-5")):
        pytest.skip("this machine's Hugging Face cache holds SD 1.5's tokenizer")
    with pytest.raises(UsageError, match="--checkpoint-config"):
        converted_folder(checkpoint[1])


def test_a_partial_file_is_refused_in_one_line(checkpoint, cache, tmp_path, tiny, kit):
    from safetensors.torch import load_file

    folder, file = checkpoint
    unet_only = tmp_path / "unet-only.safetensors"
    save_file({k: v for k, v in load_file(str(file)).items() if k.startswith("model.diffusion_model.")}, str(unet_only))
    plan = kit.plan(tmp_path / "plan.json", kit.spec(folder, method="lora", rank=2))
    done = subprocess.run([sys.executable, "-m", "vramplan", "train", "--plan", str(plan), "--model", str(unet_only),
                           "--data", str(tiny[1]), "--output", str(tmp_path / "run"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "VRAMPLAN_CACHE": str(cache)})
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "holding only unet" in lines[0] and "Traceback" not in done.stderr, done.stderr
    with pytest.raises(UsageError, match="not a .safetensors"):
        converted_folder(tmp_path / "plan.json")


def test_the_default_configs_are_the_catalogs_with_the_cached_tokenizer(tmp_path, tiny, monkeypatch):
    """Without --checkpoint-config: the catalog's configs, and the tokenizer of the catalog's repo
    from the Hugging Face cache (a cache laid out as huggingface_hub lays it out)."""
    import shutil

    import diffusers
    from huggingface_hub import constants
    from transformers import CLIPTokenizer

    from vramplan.models.catalog import MODELS
    from vramplan.train.single_file import catalog_config

    model = MODELS["sd15"]
    repo = tmp_path / "hub" / ("models--" + model.repo.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(tiny[0] / "tokenizer", repo / "snapshots" / ("0" * 40) / "tokenizer")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    folder = catalog_config(model, tmp_path / "config")
    unet = diffusers.UNet2DConditionModel.load_config(folder, subfolder="unet")
    shipped = json.loads((Path(__file__).resolve().parents[2] / "vramplan/models/configs/sd15/unet.json").read_text())
    assert unet["cross_attention_dim"] == shipped["cross_attention_dim"] == 768
    assert unet["block_out_channels"] == shipped["block_out_channels"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    cached = CLIPTokenizer.from_pretrained(tiny[0] / "tokenizer")
    written = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert written.get_vocab() == cached.get_vocab() and len(written) > 2
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "epsilon"


def _small_pipeline(root: Path, tiny, family: str):
    """A small SD 1.x pipeline (768-wide CLIP-L), SD 2.x one (OpenCLIP-H, 1024-wide, linear proj_in,
    v-prediction) or SDXL one, as a diffusers folder and as one original-layout file."""
    import diffusers
    import transformers

    reference = diffusers.StableDiffusionPipeline.from_pretrained(tiny[0], local_files_only=True, safety_checker=None)
    torch.manual_seed(0)

    def clip(hidden, projection=False):
        config = transformers.CLIPTextConfig(
            bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=hidden, intermediate_size=37,
            num_attention_heads=4, num_hidden_layers=2, vocab_size=len(reference.tokenizer), projection_dim=1280,
            max_position_embeddings=77)
        return (transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel)(config)

    if family in ("sd1", "sd2"):
        width = 768 if family == "sd1" else 1024
        unet = diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=width,
            attention_head_dim=8, norm_num_groups=8, use_linear_projection=family == "sd2")
        scheduler = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            steps_offset=1, clip_sample=False,
                                            prediction_type="v_prediction" if family == "sd2" else "epsilon")
        pipe = diffusers.StableDiffusionPipeline(
            vae=reference.vae, text_encoder=clip(width), tokenizer=reference.tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        state = (ldm_state_dict_sd2 if family == "sd2" else ldm_state_dict)(pipe)
    else:
        unet = diffusers.UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=80,
            attention_head_dim=(2, 4), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=2816, norm_num_groups=32)
        scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                                     beta_schedule="scaled_linear", steps_offset=1)
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=reference.vae, text_encoder=clip(32), text_encoder_2=clip(48, projection=True),
            tokenizer=reference.tokenizer, tokenizer_2=reference.tokenizer, unet=unet, scheduler=scheduler)
        state = ldm_state_dict_xl(pipe)
    folder = root / "model"
    pipe.save_pretrained(folder)
    file = root / f"tiny-{family}.safetensors"
    save_file(state, str(file))
    return folder, file, type(pipe)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_sd2_and_sdxl_files_convert_exactly_and_train(family, cache, tiny, kit, tmp_path):
    from vramplan.models.checkpoint import read_safetensors_header, recognise_checkpoint
    from vramplan.train import train

    folder, file, pipeline = _small_pipeline(tmp_path / "source", tiny, family)
    assert recognise_checkpoint(read_safetensors_header(file)).family == family
    converted = converted_folder(file, folder, say=lambda message: None)
    a = pipeline.from_pretrained(folder, local_files_only=True)
    b = pipeline.from_pretrained(converted, local_files_only=True)
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    for name in names:
        left, right = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert left.keys() == right.keys()
        assert all(torch.equal(left[k], right[k]) for k in left), name
    assert b.scheduler.config.prediction_type == a.scheduler.config.prediction_type
    spec = kit.spec(folder, method="lora", rank=2)
    options = kit.options(file, tiny[1], tmp_path / "run", steps=1)
    options = type(options)(**{**options.__dict__, "checkpoint_config": folder})
    assert train(spec, options, kit.console()).steps == 1
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()

"""Full fine-tuning and DreamBooth: every denoiser parameter, plus the trainable text encoders."""

import pytest

from vramplan.methods import get_method
from vramplan.models.inventory import load_model_inventories
from vramplan.spec import Method, build_spec

SD15_UNET, CLIP_L, SDXL_UNET, OPENCLIP_BIGG = 859_520_964, 123_060_480, 2_567_463_684, 694_659_840
FLUX_TRANSFORMER = 11_901_408_320


@pytest.mark.parametrize("method", ["full", "dreambooth"])
@pytest.mark.parametrize("model,te,expected", [
    ("sd15", False, {"unet": SD15_UNET}),
    ("sd15", True, {"unet": SD15_UNET, "text_encoder": CLIP_L}),
    ("sdxl", True, {"unet": SDXL_UNET, "text_encoder": CLIP_L, "text_encoder_2": OPENCLIP_BIGG}),
    # the diffusers Flux scripts never train T5
    ("flux-dev", True, {"transformer": FLUX_TRANSFORMER, "text_encoder": CLIP_L}),
])
def test_counts_on_shipped_inventories(method, model, te, expected):
    spec = build_spec({"model": model, "method": method, "train_text_encoder": te})
    assert get_method(spec.method).trainable(spec, load_model_inventories(spec.model)) == expected


def test_tensors_are_the_named_parameters(tiny):
    unet = tiny.unet()
    spec = tiny.spec(model="sd15", method="full")
    tensors = get_method(Method.FULL).trainable_tensors(spec, {"unet": tiny.walk(unet, "unet")})["unet"]
    assert [(t.name, t.shape) for t in tensors] == [(n, tuple(p.shape)) for n, p in unet.named_parameters()]
    assert get_method(Method.FULL).adapter_file_bytes(spec, {"unet": tiny.walk(unet, "unet")}) is None


def test_dreambooth_trains_what_full_trains(tiny):
    inventories = {"unet": tiny.walk(tiny.unet(), "unet")}
    full = get_method(Method.FULL).trainable_tensors(tiny.spec(model="sd15", method="full"), inventories)
    db = get_method(Method.DREAMBOOTH).trainable_tensors(tiny.spec(model="sd15", method="dreambooth"), inventories)
    assert full == db


@pytest.mark.parametrize("method", ["full", "dreambooth"])
def test_buffers_never_train(method):
    """`requires_grad_` leaves buffers alone: SD 3.5's position table (a buffer named like a
    parameter in the recorded graph) must not get a gradient in the replay."""
    spec = build_spec({"model": "sd35-medium", "method": method})
    inventories = load_model_inventories(spec.model)
    trains = get_method(spec.method).parameter_filter(spec, "transformer", inventories)
    buffers = [b.name for b in inventories["transformer"].buffers]
    assert "pos_embed.pos_embed" in buffers
    assert not any(trains(f"transformer.{name}") for name in buffers)
    assert all(trains(f"transformer.{name}") for name, _ in inventories["transformer"].params)
    assert not get_method(spec.method).parameter_filter(spec, "vae", inventories)("vae.encoder.conv_in.weight")

"""The parts of train that need no full run: LyCORIS updates written as exact LoRAs, the data
order, the crop, textual inversion's token ids, the atomic checkpoint."""

import pytest
import torch
from PIL import Image

from vramplan.step.build import build_step
from vramplan.train import data
from vramplan.train.save import lycoris_as_lora


@pytest.mark.parametrize("method,targets", [("loha", "attn"), ("lokr", "attn"), ("loha", "all-linear+conv"),
                                            ("lokr", "all-linear+conv")])
def test_lycoris_update_equals_its_lora(tiny, kit, method, targets):
    """B @ A of the written LoRA is the LyCORIS layer's delta weight (rank-bounded SVD, float
    rounding only): the file diffusers loads means what was trained."""
    from peft.tuners.lycoris_utils import LycorisLayer

    torch.manual_seed(0)
    spec = kit.spec(tiny[0], method=method, rank=2, lora_targets=targets, precision="fp32")
    built = build_step(spec, "cpu", weights=tiny[0])
    with torch.no_grad():   # move off the zero init so the updates are not trivially zero
        for p in built.trainable:
            p.add_(torch.randn_like(p) * 0.1)
    states = lycoris_as_lora(built, spec)
    checked = 0
    for component, module in built.models.items():
        for name, layer in module.named_modules():
            if not isinstance(layer, LycorisLayer):
                continue
            delta = layer.get_delta_weight("default").float()
            down = states[component][f"{name}.lora_A.weight"].flatten(1)
            up = states[component][f"{name}.lora_B.weight"].flatten(1)
            rebuilt = (up @ down).reshape(delta.shape)
            assert torch.allclose(rebuilt, delta, atol=1e-5 * max(1.0, float(delta.abs().max()))), name
            checked += 1
    assert checked > 0


def test_center_crop_to_the_plan_size(tmp_path):
    path = tmp_path / "wide.png"
    image = Image.new("RGB", (200, 100), (255, 0, 0))
    for x in range(0, 20):   # scaled by 0.48 to 96x48, the crop keeps x 16..80
        for y in range(100):
            image.putpixel((x, y), (0, 0, 255))   # a blue band the crop must cut off
    image.save(path)
    pixels = data.load_pixels(path, 64, 48)
    assert tuple(pixels.shape) == (3, 48, 64)
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert torch.allclose(pixels[0], torch.ones(48, 64))       # red only: the blue band was cropped


def test_data_order_follows_the_step_number():
    a, b = data.Sampler(5, 2, seed=3), data.Sampler(5, 2, seed=3)
    first = [a.indices(m) for m in range(10)]
    assert [b.indices(m) for m in reversed(range(10))][::-1] == first
    flat = [i for batch in first[:5] for i in batch]    # the first two epochs
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))


def test_captions_and_prompts(tmp_path):
    for name in ("a", "b"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("a red square\n")
    folder = data.scan_folder(tmp_path, "--data", instance_prompt="a photo of sks")
    assert [e.prompt for e in folder.examples] == ["a red square", "a photo of sks"]
    assert data.with_placeholder("a red square", "<t>", None) == "<t>, a red square"
    assert data.with_placeholder("", "<t>", None) == "a photo of <t>"
    assert data.with_placeholder("x", "<t>", "a <t> toy") == "a <t> toy"


def test_placeholder_ids_map_past_the_old_embedding_rows(tiny):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny[0] / "tokenizer"))
    old = len(tokenizer)
    placeholder = data.add_placeholder(tokenizer, "<tok>", 2, vocab=old + 10)
    assert placeholder.tokens == ["<tok>", "<tok>_1"] and placeholder.first_id == old
    ids = data.tokenize({"text_encoder": tokenizer}, {"text_encoder": 77}, ["a <tok> here"],
                        {"text_encoder": placeholder})["text_encoder"][0].tolist()
    assert old + 10 in ids and old + 11 in ids     # both vectors, after the embedding's rows
    assert max(i for i in ids if i < old + 10) < old
    with pytest.raises(Exception, match="already in the tokenizer"):
        data.add_placeholder(tokenizer, "<tok>", 1, vocab=old)


def test_example_images_at_any_size_and_count(tmp_path):
    """make_tiny_pipeline's images, as scripts/make_random_pipeline.py asks for them for a
    full-size model: `count` captioned PNGs of `size` pixels, the shapes drawn in proportion."""
    from PIL import Image

    from tests.train.conftest import _example_module

    folder = _example_module().make_images(tmp_path, size=256, count=6)
    pngs = sorted(folder.glob("*.png"))
    assert len(pngs) == 6 and all((p.with_suffix(".txt")).read_text().strip() for p in pngs)
    first = Image.open(pngs[0])
    assert first.size == (256, 256)
    # image 0 is a square from 16/64 to 48/64 of the side: its colour inside, the field's outside
    assert first.getpixel((128, 128)) != first.getpixel((10, 10))
    assert first.getpixel((70, 70)) == first.getpixel((180, 180))
    # the second round of shapes turns the colours: image 4 is image 0's square, recoloured
    again = Image.open(pngs[4])
    assert again.getpixel((128, 128)) != first.getpixel((128, 128))

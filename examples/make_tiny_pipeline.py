"""Write a tiny Stable-Diffusion-architecture pipeline and a few captioned images, offline.

    python examples/make_tiny_pipeline.py OUT

creates OUT/model (a diffusers pipeline folder: UNet, VAE, CLIP text encoder and tokenizer,
DDPM scheduler, random weights, a few MB) and OUT/images (PNG files with same-name .txt
captions). Everything is built from configs in code: no hub download. `vramplan profile --device
cpu`, `vramplan train` and the tests run on it in seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

CAPTIONS = ["a red square on a blue field", "a green circle", "a yellow stripe across grey",
            "two white dots on black"]


def bytes_to_unicode() -> dict:
    """CLIP's byte-level alphabet (openai/CLIP simple_tokenizer.py)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tokenizer(folder: Path) -> None:
    """A character-level CLIP tokenizer: every byte symbol, with and without "</w>", no merges."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(folder)


def make_pipeline(out: Path, seed: int = 0) -> Path:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(
        sample_size=64, in_channels=3, out_channels=3, latent_channels=4,
        block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    tokenizer_dir = out / "_tokenizer"
    write_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, steps_offset=1, clip_sample=False,
                              prediction_type="epsilon")      # SD 1.5's (no deprecation warnings)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    model_dir = out / "model"
    pipe.save_pretrained(model_dir, safe_serialization=True)
    import shutil

    shutil.rmtree(tokenizer_dir)
    return model_dir


def make_images(out: Path, size: int = 64, count: int = 4) -> Path:
    """`count` PNGs of `size` pixels with same-name .txt captions: the four shapes, drawn in
    proportion, then again with their colours turned (scripts/make_random_pipeline.py asks for
    more, at the model's resolution)."""
    from PIL import Image, ImageDraw

    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    colours = [((200, 30, 30), (30, 30, 200)), ((30, 180, 30), (240, 240, 240)),
               ((230, 210, 40), (128, 128, 128)), ((255, 255, 255), (0, 0, 0))]

    def box(*corners):          # coordinates drawn for 64 pixels, scaled to `size`
        return [round(c * size / 64) for c in corners]

    for i in range(count):
        shape = i % len(CAPTIONS)
        caption, (fg, bg) = CAPTIONS[shape], colours[shape]
        if i >= len(CAPTIONS):
            turn = i // len(CAPTIONS)
            fg, bg = tuple((c + 60 * turn) % 256 for c in fg), tuple((c + 90 * turn) % 256 for c in bg)
        image = Image.new("RGB", (size, size), bg)
        draw = ImageDraw.Draw(image)
        if shape == 0:
            draw.rectangle(box(16, 16, 48, 48), fill=fg)
        elif shape == 1:
            draw.ellipse(box(12, 12, 52, 52), fill=fg)
        elif shape == 2:
            draw.rectangle(box(0, 26, 64, 38), fill=fg)
        else:
            draw.ellipse(box(14, 28, 22, 36), fill=fg)
            draw.ellipse(box(42, 28, 50, 36), fill=fg)
        image.save(folder / f"image_{i}.png")
        (folder / f"image_{i}.txt").write_text(caption + "\n")
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to create (model/ and images/ go inside)")
    args = parser.parse_args(argv)
    out = args.out
    if (out / "model").exists():
        print(f"{out / 'model'} exists; choose another folder", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    model = make_pipeline(out)
    images = make_images(out)
    print(f"wrote {model} and {images}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Write a full-size Stable Diffusion 1.5, 2.1 or SDXL pipeline with random weights, and captioned images.

    python scripts/make_random_pipeline.py OUT [--model sd15|sd21|sdxl] [--images 8] [--size 512]
        [--dtype float16|float32] [--device cpu|cuda]

creates OUT/model (a diffusers pipeline folder built from the configs vramplan ships in
vramplan/models/configs/ -- the architecture the catalog's inventories were made from, so a plan
made for `--model sd15` trains on it and its estimate is the catalog's) and OUT/images (PNG
files with same-name .txt captions, examples/make_tiny_pipeline.py's shapes drawn at --size).

For `vramplan train` on a GPU without a hub download (scripts/gpu_train.sh): memory does not
depend on the weights' values. The tokenizer is make_tiny_pipeline's character-level CLIP
tokenizer (its ids are within the text encoder's vocabulary); the scheduler is the model's DDPM
(epsilon for 1.5, v-prediction for 2.1).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

MODELS = ("sd15", "sd21", "sdxl")


def make_pipeline(out: Path, model_key: str = "sd15", dtype: str = "float16", seed: int = 0,
                  device: str = "cpu") -> Path:
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from make_tiny_pipeline import write_tokenizer
    from vramplan.models.catalog import MODELS as CATALOG
    from vramplan.step.families import SD_SCHEDULER
    from vramplan.step.loading import build_component

    model = CATALOG[model_key]
    torch.manual_seed(seed)
    # random initialisation is the slow part on a CPU (SDXL: 103 s on the device machine's 16 cores)
    parts = {c.name: build_component(model, c, device=device, dtype=getattr(torch, dtype)).to("cpu")
             for c in model.components}
    tokenizer_dir = out / "_tokenizer"
    write_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    scheduler = DDPMScheduler.from_config(dict(SD_SCHEDULER, prediction_type=model.prediction))
    if model.family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"],
                                         text_encoder_2=parts["text_encoder_2"], tokenizer=tokenizer,
                                         tokenizer_2=tokenizer, unet=parts["unet"], scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"], tokenizer=tokenizer,
                                       unet=parts["unet"], scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    model_dir = out / "model"
    pipe.save_pretrained(model_dir, safe_serialization=True)
    shutil.rmtree(tokenizer_dir)
    return model_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to create (model/ and images/ go inside)")
    parser.add_argument("--model", choices=MODELS, default="sd15", help="the catalog architecture (default sd15)")
    parser.add_argument("--images", type=int, default=8, help="how many captioned images (default 8)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                        help="the weights' dtype on disk (default float16: half the bytes to write)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the random weights are drawn (cuda: seconds rather than minutes for SDXL)")
    args = parser.parse_args(argv)
    if args.images < 1 or args.size < 8:
        print("--images must be at least 1 and --size at least 8", file=sys.stderr)
        return 2
    if (args.out / "model").exists():
        print(f"{args.out / 'model'} exists; choose another folder", file=sys.stderr)
        return 2
    from make_tiny_pipeline import make_images

    args.out.mkdir(parents=True, exist_ok=True)
    model = make_pipeline(args.out, args.model, args.dtype, device=args.device)
    images = make_images(args.out, size=args.size, count=args.images)
    print(f"wrote {model} and {images}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

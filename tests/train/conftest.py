"""The tiny pipeline (examples/make_tiny_pipeline.py), made once per session, and helpers that
train on it. Everything runs on the CPU in seconds: 64 px images, a UNet of two blocks."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESOLUTION = 64


def _example_module():
    spec = importlib.util.spec_from_file_location("make_tiny_pipeline", ROOT / "examples" / "make_tiny_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny(tiny_pipeline):
    """(model folder, images folder) of the shared tiny pipeline."""
    return tiny_pipeline / "model", tiny_pipeline / "images"


def tiny_spec(model: Path, **options):
    from vramplan.spec import build_spec

    return build_spec({"model": str(model), "resolution": RESOLUTION, **options})


def write_plan(path: Path, spec) -> Path:
    path.write_text(json.dumps(spec.to_json()))
    return path


def options(model: Path, data: Path, output: Path, **changes):
    from vramplan.train import TrainOptions

    values = dict(model_path=model, data=data, output=output, steps=3, learning_rate=1e-2,
                  checkpoint_every=0, progress=False)
    values.update(changes)
    return TrainOptions(**values)


def quiet_console():
    from rich.console import Console

    return Console(stderr=True, quiet=True)


def generate(pipe, prompt="a red square"):
    """A tiny image, fixed seed, 2 inference steps, as float pixels (no 8-bit rounding)."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=2, height=RESOLUTION, width=RESOLUTION,
                generator=torch.Generator().manual_seed(0), output_type="np").images[0]


def load_pipeline(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True, safety_checker=None)


def copy_images(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="session")
def kit():
    """The helpers above, for tests (a fixture, since test folders share the module name
    `conftest`)."""
    from types import SimpleNamespace

    return SimpleNamespace(spec=tiny_spec, plan=write_plan, options=options, console=quiet_console,
                           generate=generate, load=load_pipeline, copy_images=copy_images,
                           resolution=RESOLUTION)

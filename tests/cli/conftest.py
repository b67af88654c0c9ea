"""A hand-built stand-in for `vramplan.estimate.estimate`, so CLI tests check the CLI alone.

The numbers are made up but depend on the spec the way the real ones do (more batch, more
activations; adapters train little), so compare tables and grids differ between combinations.
"""

import pytest

import vramplan.estimate
from vramplan.estimate.result import Estimate
from vramplan.footprint import Category, ComponentParams, Footprint

UNET, VAE, TEXT = 859_520_964, 83_653_863, 123_060_480
LORA_PARAMS_PER_RANK = 199_296   # SD 1.5 UNet, --lora-targets attn


def fake_estimate(spec) -> Estimate:
    adapter = spec.method.is_adapter
    trainable = LORA_PARAMS_PER_RANK * (spec.rank or 1) if adapter else UNET
    weight_bytes = spec.precision.frozen_bytes
    categories = {
        Category.FROZEN_WEIGHTS: (UNET + VAE + TEXT) * weight_bytes if adapter
        else (VAE + TEXT) * weight_bytes,
        Category.TRAINABLE_WEIGHTS: trainable * spec.precision.trainable_bytes,
        Category.GRADIENTS: trainable * spec.precision.trainable_bytes,
        Category.OPTIMIZER_STATES: trainable * 8,
        Category.ACTIVATIONS: 1_500_000_000 * spec.images_per_step,
        Category.CUDA_CONTEXT: 500_000_000,
        Category.ALLOCATOR_RESERVE: 200_000_000,
    }
    allocated = sum(v for c, v in categories.items() if c.in_allocator)
    footprint = Footprint(categories=categories, peak_allocated_bytes=allocated,
                          peak_reserved_bytes=allocated + 200_000_000,
                          device_used_bytes=sum(categories.values()), peak_phase="backward")
    parameters = {"unet": ComponentParams(UNET + (trainable if adapter else 0), trainable),
                  "vae": ComponentParams(VAE, 0), "text_encoder": ComponentParams(TEXT, 0)}
    file_bytes = trainable * 2 + 20_000 if adapter else None
    return Estimate(spec=spec, parameters=parameters, footprint=footprint,
                    adapter_file_bytes=file_bytes, notes=("made up by tests/cli/conftest.py",))


@pytest.fixture
def fake(monkeypatch):
    """Replace the analytic estimate with `fake_estimate`; the list collects the specs it saw."""
    seen = []

    def estimate(spec):
        seen.append(spec)
        return fake_estimate(spec)

    monkeypatch.setattr(vramplan.estimate, "estimate", estimate, raising=False)
    return seen

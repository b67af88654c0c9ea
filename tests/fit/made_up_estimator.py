"""A made-up estimator for the search tests: memory grows along every axis the way the real one
does (more rank, batch, resolution; less with checkpointing, caching, quantization, 8-bit or
factored states), in round GiB, so the right answer can be found by brute force."""

import itertools

from vramplan.estimate.result import Estimate
from vramplan.fit.space import apply_values, search_axes
from vramplan.footprint import Category, Footprint
from vramplan.units import GIB

QUANT = {"none": 6.0, "int8": 4.0, "nf4": 3.0}
OPTIMIZER = {"adamw": 0.3, "adamw8bit": 0.1, "adafactor": 0.05, "sgd": 0.0, "lion": 0.15, "prodigy": 0.4}


def made_up_gib(spec) -> float:
    width, height = spec.resolution
    pixels = width * height / 512 ** 2
    gib = QUANT[spec.base_quant.value] + (spec.rank or 0) * 0.05 + OPTIMIZER[spec.optimizer.value]
    gib += spec.batch_size * pixels * (0.5 if spec.gradient_checkpointing else 1.5)
    gib += 0.0 if spec.cache_latents else 0.3
    gib += 0.0 if spec.cache_text_embeddings else 0.4
    if spec.method.trains_denoiser:
        gib += 6.0 if spec.precision.value.endswith("pure") else 10.0
    return gib


def made_up_estimate(spec) -> Estimate:
    used = int(made_up_gib(spec) * GIB)
    footprint = Footprint(categories={Category.ACTIVATIONS: used}, peak_allocated_bytes=used,
                          peak_reserved_bytes=used, device_used_bytes=used, peak_phase="backward")
    return Estimate(spec=spec, parameters={}, footprint=footprint)


def brute_force(request, fits) -> list:
    """What the search must return: every candidate in preference order, the ones `fits(spec)`
    accepts that no earlier accepted one dominates, up to `request.top`."""
    axes = search_axes(request)
    listed = []
    for choice in itertools.product(*(range(len(a.values)) for a in axes)):
        if not fits(apply_values(request, axes, choice)):
            continue
        if any(all(x <= y for x, y in zip(found, choice)) for found in listed):
            continue
        listed.append(choice)
        if len(listed) == request.top:
            break
    return [apply_values(request, axes, c) for c in listed]

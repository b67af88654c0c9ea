"""Which dtype each weight is stored in and which recorded graph variant a spec runs: one place.

Mirrors diffusers' training scripts under accelerate. Mixed precision (fp16/bf16): trainable
weights stay fp32 and the trained models' forward runs under autocast; frozen weights are cast to
`weight_dtype` (the 16-bit type) and run without autocast. Pure 16-bit: everything 16-bit, no
autocast. fp32: fp32 throughout. One exception the scripts make: the SDXL VAE stays fp32
("The VAE is always in float32 to avoid NaN losses", train_text_to_image_sdxl.py and
train_dreambooth_lora_sdxl.py). No torch import: the analytic tier uses it.
"""

from __future__ import annotations

from vramplan.spec import Precision, TrainingSpec

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def frozen_dtype(spec: TrainingSpec) -> str:
    return "float32" if spec.precision is Precision.FP32 else spec.precision.low_dtype


def trainable_dtype(spec: TrainingSpec) -> str:
    return spec.precision.low_dtype if spec.precision in (Precision.FP16_PURE, Precision.BF16_PURE) \
        else "float32"


def vae_dtype(spec: TrainingSpec) -> str:
    return "float32" if spec.model.family == "sdxl" else frozen_dtype(spec)


def graph_variant(spec: TrainingSpec, trained_weights: bool, autocast: bool = True) -> str:
    """The recorded variant whose dtypes match: fp32, amp-frozen, amp-trainable or pure.

    `trained_weights`: the component's own weights train (full fine-tune, trained text encoder).
    `autocast`: the component runs under autocast when the precision is mixed (trained models
    are wrapped by accelerate; frozen encoders are not, so they run as pure 16-bit).
    """
    if spec.precision is Precision.FP32:
        return "fp32"
    if spec.precision.autocast and autocast:
        return "amp-trainable" if trained_weights else "amp-frozen"
    return "pure"

"""Precision policies: which dtype each weight gets and whether autocast runs.

One place decides it for every tier, mirroring diffusers' scripts under accelerate: in mixed
precision the trainable weights stay fp32 and the forward runs under autocast, frozen weights
are stored in the 16-bit dtype (`weight_dtype` in the scripts); "pure" stores everything in 16 bits
with no autocast; fp32 is fp32 throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vramplan.spec import Precision

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class DtypePolicy:
    precision: Precision

    @property
    def low(self) -> torch.dtype:
        return DTYPES[self.precision.low_dtype]

    @property
    def autocast(self) -> bool:
        return self.precision.autocast

    @property
    def frozen(self) -> torch.dtype:
        return torch.float32 if self.precision is Precision.FP32 else self.low

    @property
    def trainable(self) -> torch.dtype:
        return self.low if self.precision in (Precision.FP16_PURE, Precision.BF16_PURE) else torch.float32

    @property
    def activations(self) -> torch.dtype:
        """dtype of inputs handed to the denoiser (latents, cached text embeddings)."""
        return self.frozen

    def weight(self, trainable: bool) -> torch.dtype:
        return self.trainable if trainable else self.frozen

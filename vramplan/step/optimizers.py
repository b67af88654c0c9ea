"""The optimizer, gradient scaler and EMA the step uses, built as the training scripts build them.

torch optimizers get `foreach=True`, which is what they choose on CUDA by default
(`_default_to_fused_or_foreach`), so that a CPU or fake run allocates what a CUDA run does.
Hyperparameters are the diffusers scripts' defaults (AdamW lr 1e-4, betas (0.9, 0.999), weight
decay 1e-2, eps 1e-8); Adafactor as kohya's sd-scripts pass it (relative step, scale_parameter,
no warmup); Prodigy with lr 1.0. Values never change memory; choices (foreach, 8-bit) do.
"""

from __future__ import annotations

import torch

from vramplan.errors import UsageError
from vramplan.spec import Optimizer, Precision, TrainingSpec


def build_optimizer(spec: TrainingSpec, params: list, device: str, fake_mode=None):
    opt = spec.optimizer
    if opt is Optimizer.ADAMW:
        optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8,
                                      foreach=True)
    elif opt is Optimizer.SGD:
        optimizer = torch.optim.SGD(params, lr=1e-4, momentum=spec.momentum or 0.0, foreach=True)
    elif opt in (Optimizer.ADAMW8BIT, Optimizer.LION):
        bnb = _import("bitsandbytes", opt)
        cls = bnb.optim.AdamW8bit if opt is Optimizer.ADAMW8BIT else bnb.optim.Lion
        optimizer = cls(params, lr=1e-4, weight_decay=1e-2)
    elif opt is Optimizer.ADAFACTOR:
        from transformers.optimization import Adafactor

        optimizer = Adafactor(params, scale_parameter=True, relative_step=True, warmup_init=False, lr=None)
    elif opt is Optimizer.PRODIGY:
        prodigyopt = _import("prodigyopt", opt)
        optimizer = prodigyopt.Prodigy(params, lr=1.0, weight_decay=1e-2)
    else:  # pragma: no cover - the spec enum is closed
        raise UsageError(f"unknown optimizer {opt}")
    if device == "fake":
        _wrap_fake_step(optimizer, params, fake_mode)
    return optimizer


def _wrap_fake_step(optimizer, params, fake_mode) -> None:
    from vramplan.simulate.stand_ins import fake_scalars

    zero = {id(p) for p in params if getattr(p, "_vramplan_zero_init", False)}
    qmaps = getattr(optimizer, "name2qmap", None)
    if qmaps and fake_mode is not None:
        # bitsandbytes' quantization maps were made outside the fake mode; hand it fake copies
        for key, value in list(qmaps.items()):
            qmaps[key] = fake_mode.from_tensor(value)
    step = optimizer.step

    def fake_step(*args, **kwargs):
        with fake_scalars(zero):
            return step(*args, **kwargs)

    optimizer.step = fake_step


def build_scaler(spec: TrainingSpec, device: str):
    """accelerate uses a GradScaler for fp16 mixed precision only (bf16 needs none)."""
    if spec.precision is not Precision.FP16:
        return None
    if device == "fake":
        from vramplan.simulate.stand_ins import FakeGradScaler

        return FakeGradScaler("cpu")
    return torch.amp.GradScaler(device)


def build_ema(params: list):
    from diffusers.training_utils import EMAModel

    return EMAModel(params)


def _import(name: str, opt: Optimizer):
    try:
        return __import__(name)
    except ImportError:
        raise UsageError(f"--optimizer {opt.value} needs the {name} package (pip install {name})") from None

"""Hold the analytic tier to the fake-tensor tier: the case matrix and the comparison.

`estimate` must agree with `simulate` within 3% on peak allocated for every case (issue 3).
`MATRIX_CI` is the subset CI runs (every method, precision and switch at least once);
`full_matrix()` is SD 1.5 and SDXL x every method x fp32/fp16/bf16 x GC x batch 1-2, run with
`python scripts/accuracy_matrix.py` (or `pytest -m slow`) before submitting; its table is in the
README. `other_models_matrix()`: FLUX.1-dev, SD 3.5 and SD 2.1 (`--others`).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

TOLERANCE = 0.03
# What the matrices measure: every case of the three within 0.47%, all but FLUX on int8 within
# 0.25% (docs/accuracy/). The contract is TOLERANCE; a case past CLOSE is a modelling error the
# contract lets through (FLUX's fp16-only clip replayed for bf16 was +0.93%, SD 3.5's position
# table counted in fp32 with a gradient +2.51%), so the tests hold the cases to it.
CLOSE = 0.005

MATRIX_CI = [
    {"method": "full", "precision": "fp32"},
    {"method": "dreambooth", "precision": "fp16", "gradient_checkpointing": True},
    {"method": "lora", "rank": 4, "precision": "bf16", "batch_size": 2},
    {"method": "lora", "rank": 128, "precision": "fp16"},
    {"method": "loha", "precision": "fp16", "lora_targets": "attn-mlp"},
    {"method": "lokr", "precision": "bf16"},
    {"method": "textual-inversion", "precision": "fp16"},
    {"method": "hypernetwork", "precision": "fp32"},
    {"method": "lora", "precision": "fp16", "attention": "eager"},
    {"method": "lora", "precision": "fp16", "resolution": 768},
    {"method": "lora", "precision": "bf16", "base_quant": "nf4", "optimizer": "adamw8bit"},
    {"method": "full", "precision": "bf16", "train_text_encoder": True, "gradient_checkpointing": True,
     "optimizer": "adafactor"},
    {"model": "sdxl", "method": "lora", "precision": "fp16", "gradient_checkpointing": True,
     "cache_text_embeddings": True},
    # the other models' own code paths: FLUX's fp16-only clip (bf16 graphs), SD 3.5's buffer
    {"model": "flux-dev", "method": "lora", "precision": "bf16", "resolution": 512},
    {"model": "sd35-medium", "method": "full", "precision": "bf16", "gradient_checkpointing": True,
     "optimizer": "adafactor"},
    # bitsandbytes' int8 matmul keeps its input in ctx, which checkpointing cannot drop
    {"model": "sd35-medium", "method": "lora", "precision": "bf16", "base_quant": "int8",
     "gradient_checkpointing": True, "resolution": 512},
]

METHODS = [{"method": "full"}, {"method": "dreambooth"}, {"method": "lora", "rank": 4},
           {"method": "lora", "rank": 128}, {"method": "loha"}, {"method": "lokr"},
           {"method": "textual-inversion"}, {"method": "hypernetwork"}]


def full_matrix() -> list[dict]:
    cases = []
    for model, method, precision, gc, batch in itertools.product(
            ("sd15", "sdxl"), METHODS, ("fp32", "fp16", "bf16"), (False, True), (1, 2)):
        case = {"model": model, **method, "precision": precision, "batch_size": batch}
        if gc:
            case["gradient_checkpointing"] = True
        cases.append(case)
    cases.append({"model": "sd15", "method": "lora", "precision": "fp16", "resolution": 1024})
    cases.append({"model": "sdxl", "method": "lora", "precision": "bf16", "attention": "eager",
                  "gradient_checkpointing": True})
    return cases


def other_models_matrix() -> list[dict]:
    """The catalog's other models, as their users train them: FLUX.1-dev and SD 3.5 (bf16, with
    checkpointing at 1024 px, LoRA plain and on int8 and NF4 bases, LoKr, a full fine-tune; LoRA
    at 512 px without checkpointing, with sdpa and eager attention) and SD 2.1 (fp16 at 768 px).
    Their traces are recorded like SD 1.5's and SDXL's; this holds their estimates to the same
    bounds."""
    cases = []
    for model in ("flux-dev", "sd35-medium", "sd35-large"):
        gc = {"model": model, "precision": "bf16", "gradient_checkpointing": True}
        cases += [{**gc, "method": "lora"}, {**gc, "method": "lora", "rank": 128, "batch_size": 2},
                  {**gc, "method": "lora", "base_quant": "nf4"}, {**gc, "method": "lora", "base_quant": "int8"},
                  {**gc, "method": "lokr"},
                  {**gc, "method": "full", "optimizer": "adafactor"},
                  {"model": model, "precision": "bf16", "method": "lora", "resolution": 512},
                  {"model": model, "precision": "bf16", "method": "lora", "resolution": 512, "attention": "eager"}]
    cases += [{"model": "sd21", "method": "lora", "precision": "fp16"},
              {"model": "sd21", "method": "full", "precision": "fp16", "gradient_checkpointing": True},
              {"model": "sd21", "method": "textual-inversion", "precision": "fp16"}]
    return cases


@dataclass
class Comparison:
    case: dict
    simulated: int
    estimated: int
    simulated_reserved: int
    estimated_reserved: int
    simulate_seconds: float
    estimate_seconds: float

    @property
    def error(self) -> float:
        return (self.estimated - self.simulated) / self.simulated

    @property
    def reserved_error(self) -> float:
        return (self.estimated_reserved - self.simulated_reserved) / self.simulated_reserved


def compare(case: dict) -> Comparison:
    from vramplan.estimate import estimate
    from vramplan.simulate.run import simulate
    from vramplan.spec import build_spec

    spec = build_spec(case)
    started = time.time()
    sim = simulate(spec)
    mid = time.time()
    est = estimate(spec)
    done = time.time()
    return Comparison(case, sim.footprint.peak_allocated_bytes, est.footprint.peak_allocated_bytes,
                      sim.footprint.peak_reserved_bytes, est.footprint.peak_reserved_bytes,
                      mid - started, done - mid)

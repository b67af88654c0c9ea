"""Hold the analytic tier to the fake-tensor tier: the case matrix and the comparison.

`estimate` must agree with `simulate` within 3% on peak allocated for every case (issue 3).
`MATRIX_CI` is the subset CI runs (every method, precision and switch at least once);
`full_matrix()` is SD 1.5 and SDXL x every method x fp32/fp16/bf16 x GC x batch 1-2, run with
`python scripts/accuracy_matrix.py` (or `pytest -m slow`) before submitting; its table is in the
README.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

TOLERANCE = 0.03

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

"""Hold the predictions to the measurements: every stored profile, predicted again.

For each profile the spec is rebuilt and predicted by `estimate` (and `simulate`, unless asked
not to) for the card it ran on, and each measured total gets a relative error,
(predicted - measured) / measured:
  * CUDA: peak allocated (`max_memory_allocated`), peak reserved (`max_memory_reserved`) and
    device used (NVML), against the footprint's three totals;
  * CPU: peak allocated (the tracker's peak of live tensor bytes) against the predicted peak of
    tensor bytes -- the step's records without the cuBLAS workspaces a CPU never allocates --
    and the process's RSS growth above the built model against the predicted peak above the
    load phase (NOTES.md measured RSS 6% above the tracked bytes), from `RSS_MIN_BYTES` up.
A profile that ran out of memory has no totals to compare: its verdict is compared instead
(predicted device used against the card's capacity). CPU and CUDA profiles are summarised apart:
a CPU run says nothing about the CUDA allocator or the context.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable

from vramplan.errors import UsageError
from vramplan.footprint import Category
from vramplan.gpus import CATALOG, Gpu
from vramplan.profile.result import MeasuredGpu, Profile, slugify
from vramplan.profile.store import StoredProfile, load_profiles

SOURCES = ("estimate", "simulate")
BANDS = (0.02, 0.05)
# Below this the CPU libraries' own first-use allocations swamp the step's bytes in RSS
# (the tiny pipeline: RSS grew 23 MiB over 1.1 MiB of tensors), so no error is computed.
RSS_MIN_BYTES = 256 * 2**20


class Metric(str, Enum):
    PEAK_ALLOCATED = "peak_allocated"
    PEAK_RESERVED = "peak_reserved"
    DEVICE_USED = "device_used"
    RSS_GROWTH = "rss_growth"

    @property
    def label(self) -> str:
        return {"peak_allocated": "peak allocated", "peak_reserved": "peak reserved",
                "device_used": "device used", "rss_growth": "RSS growth"}[self.value]


METRICS = {"cuda": (Metric.PEAK_ALLOCATED, Metric.PEAK_RESERVED, Metric.DEVICE_USED),
           "cpu": (Metric.PEAK_ALLOCATED, Metric.RSS_GROWTH)}


@dataclass(frozen=True)
class Prediction:
    source: str                  # "estimate" | "simulate"
    values: dict                 # Metric -> bytes
    fits: bool | None = None     # device used within the card (CUDA)


@dataclass(frozen=True)
class CaseResult:
    stored: StoredProfile
    predictions: dict = field(default_factory=dict)   # source -> Prediction
    problem: str | None = None

    @property
    def profile(self) -> Profile:
        return self.stored.profile

    @property
    def device(self) -> str:
        return self.profile.device

    def measured(self, metric: Metric) -> int | None:
        p = self.profile
        if not p.fits:
            return None
        return {Metric.PEAK_ALLOCATED: p.peak_allocated_bytes, Metric.PEAK_RESERVED: p.peak_reserved_bytes,
                Metric.DEVICE_USED: p.device_used_bytes, Metric.RSS_GROWTH: p.rss_growth_bytes}[metric]

    def predicted(self, source: str, metric: Metric) -> int | None:
        prediction = self.predictions.get(source)
        return None if prediction is None else prediction.values.get(metric)

    def error(self, source: str, metric: Metric) -> float | None:
        predicted = self.predicted(source, metric)
        if metric is Metric.RSS_GROWTH and (predicted or 0) < RSS_MIN_BYTES:
            return None
        return relative_error(predicted, self.measured(metric))

    def verdict_agrees(self, source: str) -> bool | None:
        prediction = self.predictions.get(source)
        if prediction is None or prediction.fits is None or self.device != "cuda":
            return None
        return prediction.fits == self.profile.fits


@dataclass(frozen=True)
class SummaryRow:
    device: str
    source: str
    metric: Metric
    count: int
    median_abs_error: float
    max_abs_error: float
    within_2: float              # share of cases within 2%
    within_5: float


@dataclass(frozen=True)
class VerdictRow:
    device: str
    source: str
    agree: int
    count: int


@dataclass
class Validation:
    cases: list
    summary: list
    verdicts: list
    problems: list

    def rows_for(self, device: str) -> list:
        return [row for row in self.summary if row.device == device]


def relative_error(predicted: int | None, measured: int | None) -> float | None:
    if predicted is None or measured is None or measured <= 0:
        return None
    return (predicted - measured) / measured


def validate(root: Path | str, *, simulate: bool = True,
             progress: Callable[[str], None] | None = None, card: str | None = None) -> Validation:
    """`card`: only the profiles of that card's folder (`<root>/<card>/`)."""
    say = progress or (lambda message: None)
    stored, problems = load_profiles(root)
    if card is not None:
        stored = [item for item in stored if item.path.parent.name == card]
    sources = SOURCES if simulate else SOURCES[:1]
    cases = []
    for number, item in enumerate(stored, 1):
        say(f"predicting {item.key} ({number} of {len(stored)})")
        case = predict_case(item, sources)
        if case.problem:
            problems.append(f"{item.path}: {case.problem}")
        cases.append(case)
    return Validation(cases=cases, summary=summarise(cases, sources), verdicts=verdicts(cases, sources),
                      problems=problems)


def predict_case(item: StoredProfile, sources=SOURCES) -> CaseResult:
    from vramplan.spec import spec_from_json

    profile = item.profile
    try:
        spec = spec_from_json(profile.spec)
    except UsageError as error:
        return CaseResult(item, problem=f"cannot rebuild its spec: {error}")
    if profile.device == "cuda":
        spec = spec.replace(gpu=gpu_of(profile) or spec.gpu)
    else:
        spec = spec.replace(gpu=None)
    predictions, failures = {}, []
    for source in sources:
        try:
            predictions[source] = (_predict_cuda if profile.device == "cuda" else _predict_cpu)(spec, source)
        except Exception as error:  # noqa: BLE001 - one case that cannot be predicted is a row, not a crash
            failures.append(f"{source} failed: {type(error).__name__}: {error}")
    return CaseResult(item, predictions, "; ".join(failures) or None)


def gpu_of(profile: Profile) -> Gpu | None:
    """The catalog's entry for the card a CUDA profile ran on, or one made from what it measured."""
    return None if profile.gpu is None else gpu_for(profile.gpu)


def gpu_for(gpu: MeasuredGpu, source: str = "measured by vramplan profile") -> Gpu:
    """The catalog's entry for a card torch reported, or one made from what it reported."""
    if gpu.catalog_key in CATALOG:
        return CATALOG[gpu.catalog_key]
    cc = gpu.compute_capability
    bf16 = cc is not None and int(cc.split(".")[0]) >= 8
    return Gpu(key=gpu.catalog_key or slugify(gpu.name.removeprefix("NVIDIA ")), name=gpu.name,
               memory_bytes=gpu.memory_bytes, bf16=bf16, compute_capability=cc, source=source)


def _predict_cuda(spec, source: str) -> Prediction:
    if source == "estimate":
        from vramplan.estimate import estimate

        footprint = estimate(spec).footprint
    else:
        from vramplan.simulate.run import simulate

        footprint = simulate(spec).footprint
    values = {Metric.PEAK_ALLOCATED: footprint.peak_allocated_bytes,
              Metric.PEAK_RESERVED: footprint.peak_reserved_bytes,
              Metric.DEVICE_USED: footprint.device_used_bytes}
    fits = None if spec.gpu is None else footprint.device_used_bytes <= spec.gpu.memory_bytes
    return Prediction(source, values, fits)


def _predict_cpu(spec, source: str) -> Prediction:
    """Tensor bytes only: the predicted step's records without cuBLAS workspaces."""
    from vramplan.timeline import analyse

    if source == "estimate":
        from vramplan.estimate.step import build_timeline
        from vramplan.models.inventory import load_model_inventories

        timeline = build_timeline(spec, load_model_inventories(spec.model))
        records, phases = timeline.records, timeline.clock.phases
    else:
        from vramplan.simulate.run import simulate

        simulation = simulate(spec)
        records, phases = simulation.records, simulation.phases
    records = [r for r in records if r.category is not Category.WORKSPACES]
    analysis = analyse(records, phases)
    load = next((peak for name, peak, _ in analysis.phase_peaks if name == "load"), 0)
    return Prediction(source, {Metric.PEAK_ALLOCATED: analysis.peak_bytes,
                               Metric.RSS_GROWTH: analysis.peak_bytes - load})


def summarise(cases: list, sources=SOURCES) -> list:
    rows = []
    for device, metrics in METRICS.items():
        for source in sources:
            for metric in metrics:
                errors = [abs(e) for c in cases if c.device == device
                          for e in [c.error(source, metric)] if e is not None]
                if not errors:
                    continue
                n = len(errors)
                rows.append(SummaryRow(device, source, metric, n, statistics.median(errors), max(errors),
                                       sum(e <= BANDS[0] for e in errors) / n,
                                       sum(e <= BANDS[1] for e in errors) / n))
    return rows


def verdicts(cases: list, sources=SOURCES) -> list:
    rows = []
    for source in sources:
        judged = [c.verdict_agrees(source) for c in cases if c.device == "cuda"]
        judged = [j for j in judged if j is not None]
        if judged:
            rows.append(VerdictRow("cuda", source, sum(judged), len(judged)))
    return rows

"""Find the best plans that fit: a branch-and-bound walk of the space in order of preference.

Plans are ordered lexicographically by the axes (`space.py`), each axis's values best first. The
walk visits that order depth first and never enumerates blindly, because one `estimate` costs
0.1-0.7 s. At each subtree (some axes chosen, the rest free) it asks two questions:

  * does the subtree's best completion (every free axis at its best value) fit? Then that plan is
    the subtree's first in order, and every other plan in the subtree is no better on any axis,
    so it is recorded and the subtree is done;
  * does the subtree's cheapest completion (every free axis at its least-memory value) fit? If
    not, nothing in the subtree fits (memory is monotone along each axis: a bigger batch, rank or
    resolution never needs less, checkpointing, caching and quantization never more).

Plans listed are those no earlier plan beats or equals on every axis (each is a real trade-off:
better somewhere, worse elsewhere), so the table shows the frontier, best first. Answers are
cached by spec; candidates already decided by memory order (at least as hungry as one that failed,
no hungrier than one that fit) cost nothing; a static bound (weights, optimizer states and
gradients, alive together at the end of every backward) rejects hopeless candidates without an
estimate, and the device floor (`device_floor`: the step's peak of live bytes and the context,
all of an estimate but the caching allocator's replay) rejects most others that do not fit. Both
are lower bounds, so every candidate is decided as its estimate would decide it. Once a plan is listed, a later one must beat it on some axis: before a candidate is
estimated, the values it hopes for are probed with every other free axis at its cheapest (see
`_Search._probes_fit`), and one failed probe rules out the whole family of such trade-offs.

A candidate is decided by its estimate's device used alone (`estimated_device_used`: the records
and the allocator's replay, not the composition and phase peaks); the winner gets its whole
estimate, the other plans listed when it is first read (`Plan.estimate`). A floor's records,
with their workspaces and C arrays, are handed on to that decision, and its allocator replay to
the whole estimate (`footprint_build.Prepared`). Where a floor needs a denoiser replayed afresh,
the forward is checked before the backward is replayed (`device_floor`'s `over`): without
checkpointing, or with a larger quantized base, the forward alone often rules the candidate out.

Measured (scripts/benchmark_fit.py, 2 cores): one estimate when the best plan fits outright; SD 1.5
DreamBooth on 12 GB in 5; SDXL LoRA on 8 GB, where little fits, in 18 estimates and 27 device
floors, about 0.7-0.8 s searching: 2 denoiser replays and 5 forwards that stop there (in C,
`estimate/native_replay.py`: some 10 ms each with their rows), 5 resized to another rank
(`estimate/resize.py`), the adapters spliced into 3 graphs (the largest part left, 0.15 s), the
allocator's 20 replays (0.1 s) and a few ms per candidate over the rest.

A plan fits when its device use plus the safety margin is within the card. With gradient
accumulation the gradients stay alive between micro-steps, through the next forward; `estimate`
replays the micro-steps and counts them.

Several GPUs (`--gpus N>1`): every candidate is one GPU's footprint under the candidate's strategy
(`vramplan.distributed.plan.per_gpu_records`, the first half of `estimate_distributed`; decided,
like one GPU's, by its device used alone, `per_gpu_device_used`, with its host RAM; the winner
gets the whole distributed estimate, with the same footprint). Before its device floor, which
needs the strategy's rewrite of the step, a candidate meets a bound that needs none
(`vramplan.distributed.floor`: the shared step's peaks less what the strategy may drop or
change, plus the model states it keeps): it rules out some 35 of an SDXL LoRA 2x8GB search's 80
lower bounds. Two things change in the walk. The strategy axis has no single leanest value, so
a subtree's lower bound is a set (`floor_completions`): one completion per value that may be the
leanest, and the subtree is cut only when none of them fits. And some combinations do not exist (DeepSpeed with a pure 16-bit
model, an offload with 8-bit Adam, a sharded quantized base): they are never estimated nor
listed, and the bounds are taken over the combinations that exist (the Pareto-least of them).
A plan that offloads also needs host RAM per node (`Plan.host_bytes`, what the engines pin and
keep on the CPU for every GPU of the node): it is always shown, and checked against
`--host-ram` when given.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from typing import Callable

from vramplan.errors import UsageError
from vramplan.estimate.optimizer import optimizer_state_tensors
from vramplan.estimate.overheads import cublas_workspace_bytes, cuda_context_bytes
from vramplan.estimate.result import Estimate
from vramplan.estimate.step import device_states, kept_for_tensors, kept_for_trained, step_tensors, tensors_key
from vramplan.fit.margin import SafetyMargin, safety_margin
from vramplan.fit.space import COUPLED, Axis, FitRequest, apply_values, combination_error, search_axes
from vramplan.gpus import CATALOG, Gpu
from vramplan.methods import get_method
from vramplan.models.inventory import load_model_inventories
from vramplan.precision import ITEMSIZE, trainable_dtype
from vramplan.spec import Attention, TrainingSpec
from vramplan.timeline import gc_paused

Estimator = Callable[[TrainingSpec], Estimate]


@dataclass(frozen=True)
class Plan:
    """A plan the search looked at. Its whole estimate (composition, phases: what the winner's
    grid draws) is made when first read (`estimate`) where the search decided it by its device
    used alone (`estimated_device_used`: the same figure): the table of plans reads no more, and
    the four alternatives' compositions were some 50 ms of an SDXL search."""
    spec: TrainingSpec
    made: Estimate | None            # the whole estimate, None until `estimate` makes it
    device_used_bytes: int           # the estimate's device used
    labels: tuple[str, ...]          # each axis's value, as the table shows it
    accumulation_bytes: int          # gradients kept between micro-steps (not in the estimate)
    required_bytes: int              # (device used + accumulation) * (1 + margin)
    choice: tuple[int, ...] = ()     # each axis's value index (0 = the axis's best)
    host_bytes: int | None = None    # several GPUs: host RAM per node for offloaded tensors
    host_limit: int | None = None    # --host-ram, None: not checked
    make: Callable[[], Estimate] | None = field(default=None, repr=False, compare=False)

    @property
    def estimate(self) -> Estimate:
        if self.made is None:
            object.__setattr__(self, "made", self.make())
        return self.made

    @property
    def capacity_bytes(self) -> int:
        return self.spec.gpu.memory_bytes

    @property
    def used_bytes(self) -> int:
        return self.device_used_bytes + self.accumulation_bytes

    @property
    def headroom_bytes(self) -> int:
        """Free after the margin; negative: the shortfall."""
        return self.capacity_bytes - self.required_bytes

    @property
    def device_fits(self) -> bool:
        return self.headroom_bytes >= 0

    @property
    def host_fits(self) -> bool:
        return self.host_limit is None or (self.host_bytes or 0) <= self.host_limit

    @property
    def fits(self) -> bool:
        return self.device_fits and self.host_fits

    def to_json(self) -> dict:
        out = {"spec": self.spec.to_json(), "device_used_bytes": self.device_used_bytes,
               "accumulation_bytes": self.accumulation_bytes, "required_bytes": self.required_bytes,
               "headroom_bytes": self.headroom_bytes, "fits": self.fits}
        if self.spec.is_distributed:
            out.update(per_gpu=True, num_gpus=self.spec.num_gpus, host_ram_bytes_per_node=self.host_bytes or 0,
                       host_ram_limit_bytes=self.host_limit, host_fits=self.host_fits)
        return out


@dataclass(frozen=True)
class Blocker:
    """One of the user's constraints, and what relaxing it would give."""

    constraint: str                  # "--rank 128"
    relaxed: str                     # "--rank 4"
    required_bytes: int
    fits: bool


@dataclass(frozen=True)
class FitResult:
    request: FitRequest
    axes: tuple[Axis, ...]
    margin: SafetyMargin
    plans: tuple[Plan, ...]          # best first; empty when nothing fits
    closest: Plan | None = None      # nothing fits: the plan with the least memory
    blockers: tuple[Blocker, ...] = ()
    smallest_card: Gpu | None = None  # nothing fits: the smallest catalog card the closest plan fits
    estimates: int = 0               # candidates whose estimate was counted (device used alone, or whole)
    decided_free: int = 0            # candidates decided without one
    seconds: float = 0.0
    notes: tuple[str, ...] = ()

    @property
    def best(self) -> Plan | None:
        return self.plans[0] if self.plans else None

    @property
    def fits(self) -> bool:
        return bool(self.plans)

    @property
    def varied(self) -> list[int]:
        """Indexes of the axes fit was free to choose."""
        return [i for i, axis in enumerate(self.axes) if len(axis.values) > 1]

    def to_json(self) -> dict:
        out = {"fits": self.fits, "margin": self.margin.fraction, "margin_source": self.margin.source,
               "prefer": [c.value for c in self.request.prefer], "num_gpus": self.request.spec.num_gpus,
               "host_ram_limit_bytes": self.request.host_ram,
               "plans": [p.to_json() for p in self.plans], "estimates": self.estimates,
               "seconds": round(self.seconds, 3), "notes": list(self.notes)}
        if self.closest is not None:
            out["closest"] = self.closest.to_json()
            out["shortfall_bytes"] = -self.closest.headroom_bytes
            out["blockers"] = [{"constraint": b.constraint, "relaxed": b.relaxed,
                                "required_bytes": b.required_bytes, "fits": b.fits} for b in self.blockers]
            out["smallest_card"] = None if self.smallest_card is None else self.smallest_card.key
        return out


# -- evaluation, cached ----------------------------------------------------------------------------

_ESTIMATES: dict[str, Estimate] = {}
_USED: dict[str, int] = {}        # a candidate's device used, decided without its whole estimate
_HOSTS: dict[str, int] = {}       # several GPUs: its host RAM per node, decided with it


def clear_cache() -> None:
    _ESTIMATES.clear()
    _USED.clear()
    _HOSTS.clear()


def _key(spec: TrainingSpec) -> str:
    return json.dumps(spec.to_json(), sort_keys=True)


@dataclass(frozen=True)
class PerGpuShare:
    """What a search estimate keeps of a distributed plan beside one GPU's footprint: host RAM,
    the model states per GPU and the engines' rules (the whole `DistributedPlan`, with the
    single-GPU comparison and what an offload saves, is computed for the winner only)."""

    host: object                     # vramplan.distributed.host.HostRam
    model_states: dict
    rules: tuple

    def per_gpu_json(self, estimate: Estimate) -> dict:
        spec = estimate.spec
        return {"strategy": spec.strategy.value, "offload": spec.offload.value, "num_gpus": spec.num_gpus,
                "device_used_bytes": estimate.footprint.device_used_bytes,
                "model_states": dict(self.model_states), "rules": list(self.rules)}


# One GPU's records of the last spec whose device floor was taken, for its estimate to follow.
_PER_GPU: list = []


def _per_gpu_records(spec: TrainingSpec, keep: bool = False):
    from vramplan.distributed.plan import per_gpu_records

    key = _key(spec)
    if _PER_GPU:
        (known, parts), = _PER_GPU
        _PER_GPU.clear()
        if known == key:
            return parts
    parts = per_gpu_records(spec, load_model_inventories(spec.model))
    if keep:
        _PER_GPU.append((key, parts))
    return parts


def per_gpu_estimate(spec: TrainingSpec) -> Estimate:
    """One GPU's footprint under the spec's strategy, and host RAM: what `estimate_distributed`
    computes first, without the same spec on one GPU and the no-offload comparison it adds for
    the report (a third to a half of its time)."""
    from vramplan.footprint_build import build_footprint

    rw, states, host, rules = _per_gpu_records(spec)
    footprint, _, notes = build_footprint(rw.records, rw.phases, spec.gpu, "estimate", spec.gradient_checkpointing,
                                          prepared=rw.prepared)
    return Estimate(spec=spec, parameters={}, footprint=footprint, notes=tuple(notes),
                    distributed=PerGpuShare(host, states, tuple(rules)))


def per_gpu_device_used(spec: TrainingSpec) -> tuple[int, int]:
    """`per_gpu_estimate(spec)`'s device used and host RAM per node, without the composition and
    phase peaks (`footprint_build.device_used_bytes`: the same figure). The records, with their C
    arrays and allocator replay, are handed on to the estimate of the same spec, if it follows."""
    from vramplan.footprint_build import device_used_bytes, prepare

    rw, _, host, _ = _per_gpu_records(spec, keep=True)
    if rw.prepared is None:
        rw.prepared = prepare(rw.records, rw.phases, spec.gpu, spec.gradient_checkpointing)
    return (device_used_bytes(rw.records, rw.phases, spec.gpu, spec.gradient_checkpointing, prepared=rw.prepared),
            host.bytes_per_node)


def _default_estimator(spec: TrainingSpec) -> Estimate:
    if spec.is_distributed:
        return per_gpu_estimate(spec)
    import vramplan.estimate

    return vramplan.estimate.estimate(spec)


def host_bytes(estimate: Estimate) -> int | None:
    """Host RAM per node of a distributed estimate (offloaded tensors), None for one GPU."""
    host = getattr(estimate.distributed, "host", None)
    return None if host is None else host.bytes_per_node


def static_bytes(spec: TrainingSpec, inventories: dict) -> int:
    """A lower bound of device used that needs no step replay: what is alive together when the
    second step's backward has made its last gradient -- resident weights, the optimizer states
    of the first step, every gradient -- plus one cuBLAS workspace and the CUDA context. One GPU
    only: a strategy shards these, so a distributed spec has no such bound (0)."""
    if spec.is_distributed:
        return 0
    trained, weights = step_tensors(spec, inventories)
    itemsize = ITEMSIZE[trainable_dtype(spec)]
    weights, gradients = kept_for_tensors(spec, inventories, lambda: (
        sum(t.nbytes for t in weights), sum(t.numel for ts in trained.values() for t in ts) * itemsize),
        "static bytes")
    states = kept_for_trained(spec, inventories, lambda: sum(
        s.nbytes for s in device_states(spec, inventories, trained, itemsize)), "states bytes", spec.optimizer,
        spec.momentum, itemsize)
    return weights + states + gradients + cublas_workspace_bytes(spec.gpu) + cuda_context_bytes(spec.gpu)


class _Exceeded(Exception):
    """A build stopped early: the records so far already need `bound` bytes."""

    def __init__(self, bound: int):
        super().__init__(bound)
        self.bound = bound


def device_floor(spec: TrainingSpec, over: Callable[[int], bool] | None = None) -> int:
    """A lower bound of device used from the step's records alone, before the caching allocator
    is replayed over them (most of an estimate's time): the peak of live bytes, cuBLAS workspaces
    included, plus the CUDA context. `build_footprint`'s device used is that plus the allocator's
    block slack and reserve, never negative, so this never exceeds the estimate. The records, with
    their workspaces and C arrays (`footprint_build.prepare`), are handed on to the estimate of
    the same spec, if it follows.

    `over(bytes)`: the caller rejects the candidate above that. Where the step's denoiser is
    replayed afresh (a replay costs more than the rest of the build), its forward is checked
    first: the records so far are the step's first ones, and what is live at each event so far
    is what the whole step has live there, so their peak plus the context is a lower bound too.
    When it is `over`, that is the floor returned: no backward, nothing kept. Without
    checkpointing, the activations a forward keeps rule most such candidates out."""
    from vramplan.estimate.step import build_timeline
    from vramplan.footprint_build import prepare

    if spec.is_distributed:
        if over is not None:
            from vramplan.distributed.floor import strategy_floor

            bound = strategy_floor(spec, load_model_inventories(spec.model))
            if over(bound):
                return bound
        rw = _per_gpu_records(spec, keep=True)[0]
        records, phases, last_event = rw.records, rw.phases, None
    else:
        context = cuda_context_bytes(spec.gpu)

        def check(records) -> None:
            bound = peak_live_bytes(records) + context
            if over(bound):
                raise _Exceeded(bound)

        try:
            timeline = build_timeline(spec, load_model_inventories(spec.model), hand_on=True,
                                      check=None if over is None else check)
        except _Exceeded as stopped:
            return stopped.bound
        records, phases, last_event = timeline.records, timeline.clock.phases, timeline.clock.now
    prepared = prepare(records, phases, spec.gpu, spec.gradient_checkpointing)
    (rw if spec.is_distributed else timeline).prepared = prepared
    if last_event is not None:
        last_event = max([last_event] + [e for _, e in phases])
    prepared.peak = peak_live_bytes(records, prepared.workspaces, last_event, prepared.columns)
    return prepared.peak + cuda_context_bytes(spec.gpu)


def estimated_device_used(spec: TrainingSpec) -> int:
    """`estimate(spec).footprint.device_used_bytes`, one GPU, counted without the composition:
    the step's records (those `device_floor` handed on, when it took this spec's last) and their
    allocator replay. They are handed on again, for the estimate of the same spec if it follows."""
    from vramplan.estimate.step import build_timeline
    from vramplan.footprint_build import device_used_bytes, prepare

    timeline = build_timeline(spec, load_model_inventories(spec.model), hand_on=True)
    if timeline.prepared is None:
        timeline.prepared = prepare(timeline.records, timeline.clock.phases, spec.gpu, spec.gradient_checkpointing)
    return device_used_bytes(timeline.records, timeline.clock.phases, spec.gpu, spec.gradient_checkpointing,
                             prepared=timeline.prepared)


def peak_live_bytes(records: list, extra: list = (), last_event: int | None = None, columns=None) -> int:
    """The most bytes live at once over the records and `extra` (`timeline.analyse`'s peak): in C
    where `vramplan.native` is built, else in Python. There, `last_event`: no record's events go
    past it, so they index a list (a step's clock: one event per allocation or free); without
    it, sparse events (the distributed rewrite's) are summed in a dict. `columns`: the records
    and `extra` as `native.Columns`, when the caller has them."""
    from vramplan import native

    columns = columns or native.columns(records, extra)
    peak = native.peak_live_bytes(columns) if columns is not None else None
    if peak is not None:
        return peak
    if last_event is not None:
        deltas = [0] * (last_event + 2)
        for group in (records, extra):
            for r in group:
                deltas[r.alloc_at] += r.nbytes
                if r.free_at is not None:
                    deltas[r.free_at] -= r.nbytes
        return max(0, max(itertools.accumulate(deltas)))
    by_event: dict[int, int] = {}
    get = by_event.get
    for group in (records, extra):
        for r in group:
            by_event[r.alloc_at] = get(r.alloc_at, 0) + r.nbytes
            if r.free_at is not None:
                by_event[r.free_at] = get(r.free_at, 0) - r.nbytes
    return max(0, max(itertools.accumulate(by_event[e] for e in sorted(by_event)), default=0))


def accumulation_bytes(spec: TrainingSpec, inventories: dict) -> int:
    """Bytes fit would add for gradient accumulation: none, since `estimate` replays the
    micro-steps itself (the gradients kept between them included; vramplan/estimate/step.py)."""
    return 0


class _Search:
    def __init__(self, request: FitRequest, axes: list[Axis], margin: SafetyMargin, estimator: Estimator):
        self.request, self.axes, self.margin, self.estimator = request, axes, margin, estimator
        self.capacity = request.gpu.memory_bytes
        self.inventories = load_model_inventories(request.spec.model)
        self.fit_raw: dict[tuple, bool] = {}     # choice -> fits, device use alone
        self.failed: list[tuple] = []            # choices that failed by device use alone
        self.fitting: list[tuple] = []
        self.plans: list[tuple[tuple, Plan]] = []
        self.estimates = 0
        self.decided_free = 0
        self.unavailable: dict[str, TrainingSpec] = {}   # why a candidate could not be estimated
        self.banned: set[tuple[int, int]] = set()        # (axis, value) the estimate cannot count
        # several GPUs: combinations of the coupled axes' values the engines refuse
        self.combinations = request.distributed
        self.coupled = tuple(i for i, a in enumerate(axes) if a.criterion in COUPLED)
        self._valid: dict[tuple, bool] = {}
        self._floors: dict[tuple, list] = {}
        self._static: dict[tuple, int] = {}
        # the real estimate's lower bound from the step's records (a made-up estimator has none)
        self.device_floor = device_floor if estimator is _default_estimator else None

    # -- one candidate -----------------------------------------------------------------------
    def spec(self, choice: tuple) -> TrainingSpec:
        return apply_values(self.request, self.axes, choice)

    def valid(self, choice: tuple) -> bool:
        """Is this a combination the engines run? (Always, on one GPU.) Only the coupled axes
        (precision, quantization, optimizer, strategy) decide it, so it is cached by them."""
        if not self.combinations:
            return True
        key = tuple(choice[i] for i in self.coupled)
        known = self._valid.get(key)
        if known is None:
            known = self._valid[key] = combination_error(self.spec(choice)) is None
        return known

    def estimate(self, spec: TrainingSpec) -> Estimate | None:
        """The estimate, or None where the analytic tier cannot count this spec (a trace not
        recorded for it): such a candidate is never listed, and never prunes others."""
        key = _key(spec)
        if key in _ESTIMATES:
            return _ESTIMATES[key]
        if key not in _USED:
            self.estimates += 1
        try:
            result = _ESTIMATES[key] = self.estimator(spec)
        except UsageError as error:
            self._cannot_count(spec, key, error)
            return None
        return result

    def device_used(self, spec: TrainingSpec) -> int | None:
        """The estimate's device used, None where it cannot be counted. For the real estimate on
        one GPU, without the composition and phase peaks the estimate adds for display
        (`footprint_build.device_used_bytes`, on the records the device floor handed on): most
        candidates are only decided, and the composition was a tenth of an SDXL search. A plan's
        whole estimate (`Plan.estimate`) has this figure as its device used."""
        key = _key(spec)
        if key in _ESTIMATES:
            known = _ESTIMATES[key]
            return None if known is None else known.footprint.device_used_bytes
        if key in _USED:
            return _USED[key]
        if self.device_floor is None:
            known = self.estimate(spec)
            return None if known is None else known.footprint.device_used_bytes
        self.estimates += 1
        try:
            if spec.is_distributed:
                used, _HOSTS[key] = per_gpu_device_used(spec)
                _USED[key] = used
            else:
                used = _USED[key] = estimated_device_used(spec)
        except UsageError as error:
            self._cannot_count(spec, key, error)
            return None
        return used

    def _cannot_count(self, spec: TrainingSpec, key: str, error: UsageError) -> None:
        """The analytic tier cannot count this spec: say why once, leave out the axis values
        that select it (`_ban`), and remember it (never listed, never pruning others)."""
        self.unavailable.setdefault(str(error), spec)
        self._ban(spec, str(error))
        _ESTIMATES[key] = None

    def _ban(self, spec: TrainingSpec, message: str) -> None:
        """A missing recorded trace names the variant it was for ("unet.amp-frozen-nf4.sdpa"):
        the axis values that select that variant are left out of the rest of the walk."""
        found = re.search(r"trace \S+?/(\S+?)\.(sdpa|eager)\b", message)
        if not found:
            return
        variant, attention = found.groups()
        for i, axis in enumerate(self.axes):
            for j, values in enumerate(axis.values):
                if j == 0 or any(getattr(spec, k) != v for k, v in values.items()):
                    continue
                quant = values.get("base_quant")
                precision = values.get("precision")
                if (quant is not None and f"-{quant.value}" in variant
                        or precision is not None and precision.value.endswith("-pure") and "pure" in variant
                        or values.get("attention") is Attention.EAGER and attention == "eager"):
                    self.banned.add((i, j))

    def allowed(self, axis_index: int, value: int) -> bool:
        return (axis_index, value) not in self.banned

    def _no_hungrier(self, a: tuple, b: tuple) -> bool:
        """Candidate a never needs more memory than b, axis by axis."""
        return all(axis.never_more(x, y) for axis, x, y in zip(self.axes, a, b))

    def fits_raw(self, choice: tuple, prefix: tuple | None = None) -> bool:
        """Does the candidate's device use (plus the margin) fit, accumulation aside? A
        combination that does not exist does not fit, and teaches nothing about its neighbours."""
        if not self.valid(choice):
            return False
        known = self.fit_raw.get(choice)
        if known is not None:
            return known
        if any(self._no_hungrier(f, choice) for f in self.failed) or (
                prefix is not None and not self._probes_fit(choice, prefix)):
            result = False
            self.decided_free += 1
        elif any(self._no_hungrier(choice, g) for g in self.fitting):
            result = True
            self.decided_free += 1
        else:
            spec = self.spec(choice)
            if self.margin.required(self._static_bytes(spec)) > self.capacity or self._floor_fails(spec):
                result = False
                self.decided_free += 1
            else:
                used = self.device_used(spec)
                if used is None:
                    return True  # unknown: it may fit, so it prunes nothing
                result = self.margin.required(used) <= self.capacity
        self.fit_raw[choice] = result
        (self.fitting if result else self.failed).append(choice)
        return result

    def _static_bytes(self, spec: TrainingSpec) -> int:
        """`static_bytes`, once per distinct weights, trained tensors and optimizer (the card and
        the inventories are the search's)."""
        key = tensors_key(spec, self.inventories, get_method(spec.method), "static", spec.optimizer, spec.momentum)
        if key is None:
            return static_bytes(spec, self.inventories)
        known = self._static.get(key)
        if known is None:
            known = self._static[key] = static_bytes(spec, self.inventories)
        return known

    def _floor_fails(self, spec: TrainingSpec) -> bool:
        """Does the device floor (`device_floor`) alone rule the candidate out? Not decided when
        the estimate is known already, or when the floor cannot be counted (the estimate will
        say why)."""
        if self.device_floor is None or _key(spec) in _ESTIMATES:
            return False
        def over(nbytes: int) -> bool:
            return self.margin.required(nbytes) > self.capacity

        try:
            floor = self.device_floor(spec, over)
        except UsageError:
            return False
        return over(floor)

    def _probes_fit(self, choice: tuple, prefix: tuple) -> bool:
        """Once plans are listed, a new one must beat each of them on some axis. For each axis
        where this candidate does, first try that value with every other free axis at its
        cheapest -- free of the walk's prefix first (the most general bound, shared by every
        candidate hoping for that value), then keeping the prefix's choices one axis at a time.
        If a probe fails, so does the candidate: memory grows along each axis. One failed probe
        rules out a whole family of trade-offs, where estimating each member would cost one call."""
        if not self.plans:
            return True
        hopes = [i for i, axis in enumerate(self.axes)
                 if choice[i] not in axis.floor and any(found[i] > choice[i] for found, _ in self.plans)]
        if not hopes:
            return True
        for depth in range(len(prefix) + 1):
            if depth and prefix[depth - 1] == self.axes[depth - 1].cheapest and not self.combinations:
                continue  # the same probes as one axis up
            free = [i for i in hopes if i >= depth]
            # each hoped-for value alone, then all of them together
            for group in [[i] for i in free] + ([free] if len(free) > 1 else []):
                probes = self.floor_completions(prefix[:depth], {i: choice[i] for i in group})
                if not probes or choice in probes:
                    continue  # no bound, or the candidate is its own
                if not any(self.fits_raw(probe) for probe in probes):
                    return False
        return True

    def plan(self, choice: tuple) -> Plan | None:
        """The candidate as a plan. Its whole estimate is made now for the first plan listed (the
        winner: its grid is drawn) and where nothing fits; for the others when first read."""
        if not self.valid(choice):
            return None
        spec = self.spec(choice)
        estimate, make = None, None
        if self.plans and self.device_floor is not None:
            used = self.device_used(spec)
            if used is None:
                return None
            make = functools.partial(self.estimate, spec)
        else:
            estimate = self.estimate(spec)
            if estimate is None:
                return None
            used = estimate.footprint.device_used_bytes
        extra = accumulation_bytes(spec, self.inventories)
        required = self.margin.required(used + extra)
        labels = tuple(axis.labels[i] for axis, i in zip(self.axes, choice))
        return Plan(spec=spec, made=estimate, device_used_bytes=used, labels=labels, accumulation_bytes=extra,
                    required_bytes=required, choice=tuple(choice),
                    host_bytes=self._host_bytes(spec) if estimate is None else host_bytes(estimate),
                    host_limit=self.request.host_ram, make=make)

    def _host_bytes(self, spec: TrainingSpec) -> int | None:
        """Host RAM per node of a candidate decided (`device_used`): from its estimate, if made."""
        key = _key(spec)
        known = _ESTIMATES.get(key)
        return host_bytes(known) if known is not None else _HOSTS.get(key)

    def fits(self, choice: tuple, prefix: tuple = ()) -> Plan | None:
        """The plan if it fits, accumulation included (`prefix`: the walk's node, for probes)."""
        if not self.fits_raw(choice, prefix):
            return None
        plan = self.plan(choice)
        return plan if plan is not None and plan.fits else None

    def leanest_available(self) -> Plan | None:
        """The least-memory plan the estimate can count: the leanest of the floor completions,
        else the nearest one with one axis moved off a value it cannot count."""
        floors = self.floor_completions(())
        plans = [plan for plan in (self.plan(choice) for choice in floors) if plan is not None]
        if plans:
            return min(plans, key=lambda p: (p.required_bytes, p.choice))
        lean = floors[0] if floors else self._lowest_completion(())
        candidates = [lean]
        for i, axis in enumerate(self.axes):
            for value in reversed(range(len(axis.values))):
                if value != lean[i]:
                    candidates.append(lean[:i] + (value,) + lean[i + 1:])
        for choice in candidates:
            plan = self.plan(choice)
            if plan is not None:
                return plan
        return None

    # -- the walk ----------------------------------------------------------------------------
    def best_completion(self, prefix: tuple) -> tuple:
        return prefix + (0,) * (len(self.axes) - len(prefix))

    def _lowest(self, i: int) -> int:
        axis = self.axes[i]
        value = axis.cheapest
        if not self.allowed(i, value):
            usable = [v for v in range(len(axis.values)) if self.allowed(i, v)]
            value = usable[-1] if usable else value
        return value

    def _lowest_completion(self, prefix: tuple) -> tuple:
        return prefix + tuple(self._lowest(i) for i in range(len(prefix), len(self.axes)))

    def cheapest_completion(self, prefix: tuple) -> tuple | None:
        """One completion of the prefix with the least memory (the likeliest-leanest of the
        floor on several GPUs), None when no combination of the prefix exists."""
        floors = self.floor_completions(prefix)
        return floors[0] if floors else None

    def floor_completions(self, prefix: tuple, pins: dict | None = None) -> list[tuple]:
        """Completions of `prefix` (with `pins`: {axis: value} fixed too) that bound the subtree
        from below: every candidate in it needs at least as much memory as one of them.

        One GPU: one completion, every free axis at its cheapest value. Several GPUs: the free
        coupled axes (precision, quantization, optimizer, strategy) take every combination that
        exists and is least by the axes' memory orders (no other existing one is no hungrier on
        all of them); the strategy's own floor has several values, and a coupled axis may have
        to leave its cheapest value for a combination to exist (offloading needs AdamW)."""
        pins = pins or {}
        key = (prefix, tuple(sorted(pins.items())))
        known = self._floors.get(key)
        if known is not None:
            return known
        fixed = dict(enumerate(prefix))
        fixed.update(pins)
        base = [fixed[i] if i in fixed else self._lowest(i) for i in range(len(self.axes))]
        free = [i for i in self.coupled if i not in fixed and len(self.axes[i].values) > 1]
        if not self.combinations or not free:
            out = [tuple(base)] if self.valid(tuple(base)) else []
        else:
            out = self._least_combinations(base, free)
        self._floors[key] = out
        return out

    def _least_combinations(self, base: list, free: list[int]) -> list[tuple]:
        def rank(i: int, v: int) -> int:
            floor = self.axes[i].floor
            return floor.index(v) if v in floor else len(floor) + len(self.axes[i].values) - 1 - v

        values = [[v for v in range(len(self.axes[i].values)) if self.allowed(i, v)] for i in free]
        existing = []
        for combo in itertools.product(*values):
            choice = list(base)
            for i, v in zip(free, combo):
                choice[i] = v
            if self.valid(tuple(choice)):
                existing.append(combo)
        existing.sort(key=lambda combo: [rank(i, v) for i, v in zip(free, combo)])

        def no_hungrier(a, b):
            return all(self.axes[i].never_more(x, y) for i, x, y in zip(free, a, b))

        least = []
        for combo in existing:   # leanest-looking first: a tie keeps the first one
            if not any(no_hungrier(kept, combo) for kept in least):
                least = [kept for kept in least if not no_hungrier(combo, kept)] + [combo]
        out = []
        for combo in least:
            choice = list(base)
            for i, v in zip(free, combo):
                choice[i] = v
            out.append(tuple(choice))
        return out

    def dominated(self, choice: tuple) -> bool:
        """An already listed plan is at least as good on every axis."""
        return any(all(x <= y for x, y in zip(found, choice)) for found, _ in self.plans)

    def floor_fits(self, prefix: tuple) -> bool:
        """May anything in the subtree fit? (Any of its floor completions does.)"""
        return any(self.fits_raw(choice, prefix) for choice in self.floor_completions(prefix))

    def walk(self, prefix: tuple = ()) -> None:
        if len(self.plans) >= self.request.top:
            return
        best = self.best_completion(prefix)
        if not all(self.allowed(i, v) for i, v in enumerate(best)) or not self.valid(best):
            best = None
        if best is not None:
            if self.dominated(best):
                return
            plan = self.fits(best, prefix)
            if plan is not None:
                self.plans.append((best, plan))
                return
        if len(prefix) == len(self.axes):
            return
        if not self.floor_fits(prefix):
            return
        for index in range(len(self.axes[len(prefix)].values)):
            if self.allowed(len(prefix), index):
                self.walk(prefix + (index,))


def optimizer_state_sizes(request: FitRequest) -> list[int] | None:
    """Device bytes of each searched optimizer's states for this spec's trained tensors: the
    memory order of the optimizer axis (their step transients follow the same tensors)."""
    from vramplan.fit.space import SEARCHED_OPTIMIZERS

    spec = request.spec
    if "optimizer" in request.given:
        return None
    inventories = load_model_inventories(spec.model)
    trained = get_method(spec.method).trainable_tensors(spec, inventories)
    shapes = [t.shape for ts in trained.values() for t in ts]
    itemsize = ITEMSIZE[trainable_dtype(spec)]
    return [sum(s.nbytes for s in optimizer_state_tensors(o, shapes, itemsize) if not s.on_host)
            for o in SEARCHED_OPTIMIZERS]


def search(request: FitRequest, estimator: Estimator | None = None,
           margin: SafetyMargin | None = None) -> FitResult:
    """The best plans for the request, best first, or why none fits."""
    # millions of short-lived records and next to no reference cycles: the cyclic collector's
    # passes over everything alive (kept replays included) took a third of an SDXL search. (The
    # CLI also freezes what the search leaves alive, `cli._searching`.)
    with gc_paused():
        return _search(request, estimator, margin)


def _search(request: FitRequest, estimator: Estimator | None, margin: SafetyMargin | None) -> FitResult:
    start = time.perf_counter()
    whole = estimator is None        # the real estimate: the winner gets its whole distributed one
    estimator = estimator or _default_estimator
    margin = margin or safety_margin(request.margin, card=request.gpu.key if request.gpu else None)
    axes = search_axes(request, optimizer_state_sizes(request))
    if any(not axis.values for axis in axes):
        raise UsageError("fit has nothing to search: an axis has no value (check --min-resolution)")
    walk = _Search(request, axes, margin, estimator)
    walk.walk()
    plans = tuple(plan for _, plan in walk.plans)
    notes = [f"not searched, the estimate cannot count it: {why}" for why in walk.unavailable]
    if any(p.accumulation_bytes for p in plans):
        notes.append("with gradient accumulation the gradients stay alive between micro-steps; "
                     "fit counts them on top of the one-step estimate")
    if plans:
        if whole:
            plans = (with_whole_estimate(plans[0]),) + plans[1:]
        notes += distributed_notes(request, plans)
        return FitResult(request=request, axes=tuple(axes), margin=margin, plans=plans,
                         estimates=walk.estimates, decided_free=walk.decided_free,
                         seconds=time.perf_counter() - start, notes=tuple(notes))
    from vramplan.fit.explain import explain

    closest = walk.leanest_available()
    blockers = explain(request, walk, closest) if closest is not None else []
    smallest = smallest_card(closest) if closest is not None else None
    notes = [f"not searched, the estimate cannot count it: {why}" for why in walk.unavailable]
    if closest is not None and whole:
        closest = with_whole_estimate(closest)
    notes += distributed_notes(request, (closest,) if closest is not None else ())
    return FitResult(request=request, axes=tuple(axes), margin=margin, plans=(), closest=closest,
                     blockers=tuple(blockers), smallest_card=smallest, estimates=walk.estimates,
                     decided_free=walk.decided_free, seconds=time.perf_counter() - start,
                     notes=tuple(notes))


def with_whole_estimate(plan: Plan) -> Plan:
    """The plan with the whole distributed estimate (`estimate_distributed`: per-GPU model
    states, the same spec on one GPU, what an offload saves, the published formulas), whose
    footprint is the one the search used."""
    if not plan.spec.is_distributed or not isinstance(plan.estimate.distributed, PerGpuShare):
        return plan
    import dataclasses

    import vramplan.estimate

    return dataclasses.replace(plan, made=vramplan.estimate.estimate(plan.spec))


def distributed_notes(request: FitRequest, plans) -> list[str]:
    """What a several-GPU table means: per GPU, batch per GPU, host RAM checked or not."""
    spec = request.spec
    if not request.distributed:
        return []
    notes = [f"per GPU: device used, the margin and the grid are one GPU's of {spec.num_gpus}; --batch-size "
             f"is per GPU, as accelerate counts it, so each optimizer step takes {spec.num_gpus} x the "
             f"batch x the accumulation images"]
    if request.host_ram is not None:
        notes.append(f"host RAM per node (the offloaded tensors of all {spec.num_gpus} GPUs) checked against "
                     f"--host-ram {request.host_ram / 1e9:.1f} GB")
    elif any(p.host_bytes for p in plans):
        notes.append("host RAM per node (offloaded tensors only) is not checked: give --host-ram SIZE "
                     "to rule out plans the machine cannot hold")
    return notes


def smallest_card(plan: Plan) -> Gpu | None:
    """The catalog card with the least memory that holds the plan (margin included)."""
    needs_bf16 = plan.spec.precision.needs_bf16
    cards = [g for g in CATALOG.values() if g.memory_bytes >= plan.required_bytes
             and (g.bf16 or not needs_bf16)]
    return min(cards, key=lambda g: g.memory_bytes) if cards else None

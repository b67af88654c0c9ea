"""When nothing fits: which of the user's constraints make it impossible.

Each constraint the user set (a fixed flag, a lower bound, a costly switch, the method itself) is
relaxed alone, and the leanest plan of the relaxed space is estimated: a constraint whose
relaxation fits is a blocker on its own. When none fits alone, all are relaxed together. The
resolution, which fit lowers only under --min-resolution, is relaxed to the largest size whose
leanest plan fits (a bisection over the sizes, memory growing with size). On several GPUs a
fixed --strategy / --offload is a constraint like any flag, and --host-ram is one when the
leanest plan fits the cards but offloads more than the host holds.
"""

from __future__ import annotations

import dataclasses

from vramplan.fit.space import AXIS_FIELDS, Criterion, FitRequest, search_axes, strategy_label
from vramplan.spec import LoraTargets, Method, TrainingSpec, build_spec


def _rebuild(spec: TrainingSpec, drop: set = frozenset(), **changes) -> TrainingSpec:
    """The spec as build_spec makes it from the user's flags, minus `drop`, plus `changes`."""
    data = spec.to_json()
    options = {}
    for name in spec.given - set(drop) - set(changes):
        value = data.get(name)
        if name == "resolution" and isinstance(value, list):
            value = f"{value[0]}x{value[1]}"
        elif name == "hypernetwork_layers" and value is not None:
            value = ",".join(str(v) for v in value)
        if value is not None:
            options[name] = value
    options.pop("gpus", None)           # the card and the count are carried below
    options["model"] = spec.model
    options["gpu"] = spec.gpu
    if spec.num_gpus > 1:
        options["num_gpus"] = spec.num_gpus
    options.update(changes)
    return build_spec(options)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _value(spec: TrainingSpec, name: str) -> str:
    value = getattr(spec, name)
    if isinstance(value, bool):
        return ""
    if isinstance(value, tuple):
        return "x".join(str(v) for v in value)
    return " " + str(value.value if hasattr(value, "value") else value)


def relaxations(request: FitRequest) -> list[tuple[str, FitRequest]]:
    """(the constraint, as the user wrote it; the request without it)."""
    spec, given = request.spec, request.given
    out = []
    for criterion, fields in AXIS_FIELDS.items():
        if criterion is Criterion.RESOLUTION:
            continue
        names = [n for n in fields if n in given]
        if not names:
            continue
        words = " ".join(_flag(n) + _value(spec, n) if not isinstance(getattr(spec, n), bool)
                         else (_flag(n) if getattr(spec, n) else "--no-" + _flag(n)[2:]) for n in names)
        out.append((words, dataclasses.replace(request, given=given - set(fields),
                                               min_rank=None if criterion is Criterion.RANK else request.min_rank)))
    if request.min_rank is not None and "rank" not in given:
        out.append((f"--min-rank {request.min_rank}", dataclasses.replace(request, min_rank=None)))
    costly = [("train_text_encoder", {"train_text_encoder": False}),
              ("ema", {"ema": False}),
              ("prior_preservation", {"prior_preservation": False})]
    for name, changes in costly:
        if name in given and getattr(spec, name) and not (name == "prior_preservation"
                                                          and spec.method is Method.DREAMBOOTH):
            out.append((_flag(name), _with_spec(request, _rebuild(spec, {name}, **changes))))
    if "lora_targets" in given and spec.lora_targets not in (None, LoraTargets.ATTN):
        out.append((f"--lora-targets {spec.lora_targets.value}",
                    _with_spec(request, _rebuild(spec, {"lora_targets"}))))
    if spec.method.trains_denoiser:
        drop = {"method", "ema", "prior_preservation", "rank", "alpha", "lora_targets"}
        out.append((f"--method {spec.method.value}",
                    _with_spec(request, _rebuild(spec, drop, method="lora"))))
    return out


def _with_spec(request: FitRequest, spec: TrainingSpec) -> FitRequest:
    return dataclasses.replace(request, spec=spec, given=frozenset(spec.given))


def _leanest(request: FitRequest, walk):
    """The least-memory plan of a request, estimated through the main walk's cache and margin."""
    from vramplan.fit.walk import _Search, optimizer_state_sizes

    axes = search_axes(request, optimizer_state_sizes(request))
    sub = _Search(request, axes, walk.margin, walk.estimator)
    plan = sub.leanest_available()
    walk.estimates += sub.estimates
    walk.unavailable.update(sub.unavailable)
    return plan


def relax_all(request: FitRequest) -> FitRequest:
    """Every relaxation at once: all axes free, costly switches off, adapters for full methods."""
    spec = request.spec
    drop = {name for name in ("train_text_encoder", "ema", "lora_targets") if name in spec.given}
    if "prior_preservation" in spec.given and spec.method is not Method.DREAMBOOTH:
        drop.add("prior_preservation")
    changes = {}
    if spec.method.trains_denoiser:
        drop |= {"method", "ema", "prior_preservation", "rank", "alpha", "lora_targets"}
        changes["method"] = "lora"
    relaxed = _rebuild(spec, drop, **changes) if drop or changes else spec
    free = set().union(*AXIS_FIELDS.values()) | {"method"}
    return dataclasses.replace(request, spec=relaxed, given=frozenset(relaxed.given) - free, min_rank=None)


def explain(request: FitRequest, walk, closest) -> list:
    from vramplan.fit.walk import Blocker

    blockers = []
    for words, relaxed in relaxations(request):
        plan = _leanest(relaxed, walk)
        if plan is None or plan.spec == closest.spec:
            continue  # relaxing it changes nothing the leanest plan could use
        blockers.append(Blocker(words, _describe(plan.spec, closest.spec), plan.required_bytes, plan.fits))
    host = _host_blocker(request, walk)
    if host is not None:
        blockers.append(host)
    resolution = _resolution_blocker(request, walk, closest)
    if resolution is not None:
        blockers.append(resolution)
    if len(blockers) > 1 and not any(b.fits for b in blockers):
        everything = relax_all(request)
        plan = _leanest(everything, walk)
        if plan is not None:
                blockers.append(Blocker("all of them together", _describe(plan.spec, closest.spec),
                                    plan.required_bytes, plan.fits))
    return blockers


def _host_blocker(request: FitRequest, walk):
    """--host-ram: the best plan that fits the cards when host RAM is not checked, and the host
    RAM it needs."""
    from vramplan.fit.walk import Blocker, _Search, optimizer_state_sizes

    if request.host_ram is None:
        return None
    relaxed = dataclasses.replace(request, host_ram=None, top=1)
    sub = _Search(relaxed, search_axes(relaxed, optimizer_state_sizes(relaxed)), walk.margin, walk.estimator)
    sub.walk()
    walk.estimates += sub.estimates
    if not sub.plans:
        return None
    plan = sub.plans[0][1]
    spec = plan.spec
    return Blocker(f"--host-ram {request.host_ram / 1e9:.1f}GB",
                   f"{(plan.host_bytes or 0) / 1e9:.1f} GB of host RAM per node for "
                   f"{strategy_label(spec.strategy, spec.offload, spec.fsdp_sharding)}: "
                   + _describe(spec, request.spec), plan.required_bytes, True)


def _describe(plan_spec: TrainingSpec, original: TrainingSpec) -> str:
    """The leanest relaxed plan's settings that differ from the user's, as flags."""
    words = []
    for name in ("method", "precision", "base_quant", "rank", "optimizer", "batch_size",
                 "gradient_accumulation_steps", "resolution", "gradient_checkpointing", "attention",
                 "cache_latents", "cache_text_embeddings", "train_text_encoder", "ema",
                 "prior_preservation", "lora_targets", "strategy", "fsdp_sharding", "offload"):
        new, old = getattr(plan_spec, name), getattr(original, name)
        if new == old or new is None or (name == "lora_targets" and new is LoraTargets.ATTN):
            continue
        if isinstance(new, bool):
            words.append(_flag(name) if new else "--no-" + _flag(name)[2:])
        else:
            words.append(_flag(name) + _value(plan_spec, name))
    return " ".join(words) or "(same settings)"


def _resolution_blocker(request: FitRequest, walk, closest):
    """The largest resolution whose leanest plan fits, when a smaller one would help."""
    from vramplan.fit.walk import Blocker

    spec = request.spec
    multiple = spec.model.resolution_multiple
    floor = max(multiple * 2, (min(spec.resolution) // 2) // multiple * multiple)
    if request.min_resolution is not None and request.min_resolution <= floor:
        return None
    from vramplan.fit.walk import optimizer_state_sizes

    wider = dataclasses.replace(request, min_resolution=floor)
    axes = search_axes(wider, optimizer_state_sizes(wider))
    position = [c for c in wider.prefer].index(Criterion.RESOLUTION)
    sizes = axes[position].values
    if len(sizes) < 2:
        return None
    from vramplan.fit.walk import _Search

    sub = _Search(wider, axes, walk.margin, walk.estimator)
    lean = sub.cheapest_completion(())
    if lean is None:
        return None
    lean = list(lean)

    def plan_at(i):
        choice = list(lean)
        choice[position] = i
        return sub.plan(tuple(choice))

    smallest = plan_at(len(sizes) - 1)
    if smallest is None or not smallest.fits:
        walk.estimates += sub.estimates
        return None
    low, high = 1, len(sizes) - 1          # sizes[high] fits; find the first (largest) that fits
    best = smallest
    while low < high:
        middle = (low + high) // 2
        plan = plan_at(middle)
        if plan is not None and plan.fits:
            high, best = middle, plan
        else:
            low = middle + 1
    walk.estimates += sub.estimates
    label = "x".join(str(v) for v in spec.resolution)
    return Blocker(f"--resolution {label}" if "resolution" in request.given else f"the resolution {label}",
                   f"--resolution {'x'.join(str(v) for v in best.spec.resolution)} with "
                   + _describe(best.spec, closest.spec.replace(resolution=best.spec.resolution)),
                   best.required_bytes, True)


__all__ = ["explain", "relaxations"]

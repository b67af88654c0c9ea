"""What `vramplan fit` may change, in which order of preference, and what the user fixed.

The search space is a list of `Axis`, one per knob, each with its values best first. The order of
the axes is the objective: plans are compared axis by axis (lexicographically), so an earlier axis
matters more than every later one together. The default objective, "keep quality, then speed":

  resolution  the user's (or the model's native) size first; lower only with --min-resolution
  precision   mixed precision (bf16 on cards that have it, else fp16); bf16-pure for full
              fine-tunes as a last resort (every weight, gradient and state in 16 bits)
  quant       no quantization > int8 > nf4 of the frozen base (lora only)
  rank        higher first, from --rank (default 16) down to --min-rank (default 4)
  optimizer   adamw > adamw8bit > adafactor (8-bit states, then factored second moments)
  batch       larger per-step batch first, with gradient accumulation keeping the effective batch
  strategy    several GPUs only (--gpus N>1): how they share the work, least communication and
              least host traffic first, in `vramplan.distributed.plan.OPTIONS` order:
                ddp > zero1 > zero2 > fsdp shard-grad-op > fsdp full-shard > zero3
                > zero2 + offload optimizer > zero3 + offload optimizer
                > fsdp full-shard + offload params > zero3 + offload params
              (DDP all-reduces the gradients; ZeRO-1/2 and SHARD_GRAD_OP move the same bytes, as a
              reduce-scatter and an all-gather, ZeRO paper section 7; ZeRO-3 and FULL_SHARD gather
              the parameters again in backward, 1.5x; offloading adds PCIe traffic and a CPU
              optimizer step, parameters more than optimizer states). --strategy / --offload /
              --fsdp-sharding fix what they name; the rest is searched.
  checkpointing  off > on (recomputing activations costs about a third more time per step)
  cache-latents, cache-text  off > on: they cost nothing in quality and save time per step, but
              fix the augmentation and take a preprocessing pass; being last, they are used
              whenever they let any earlier axis keep a better value
  attention   sdpa; xformers keeps what sdpa keeps and eager keeps more, so neither can fit
              where sdpa does not, and neither is searched unless --attention is given

Where the strategy sits: after the quality axes (quantization, rank, optimizer, batch are kept as
they are: sharding changes no result, only speed) and before checkpointing, so that fit turns on
checkpointing and caching before it spreads state over the GPUs -- checkpointing costs a bounded
third more compute on any machine, while what sharding and offloading cost depends on the
interconnect (PCIe-only consumer cards pay the most), which is also the order of the DeepSpeed
guide in transformers ("How to choose which ZeRO stage and offloads to use": gradient
checkpointing first, then ZeRO stages, then offload). `--prefer strategy,...` or `--prefer speed`
(batch, strategy, checkpointing first) changes it.

The strategy's memory is not monotone along its values (ZeRO-3 can need more per GPU than FSDP
FULL_SHARD, ZeRO-2 more than ZeRO-1: buckets), and some values cannot go with some values of other
axes (DeepSpeed refuses pure 16-bit models, offloading runs AdamW only, a quantized base cannot be
sharded): `strategy_axis` says which values are known never to need more than others (only an
offload of the same strategy), and the search (walk.py) checks every value that may be the
leanest, skipping the combinations the engines refuse (`combination_error`).

`--prefer` moves named axes to the front (`--prefer batch,checkpointing` or `--prefer speed`),
the rest keep the default order. Any flag the user gave fixes its axis to that one value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

from vramplan.errors import UsageError
from vramplan.spec import (Attention, BaseQuant, Method, Offload, Optimizer, Precision, Strategy,
                           TrainingSpec, parse_resolution)


class Criterion(str, Enum):
    RESOLUTION = "resolution"
    PRECISION = "precision"
    QUANT = "quant"
    RANK = "rank"
    OPTIMIZER = "optimizer"
    BATCH = "batch"
    STRATEGY = "strategy"
    CHECKPOINTING = "checkpointing"
    CACHE_LATENTS = "cache-latents"
    CACHE_TEXT = "cache-text"
    ATTENTION = "attention"

    def __str__(self) -> str:
        return self.value


QUALITY = (Criterion.RESOLUTION, Criterion.PRECISION, Criterion.QUANT, Criterion.RANK,
           Criterion.OPTIMIZER, Criterion.BATCH, Criterion.STRATEGY, Criterion.CHECKPOINTING,
           Criterion.CACHE_LATENTS, Criterion.CACHE_TEXT, Criterion.ATTENTION)
_SPEED_FIRST = (Criterion.BATCH, Criterion.STRATEGY, Criterion.CHECKPOINTING)
PRESETS = {
    "quality": QUALITY,
    # speed first: the biggest per-step batch, the least communication, no recomputation, then
    # quality as above
    "speed": _SPEED_FIRST + tuple(c for c in QUALITY if c not in _SPEED_FIRST),
}
# Axes whose values the engines do not accept in every combination (see `combination_error`).
COUPLED = frozenset({Criterion.PRECISION, Criterion.QUANT, Criterion.OPTIMIZER, Criterion.STRATEGY})

# The spec fields each axis sets: a flag the user gave for any of them fixes the axis.
AXIS_FIELDS = {
    Criterion.RESOLUTION: ("resolution",),
    Criterion.PRECISION: ("precision",),
    Criterion.QUANT: ("base_quant",),
    Criterion.RANK: ("rank",),
    Criterion.OPTIMIZER: ("optimizer",),
    Criterion.BATCH: ("batch_size", "gradient_accumulation_steps"),
    Criterion.STRATEGY: ("strategy", "offload", "fsdp_sharding"),
    Criterion.CHECKPOINTING: ("gradient_checkpointing",),
    Criterion.CACHE_LATENTS: ("cache_latents",),
    Criterion.CACHE_TEXT: ("cache_text_embeddings",),
    Criterion.ATTENTION: ("attention",),
}

DEFAULT_MIN_RANK = 4     # the diffusers LoRA scripts' default --rank
RESOLUTION_STEP = 64     # pixels between the resolutions tried under --min-resolution
SEARCHED_OPTIMIZERS = (Optimizer.ADAMW, Optimizer.ADAMW8BIT, Optimizer.ADAFACTOR)


def parse_prefer(text: str | None) -> tuple[Criterion, ...]:
    """"quality" (default), "speed", or a comma list of criteria to put first."""
    if text is None or not str(text).strip():
        return QUALITY
    text = str(text).strip().lower()
    if text in PRESETS:
        return PRESETS[text]
    first = []
    for word in text.replace(" ", "").split(","):
        try:
            criterion = Criterion(word.replace("_", "-"))
        except ValueError:
            raise UsageError(f"--prefer: unknown criterion {word!r} (choose from "
                             f"{', '.join(PRESETS)} or a list of {', '.join(c.value for c in QUALITY)})") from None
        if criterion not in first:
            first.append(criterion)
    return tuple(first) + tuple(c for c in QUALITY if c not in first)


@dataclass(frozen=True)
class Axis:
    """One knob: its values best first, each the spec fields it sets, and a label for tables."""

    criterion: Criterion
    values: tuple[dict, ...]
    labels: tuple[str, ...]
    fixed: bool = False          # the user gave it: one value, never varied
    # Memory order: `cheaper(a, b)` is True when value a never needs more memory than value b.
    # Most axes are ordered best = hungriest, so a later value is cheaper; optimizers are not
    # (adamw8bit and adafactor do not compare), which `cheaper` says.
    cheaper: Callable[[int, int], bool] | None = None
    cheapest: int = -1           # the value with the least memory
    # The values that together bound the axis from below: every value needs at least as much as
    # one of them. One value (`cheapest`) for every axis but the strategy, whose values do not
    # all compare; listed the likeliest-leanest first.
    floor: tuple[int, ...] = ()

    def __post_init__(self):
        if self.cheapest < 0:
            object.__setattr__(self, "cheapest", len(self.values) - 1)
        if not self.floor:
            object.__setattr__(self, "floor", (self.cheapest,))

    def never_more(self, a: int, b: int) -> bool:
        return self.cheaper(a, b) if self.cheaper is not None else a >= b


@dataclass(frozen=True)
class FitRequest:
    """What `fit` searches for: the user's spec (what they fixed is in `spec.given`), the card, the
    effective batch to keep, the lower bounds they allow, the objective and how many plans."""

    spec: TrainingSpec
    effective_batch: int
    min_rank: int | None = None
    min_resolution: int | None = None
    prefer: tuple[Criterion, ...] = QUALITY
    top: int = 5
    margin: float | None = None     # None: the estimator's error band (see `vramplan.fit.margin`)
    given: frozenset = field(default_factory=frozenset)
    host_ram: int | None = None     # bytes of host RAM per node a plan may use (None: unchecked)

    @property
    def gpu(self):
        return self.spec.gpu

    @property
    def distributed(self) -> bool:
        """Several GPUs under a strategy: the estimate is one GPU's, host RAM is counted."""
        return self.spec.is_distributed


def fit_request(spec: TrainingSpec, *, effective_batch: int | None = None, min_rank: int | None = None,
                min_resolution: int | None = None, prefer: str | tuple | None = None, top: int = 5,
                margin: float | None = None, host_ram: int | None = None) -> FitRequest:
    """Check what only fit has (a card, bounds that agree with the spec) and build the request."""
    if spec.gpu is None:
        raise UsageError("fit needs the card: give --gpu (a size like 8GB, or a name from 'vramplan gpus'), "
                         "or --gpus COUNTxCARD for several")
    if host_ram is not None and host_ram <= 0:
        raise UsageError(f"--host-ram: {host_ram} bytes is too small")
    given = frozenset(spec.given)
    if min_rank is not None:
        if spec.rank is None:
            raise UsageError(f"--min-rank applies to lora, loha and lokr, not --method {spec.method.value}")
        if min_rank < 1:
            raise UsageError(f"--min-rank: {min_rank} is too small (at least 1)")
        if "rank" in given and min_rank > spec.rank:
            raise UsageError(f"--min-rank {min_rank} is above --rank {spec.rank}")
    if min_resolution is not None:
        multiple = spec.model.resolution_multiple
        if min_resolution < multiple * 2 or min_resolution % multiple:
            raise UsageError(f"--min-resolution: {min_resolution} must be a multiple of {multiple} "
                             f"and at least {multiple * 2} for {spec.model.name}")
        if min_resolution > min(spec.resolution):
            raise UsageError(f"--min-resolution {min_resolution} is above the resolution "
                             f"{spec.resolution[0]}x{spec.resolution[1]}")
    batch = spec.batch_size * spec.gradient_accumulation_steps
    if effective_batch is not None:
        if effective_batch < 1:
            raise UsageError(f"--effective-batch: {effective_batch} is too small (at least 1)")
        if "batch_size" in given and effective_batch % spec.batch_size:
            raise UsageError(f"--effective-batch {effective_batch} is not a multiple of --batch-size "
                             f"{spec.batch_size}")
        if "gradient_accumulation_steps" in given and (
                "batch_size" in given and batch != effective_batch
                or effective_batch % spec.gradient_accumulation_steps):
            raise UsageError(f"--effective-batch {effective_batch} disagrees with --gradient-accumulation-steps "
                             f"{spec.gradient_accumulation_steps}")
        batch = effective_batch
    if top < 1:
        raise UsageError(f"--top: {top} is too small (at least 1)")
    if margin is not None and not 0 <= margin < 1:
        raise UsageError(f"--margin: {margin:g} must be a fraction between 0 and 1 (e.g. 0.05)")
    order = parse_prefer(prefer) if not isinstance(prefer, tuple) else prefer
    return FitRequest(spec=spec, effective_batch=batch, min_rank=min_rank, min_resolution=min_resolution,
                      prefer=order, top=top, margin=margin, given=given, host_ram=host_ram)


# -- the axes ------------------------------------------------------------------------------------

def _fixed(criterion: Criterion, spec: TrainingSpec, label: str) -> Axis:
    values = {name: getattr(spec, name) for name in AXIS_FIELDS[criterion]}
    return Axis(criterion, (values,), (label,), fixed=True)


def _is_given(request: FitRequest, criterion: Criterion) -> bool:
    return any(name in request.given for name in AXIS_FIELDS[criterion])


def resolution_axis(request: FitRequest) -> Axis:
    spec = request.spec
    width, height = spec.resolution
    if request.min_resolution is None:
        return _fixed(Criterion.RESOLUTION, spec, f"{width}x{height}")
    values, labels = [], []
    step = max(RESOLUTION_STEP, spec.model.resolution_multiple)
    multiple = spec.model.resolution_multiple
    w = width
    while True:
        h = max(multiple, round(height * w / width / multiple) * multiple)
        if min(w, h) < request.min_resolution:
            break
        size = parse_resolution((w, h), spec.model)
        values.append({"resolution": size})
        labels.append(f"{w}x{h}")
        w -= step
    return Axis(Criterion.RESOLUTION, tuple(values), tuple(labels))


def precision_axis(request: FitRequest) -> Axis:
    spec = request.spec
    if _is_given(request, Criterion.PRECISION):
        return _fixed(Criterion.PRECISION, spec, spec.precision.value)
    gpu = request.gpu
    mixed = Precision.BF16 if gpu.bf16 else Precision.FP16
    choices = [mixed]
    # Pure 16-bit halves the fp32 trainable weights, gradients and states of a full fine-tune;
    # for adapters it saves next to nothing. fp16-pure without loss scaling is too fragile to
    # propose; bf16-pure is what kohya's --full_bf16 runs.
    if spec.method.trains_denoiser and gpu.bf16:
        choices.append(Precision.BF16_PURE)
    return Axis(Criterion.PRECISION, tuple({"precision": p} for p in choices),
                tuple(p.value for p in choices))


def quant_axis(request: FitRequest) -> Axis:
    spec = request.spec
    if _is_given(request, Criterion.QUANT) or spec.method is not Method.LORA \
            or ("precision" in request.given and spec.precision is Precision.FP32):
        return _fixed(Criterion.QUANT, spec, spec.base_quant.value)
    choices = (BaseQuant.NONE, BaseQuant.INT8, BaseQuant.NF4)
    return Axis(Criterion.QUANT, tuple({"base_quant": q} for q in choices), tuple(q.value for q in choices))


def rank_axis(request: FitRequest) -> Axis:
    spec = request.spec
    if spec.rank is None:
        return _fixed(Criterion.RANK, spec, "-")
    high = spec.rank
    if "rank" in request.given:
        low = request.min_rank if request.min_rank is not None else high
    else:
        low = request.min_rank if request.min_rank is not None else min(DEFAULT_MIN_RANK, high)
        high = max(high, low)
    if low == high:
        return Axis(Criterion.RANK, ({"rank": high},), (f"r{high}",), fixed="rank" in request.given
                    and request.min_rank is None)
    ranks = [high]
    power = 1 << (high.bit_length() - 1)
    if power == high:
        power //= 2
    while power > low:
        ranks.append(power)
        power //= 2
    ranks.append(low)
    return Axis(Criterion.RANK, tuple({"rank": r} for r in ranks), tuple(f"r{r}" for r in ranks))


def optimizer_axis(request: FitRequest, state_bytes: list[int] | None = None) -> Axis:
    """adamw keeps the most; whether adamw8bit or adafactor keeps less depends on the tensors'
    shapes (8-bit blocks vs factored rows and columns), so the memory order is their state bytes
    for this spec (`state_bytes`, one per SEARCHED_OPTIMIZERS), the preference order as listed."""
    spec = request.spec
    if _is_given(request, Criterion.OPTIMIZER):
        return _fixed(Criterion.OPTIMIZER, spec, spec.optimizer.value)
    values = tuple({"optimizer": o, "momentum": None} for o in SEARCHED_OPTIMIZERS)
    labels = tuple(o.value for o in SEARCHED_OPTIMIZERS)
    if state_bytes is None:
        return Axis(Criterion.OPTIMIZER, values, labels, cheaper=lambda a, b: a == b or b == 0)
    sizes = tuple(state_bytes)
    cheapest = min(range(len(sizes)), key=lambda i: (sizes[i], -i))
    return Axis(Criterion.OPTIMIZER, values, labels, cheaper=lambda a, b: sizes[a] <= sizes[b],
                cheapest=cheapest)


def batch_axis(request: FitRequest) -> Axis:
    spec = request.spec
    total = request.effective_batch
    if "batch_size" in request.given:
        sizes = [spec.batch_size]
    else:
        sizes = [b for b in range(total, 0, -1) if total % b == 0]
    values = tuple({"batch_size": b, "gradient_accumulation_steps": total // b} for b in sizes)
    labels = tuple(f"{b}" + (f"x{total // b}" if total // b > 1 else "") for b in sizes)
    return Axis(Criterion.BATCH, values, labels, fixed="batch_size" in request.given)


def _switch(request: FitRequest, criterion: Criterion, name: str, label: str, allowed: bool = True) -> Axis:
    spec = request.spec
    if _is_given(request, criterion) or not allowed:
        value = getattr(spec, name)
        return _fixed(criterion, spec, label if value else "-")
    return Axis(criterion, ({name: False}, {name: True}), ("-", label))


OFFLOAD_RANK = {Offload.NONE: 0, Offload.OPTIMIZER: 1, Offload.PARAMS: 2}


def strategy_label(strategy: Strategy | None, offload: Offload = Offload.NONE, sharding=None) -> str:
    """"zero2", "fsdp full-shard", "zero3 +offload params": how the plan table names a strategy."""
    if strategy is None:
        return "-"
    text = strategy.value + (f" {sharding.value}" if sharding is not None else "")
    return text + (f" +offload {offload.value}" if offload is not Offload.NONE else "")


def _permissive(request: FitRequest) -> TrainingSpec:
    """The spec with the coupled axes the user left free at their best values, which every
    strategy accepts (mixed precision, no quantization, AdamW): the options are filtered by what
    the user fixed, not by a default the search will change anyway."""
    spec, given = request.spec, request.given
    changes = {}
    if "precision" not in given and spec.gpu is not None:
        changes["precision"] = Precision.BF16 if spec.gpu.bf16 else Precision.FP16
    if "base_quant" not in given:
        changes["base_quant"] = BaseQuant.NONE
    if "optimizer" not in given:
        changes.update(optimizer=Optimizer.ADAMW, momentum=None)
    return spec.replace(given=given, **changes)


def strategy_axis(request: FitRequest) -> Axis:
    """Several GPUs: the strategy / offload / FSDP sharding options the method can run, in
    `distributed_options` order (least communication first). Memory order: an offload never
    needs more GPU memory than the same strategy without it; nothing else is claimed, so the
    floor is the most-offloaded option of each strategy."""
    spec = request.spec
    label = strategy_label(spec.strategy, spec.offload, spec.fsdp_sharding)
    if not spec.is_distributed:
        return _fixed(Criterion.STRATEGY, spec, label)
    from vramplan.distributed.plan import distributed_options

    options = distributed_options(_permissive(request))
    if not options:
        # what the user fixed is a combination fit does not list (zero1 with an offload): keep it
        return _fixed(Criterion.STRATEGY, spec, label)
    values = tuple({"strategy": o.strategy, "offload": o.offload, "fsdp_sharding": o.fsdp_sharding}
                   for o in options)
    labels = tuple(strategy_label(o.strategy, o.offload, o.fsdp_sharding) for o in options)
    if len(options) == 1:
        return Axis(Criterion.STRATEGY, values, labels,
                    fixed=all(f in request.given for f in ("strategy", "offload")))

    def same_strategy(a: int, b: int) -> bool:
        return (options[a].strategy, options[a].fsdp_sharding) == (options[b].strategy, options[b].fsdp_sharding)

    def cheaper(a: int, b: int) -> bool:
        return a == b or (same_strategy(a, b)
                          and OFFLOAD_RANK[options[a].offload] >= OFFLOAD_RANK[options[b].offload])

    floor = [i for i in range(len(options))
             if not any(j != i and cheaper(j, i) and not cheaper(i, j) for j in range(len(options)))]
    floor.sort(key=lambda i: (-OFFLOAD_RANK[options[i].offload], -i))
    return Axis(Criterion.STRATEGY, values, labels, cheaper=cheaper, cheapest=floor[0], floor=tuple(floor))


def combination_error(spec: TrainingSpec) -> str | None:
    """Why the engines refuse this combination of values (the spec's own validation: DeepSpeed
    with a pure 16-bit model, an offload with an optimizer other than AdamW, a sharded quantized
    base ...), or None. Only several-GPU specs have such combinations."""
    if not spec.is_distributed:
        return None
    from vramplan.spec import spec_from_json

    try:
        spec_from_json({k: v for k, v in spec.to_json().items() if v is not None})
    except UsageError as error:
        return str(error)
    return None


def attention_axis(request: FitRequest) -> Axis:
    spec = request.spec
    if _is_given(request, Criterion.ATTENTION):
        return _fixed(Criterion.ATTENTION, spec, spec.attention.value)
    return Axis(Criterion.ATTENTION, ({"attention": Attention.SDPA},), ("sdpa",))


def search_axes(request: FitRequest, optimizer_state_bytes: list[int] | None = None) -> list[Axis]:
    """The axes in the request's order of preference."""
    spec = request.spec
    frozen_text = not spec.trains_text_encoder
    build = {
        Criterion.RESOLUTION: lambda: resolution_axis(request),
        Criterion.PRECISION: lambda: precision_axis(request),
        Criterion.QUANT: lambda: quant_axis(request),
        Criterion.RANK: lambda: rank_axis(request),
        Criterion.OPTIMIZER: lambda: optimizer_axis(request, optimizer_state_bytes),
        Criterion.BATCH: lambda: batch_axis(request),
        Criterion.STRATEGY: lambda: strategy_axis(request),
        Criterion.CHECKPOINTING: lambda: _switch(request, Criterion.CHECKPOINTING, "gradient_checkpointing", "on"),
        Criterion.CACHE_LATENTS: lambda: _switch(request, Criterion.CACHE_LATENTS, "cache_latents", "cached"),
        Criterion.CACHE_TEXT: lambda: _switch(request, Criterion.CACHE_TEXT, "cache_text_embeddings", "cached",
                                              allowed=frozen_text),
        Criterion.ATTENTION: lambda: attention_axis(request),
    }
    return [build[c]() for c in request.prefer]


def apply_values(request: FitRequest, axes: list[Axis], choice: tuple[int, ...]) -> TrainingSpec:
    """The spec with each axis set to its chosen value. Alpha follows the rank unless given, as
    build_spec's default (alpha = rank) does; sgd's momentum is kept only for sgd."""
    changes = {}
    for axis, index in zip(axes, choice):
        changes.update(axis.values[index])
    spec = request.spec
    if "rank" in changes and "alpha" not in request.given and spec.rank is not None:
        changes["alpha"] = float(changes["rank"])
    if "optimizer" in changes and changes["optimizer"] is not Optimizer.SGD:
        changes["momentum"] = None
    elif "momentum" in changes and changes["momentum"] is None:
        changes.pop("momentum")
    return spec.replace(**changes)

"""TrainingSpec: every knob of a fine-tune, validated once, shared by all four tiers.

`build_spec(options)` takes only what the user gave (flag name -> raw value), fills the defaults,
checks every value and every combination, and raises `UsageError` with one line naming the
problem and the valid choices. `estimate`, `simulate`, `profile`, `fit` and `train` all take the
resulting frozen `TrainingSpec`; `TrainingSpec.to_json()` / `spec_from_json()` carry it in plans.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum

from vramplan.errors import UsageError
from vramplan.gpus import Gpu, resolve_gpu
from vramplan.models.catalog import ModelInfo
from vramplan.models.resolve import resolve_model


class Choice(str, Enum):
    """A string enum whose values are what users type."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, text, flag: str):
        text = str(text).strip().lower().replace("_", "-")
        for member in cls:
            if member.value == text:
                return member
        raise UsageError(f"{flag}: invalid choice {text!r} (choose from {', '.join(m.value for m in cls)})")


class Method(Choice):
    FULL = "full"
    DREAMBOOTH = "dreambooth"
    LORA = "lora"
    LOHA = "loha"
    LOKR = "lokr"
    TEXTUAL_INVERSION = "textual-inversion"
    HYPERNETWORK = "hypernetwork"

    @property
    def trains_denoiser(self) -> bool:
        return self in (Method.FULL, Method.DREAMBOOTH)

    @property
    def is_adapter(self) -> bool:
        """Methods that freeze the base model and add small trainable weights."""
        return not self.trains_denoiser


class Precision(Choice):
    FP16 = "fp16"            # mixed: autocast to fp16, trainable fp32, frozen fp16, GradScaler
    BF16 = "bf16"            # mixed: autocast to bf16, trainable fp32, frozen bf16
    FP32 = "fp32"
    FP16_PURE = "fp16-pure"  # every weight, gradient and state in fp16, no autocast
    BF16_PURE = "bf16-pure"

    @property
    def autocast(self) -> bool:
        return self in (Precision.FP16, Precision.BF16)

    @property
    def low_dtype(self) -> str:
        """The 16-bit dtype in play, or float32."""
        return {"fp16": "float16", "fp16-pure": "float16", "bf16": "bfloat16",
                "bf16-pure": "bfloat16"}.get(self.value, "float32")

    @property
    def frozen_bytes(self) -> int:
        return 4 if self is Precision.FP32 else 2

    @property
    def trainable_bytes(self) -> int:
        return 2 if self in (Precision.FP16_PURE, Precision.BF16_PURE) else 4

    @property
    def needs_bf16(self) -> bool:
        return self in (Precision.BF16, Precision.BF16_PURE)


class BaseQuant(Choice):
    NONE = "none"
    INT8 = "int8"
    NF4 = "nf4"


class Optimizer(Choice):
    ADAMW = "adamw"
    ADAMW8BIT = "adamw8bit"
    ADAFACTOR = "adafactor"
    LION = "lion"
    PRODIGY = "prodigy"
    SGD = "sgd"


class Attention(Choice):
    SDPA = "sdpa"
    XFORMERS = "xformers"
    EAGER = "eager"


class Strategy(Choice):
    """How several GPUs share the work (vramplan/distributed/ counts each; accelerate launches it)."""

    DDP = "ddp"        # torch DistributedDataParallel: everything replicated, plus gradient buckets
    FSDP = "fsdp"      # torch FSDP (FSDP1, accelerate's default fsdp_version)
    ZERO1 = "zero1"    # DeepSpeed ZeRO stage 1: optimizer states partitioned
    ZERO2 = "zero2"    # + gradients partitioned
    ZERO3 = "zero3"    # + parameters partitioned

    @property
    def is_deepspeed(self) -> bool:
        return self in (Strategy.ZERO1, Strategy.ZERO2, Strategy.ZERO3)

    @property
    def shards_parameters(self) -> bool:
        return self in (Strategy.FSDP, Strategy.ZERO3)


class FsdpSharding(Choice):
    """torch.distributed.fsdp.ShardingStrategy, as accelerate's fsdp_sharding_strategy names it."""

    FULL_SHARD = "full-shard"          # params, grads, states sharded; params freed after forward
    SHARD_GRAD_OP = "shard-grad-op"    # params kept unsharded from forward through backward
    HYBRID_SHARD = "hybrid-shard"      # FULL_SHARD inside a node, replicated across nodes

    @property
    def torch_name(self) -> str:
        return self.value.upper().replace("-", "_")


class Offload(Choice):
    NONE = "none"
    OPTIMIZER = "optimizer"   # DeepSpeed offload_optimizer: fp32 master, states and their step on the CPU
    PARAMS = "params"         # FSDP CPUOffload(offload_params=True) / ZeRO-3 offload_param (+ optimizer)


class LoraTargets(Choice):
    ATTN = "attn"                      # to_q, to_k, to_v, to_out.0: the diffusers scripts' default
    ATTN_MLP = "attn-mlp"              # + the feed-forward Linears
    ALL_LINEAR = "all-linear"          # every Linear of the denoiser
    ALL_LINEAR_CONV = "all-linear+conv"  # + every Conv2d (LoCon)


# Which method-specific knobs each method reads; any other one given is a mistake worth a message.
METHOD_KNOBS: dict[Method, frozenset[str]] = {
    Method.FULL: frozenset({"ema"}),
    Method.DREAMBOOTH: frozenset({"ema"}),
    Method.LORA: frozenset({"rank", "alpha", "lora_targets", "base_quant"}),
    Method.LOHA: frozenset({"rank", "alpha", "lora_targets"}),
    Method.LOKR: frozenset({"rank", "alpha", "lora_targets", "lokr_factor"}),
    Method.TEXTUAL_INVERSION: frozenset({"num_vectors"}),
    Method.HYPERNETWORK: frozenset({"hypernetwork_layers"}),
}
FLAG = {name: "--" + name.replace("_", "-") for name in
        ("rank", "alpha", "lora_targets", "lokr_factor", "num_vectors", "hypernetwork_layers",
         "base_quant", "ema", "momentum")}


@dataclass(frozen=True)
class TrainingSpec:
    model: ModelInfo
    method: Method = Method.LORA
    rank: int | None = 16
    alpha: float | None = 16.0
    lora_targets: LoraTargets | None = LoraTargets.ATTN
    lokr_factor: int | None = None
    num_vectors: int | None = None
    hypernetwork_layers: tuple[float, ...] | None = None
    prior_preservation: bool = False
    precision: Precision = Precision.FP16
    base_quant: BaseQuant = BaseQuant.NONE
    optimizer: Optimizer = Optimizer.ADAMW
    momentum: float | None = None
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    resolution: tuple[int, int] = (512, 512)  # (width, height) in pixels
    gradient_checkpointing: bool = False
    attention: Attention = Attention.SDPA
    train_text_encoder: bool = False
    cache_latents: bool = False
    cache_text_embeddings: bool = False
    ema: bool = False
    gpu: Gpu | None = None
    num_gpus: int = 1
    strategy: Strategy | None = None          # None: one process, no wrapper
    fsdp_sharding: FsdpSharding | None = None
    offload: Offload = Offload.NONE
    given: frozenset[str] = field(default=frozenset(), compare=False)  # what the user fixed

    @property
    def images_per_step(self) -> int:
        """Prior preservation concatenates as many class images as instance images."""
        return self.batch_size * (2 if self.prior_preservation else 1)

    @property
    def is_distributed(self) -> bool:
        """Planned per GPU under a strategy (vramplan.distributed), not as one plain process."""
        return self.strategy is not None

    @property
    def trains_text_encoder(self) -> bool:
        return self.train_text_encoder or self.method is Method.TEXTUAL_INVERSION

    def replace(self, **changes) -> "TrainingSpec":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "given":
                continue
            if f.name == "model":
                value = value.key
            elif f.name == "gpu":
                value = None if value is None else value.key
            elif isinstance(value, Enum):
                value = value.value
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


_BOOLS = ("prior_preservation", "gradient_checkpointing", "train_text_encoder", "cache_latents",
          "cache_text_embeddings", "ema")


def parse_int(value, flag: str, minimum: int = 1) -> int:
    """A whole number >= minimum, or a one-line UsageError naming the flag."""
    try:
        number = int(str(value).strip())
    except ValueError:
        raise UsageError(f"{flag}: {value!r} is not a whole number") from None
    if number < minimum:
        raise UsageError(f"{flag}: {number} is too small (at least {minimum})")
    return number


_int = parse_int


def _float(value, flag: str, minimum: float = 0.0, strict: bool = True) -> float:
    try:
        number = float(str(value).strip())
    except ValueError:
        raise UsageError(f"{flag}: {value!r} is not a number") from None
    if number != number or (number <= minimum if strict else number < minimum):
        raise UsageError(f"{flag}: {number:g} must be {'>' if strict else '>='} {minimum:g}")
    return number


def _bool(value, flag: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise UsageError(f"{flag}: {value!r} is not true or false")


def parse_resolution(value, model: ModelInfo) -> tuple[int, int]:
    """"512" -> (512, 512); "832x1216" -> (832, 1216) as width x height."""
    if isinstance(value, (tuple, list)):
        parts = [str(v) for v in value]
    else:
        parts = str(value).lower().replace("*", "x").split("x")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise UsageError(f"--resolution: {value!r} is not N or WxH (e.g. 1024 or 832x1216)")
    width, height = (_int(p, "--resolution", minimum=1) for p in parts)
    multiple = model.resolution_multiple
    for side in (width, height):
        if side % multiple:
            lower, upper = side // multiple * multiple, (side // multiple + 1) * multiple
            raise UsageError(
                f"--resolution: {side} is not a multiple of {multiple}, which {model.name} needs "
                f"(try {lower or multiple} or {upper})")
    if min(width, height) < multiple * 2:
        raise UsageError(f"--resolution: {width}x{height} is too small for {model.name} "
                         f"(at least {multiple * 2} per side)")
    return width, height


def parse_layers(value) -> tuple[float, ...]:
    """NovelAI's hypernetwork layer structure, "1,2,1": widths as multiples of the context width."""
    parts = value if isinstance(value, (tuple, list)) else str(value).replace(" ", "").split(",")
    try:
        layers = tuple(float(p) for p in parts)
    except ValueError:
        raise UsageError(f"--hypernetwork-layers: {value!r} is not a list of numbers like 1,2,1") from None
    if len(layers) < 2 or layers[0] != 1 or layers[-1] != 1 or any(x <= 0 for x in layers):
        raise UsageError(f"--hypernetwork-layers: {value!r} must start and end with 1 and have "
                         f"positive widths, e.g. 1,2,1")
    return layers


def build_spec(options: dict) -> TrainingSpec:
    """Resolve and validate what the user gave (keys: TrainingSpec field names, unset = absent)."""
    given = {k: v for k, v in options.items() if v is not None}
    unknown = set(given) - {f.name for f in dataclasses.fields(TrainingSpec)} - {"gpu", "gpus"}
    if unknown:
        raise UsageError(f"unknown setting(s): {', '.join(sorted(unknown))}")

    model = resolve_model(given.get("model", "sd15"))
    method = Method.parse(given.get("method", "lora"), "--method")
    knobs = METHOD_KNOBS[method]
    for name in ("rank", "alpha", "lora_targets", "lokr_factor", "num_vectors", "hypernetwork_layers",
                 "ema"):
        if name in given and name not in knobs and not (name == "ema" and not _bool(given[name], "--ema")):
            users = sorted(m.value for m, k in METHOD_KNOBS.items() if name in k)
            raise UsageError(f"{FLAG[name]} does not apply to --method {method.value} "
                             f"(it is for {', '.join(users)})")

    values: dict = {"model": model, "method": method}
    if method in (Method.LORA, Method.LOHA, Method.LOKR):
        values["rank"] = _int(given.get("rank", 16), "--rank")
        values["alpha"] = _float(given.get("alpha", values["rank"]), "--alpha")
        values["lora_targets"] = LoraTargets.parse(given.get("lora_targets", "attn"), "--lora-targets")
    else:
        values["rank"] = values["alpha"] = values["lora_targets"] = None
    if method is Method.LOKR:
        # peft's LoKrConfig.decompose_factor: -1 splits each dimension as evenly as it can.
        values["lokr_factor"] = _int(given.get("lokr_factor", -1), "--lokr-factor", minimum=-1)
        if values["lokr_factor"] in (0, 1):
            raise UsageError("--lokr-factor must be -1 (balanced) or at least 2")
    if method is Method.TEXTUAL_INVERSION:
        values["num_vectors"] = _int(given.get("num_vectors", 1), "--num-vectors")
    if method is Method.HYPERNETWORK:
        values["hypernetwork_layers"] = parse_layers(given.get("hypernetwork_layers", "1,2,1"))

    for name in _BOOLS:
        values[name] = _bool(given.get(name, False), FLAG.get(name, "--" + name.replace("_", "-")))
    if method is Method.DREAMBOOTH:
        if "prior_preservation" in given and not values["prior_preservation"]:
            raise UsageError("--method dreambooth is a full fine-tune with prior preservation; "
                             "use --method full to train without class images")
        values["prior_preservation"] = True

    values["precision"] = Precision.parse(given.get("precision", "fp16"), "--precision")
    values["base_quant"] = BaseQuant.parse(given.get("base_quant", "none"), "--base-quant")
    if values["base_quant"] is not BaseQuant.NONE and method is not Method.LORA:
        raise UsageError(f"--base-quant {values['base_quant'].value} needs --method lora: peft "
                         f"trains LoRA on bitsandbytes layers, not {method.value}")
    if values["base_quant"] is not BaseQuant.NONE and values["precision"] is Precision.FP32:
        raise UsageError("--base-quant computes in 16 bits: use --precision fp16 or bf16 with it")

    values["optimizer"] = Optimizer.parse(given.get("optimizer", "adamw"), "--optimizer")
    if "momentum" in given:
        if values["optimizer"] is not Optimizer.SGD:
            raise UsageError("--momentum applies to --optimizer sgd only")
        values["momentum"] = _float(given["momentum"], "--momentum", strict=False)
        if values["momentum"] >= 1:
            raise UsageError(f"--momentum: {values['momentum']:g} must be below 1")
    elif values["optimizer"] is Optimizer.SGD:
        values["momentum"] = 0.0

    values["batch_size"] = _int(given.get("batch_size", 1), "--batch-size")
    values["gradient_accumulation_steps"] = _int(given.get("gradient_accumulation_steps", 1),
                                                 "--gradient-accumulation-steps")
    values["resolution"] = parse_resolution(given.get("resolution", model.native_resolution), model)
    values["attention"] = Attention.parse(given.get("attention", "sdpa"), "--attention")

    if values["train_text_encoder"] and method is Method.TEXTUAL_INVERSION:
        raise UsageError("--train-text-encoder does not apply to textual-inversion, "
                         "which trains only the new token embeddings")
    if values["cache_text_embeddings"] and (values["train_text_encoder"]
                                            or method is Method.TEXTUAL_INVERSION):
        raise UsageError("--cache-text-embeddings needs a frozen text encoder: it cannot be "
                         f"combined with {'--train-text-encoder' if values['train_text_encoder'] else 'textual-inversion'}")
    if values["ema"] and not method.trains_denoiser:
        raise UsageError("--ema applies to full and dreambooth (the diffusers scripts' --use_ema)")

    gpu = given.get("gpu")
    values["gpu"] = gpu if isinstance(gpu, Gpu) or gpu is None else resolve_gpu(gpu)
    if values["gpu"] is not None and values["precision"].needs_bf16 and not values["gpu"].bf16:
        raise UsageError(f"{values['gpu'].name} has no bfloat16 support "
                         f"(compute capability {values['gpu'].compute_capability}): use fp16 or fp32")
    values["num_gpus"] = _int(given.get("num_gpus", 1), "--num-gpus")
    if "gpus" in given:
        from vramplan.distributed.cards import parse_gpus

        if "gpu" in given or "num_gpus" in given:
            raise UsageError("--gpus names both the card and how many (8xh100, 2x24GB): "
                             "drop --gpu / --num-gpus")
        values["gpu"], values["num_gpus"] = parse_gpus(given["gpus"])
        if values["precision"].needs_bf16 and not values["gpu"].bf16:
            raise UsageError(f"{values['gpu'].name} has no bfloat16 support "
                             f"(compute capability {values['gpu'].compute_capability}): use fp16 or fp32")
    _check_distributed(values, given)
    values["given"] = frozenset(given)
    return TrainingSpec(**values)


def _check_distributed(values: dict, given: dict) -> None:
    """--strategy, --fsdp-sharding, --offload: defaults, and the combinations no engine runs.

    Sources for each refusal: accelerate 1.x `Accelerator.prepare` ("You can't use same
    `Accelerator()` instance with multiple models when using DeepSpeed"); DeepSpeed's zero config
    (`offload_param` is valid only with stage 3); torch FSDP1's CPUOffload moves parameters and
    gradients together and runs the optimizer on the CPU (no optimizer-only offload).
    """
    method, gpus = values["method"], values["num_gpus"]
    offload = Offload.parse(given.get("offload", "none"), "--offload")
    strategy = Strategy.parse(given["strategy"], "--strategy") if "strategy" in given else None
    if strategy is None and gpus > 1:
        strategy = Strategy.DDP   # what `accelerate launch --multi_gpu` runs unless told otherwise
    if strategy is None and offload is not Offload.NONE:
        raise UsageError(f"--offload {offload.value} needs a sharding strategy: --strategy zero1, "
                         f"zero2, zero3 or fsdp")
    sharding = None
    if "fsdp_sharding" in given:
        if strategy is not Strategy.FSDP:
            raise UsageError(f"--fsdp-sharding applies to --strategy fsdp, not "
                             f"{strategy.value if strategy else 'a single GPU'}")
        sharding = FsdpSharding.parse(given["fsdp_sharding"], "--fsdp-sharding")
    elif strategy is Strategy.FSDP:
        sharding = FsdpSharding.FULL_SHARD
    if strategy is not None:
        where = f"--strategy {strategy.value}"
        if strategy.shards_parameters and method is Method.TEXTUAL_INVERSION:
            raise UsageError(f"{where} shards parameters, which makes no sense for textual-inversion: "
                             f"it trains a few embedding rows and writes into the whole embedding "
                             f"each step; use ddp, zero1 or zero2")
        if strategy.shards_parameters and values["base_quant"] is not BaseQuant.NONE:
            raise UsageError(f"{where} cannot shard a bitsandbytes-quantized base (--base-quant "
                             f"{values['base_quant'].value}); use ddp, zero1 or zero2")
        if strategy.is_deepspeed:
            if values["train_text_encoder"]:
                raise UsageError(f"{where}: accelerate prepares one model per run under DeepSpeed, "
                                 f"so --train-text-encoder (a second trained model) cannot run; "
                                 f"use ddp or fsdp")
            if values["precision"] in (Precision.FP16_PURE, Precision.BF16_PURE):
                raise UsageError(f"{where} keeps fp32 master weights of 16-bit models: use "
                                 f"--precision fp16 or bf16 (or fp32), not "
                                 f"{values['precision'].value}")
        if offload is not Offload.NONE:
            if strategy is Strategy.DDP:
                raise UsageError("--offload needs a sharding strategy (zero1, zero2, zero3, fsdp), "
                                 "not ddp")
            if offload is Offload.PARAMS and strategy in (Strategy.ZERO1, Strategy.ZERO2):
                raise UsageError("DeepSpeed offloads parameters only at stage 3: use --strategy "
                                 "zero3 or fsdp with --offload params, or --offload optimizer")
            if offload is Offload.OPTIMIZER and strategy is Strategy.FSDP:
                raise UsageError("FSDP offloads parameters and gradients together and then steps "
                                 "the optimizer on the CPU: use --offload params with fsdp")
            if values["optimizer"] is not Optimizer.ADAMW:
                raise UsageError(f"--offload runs the optimizer step on the CPU, which vramplan "
                                 f"plans for --optimizer adamw only (DeepSpeedCPUAdam / torch "
                                 f"AdamW), not {values['optimizer'].value}")
    values["strategy"], values["fsdp_sharding"], values["offload"] = strategy, sharding, offload


def spec_from_json(data: dict) -> TrainingSpec:
    """Rebuild a spec from `TrainingSpec.to_json()` output, validating it again."""
    if not isinstance(data, dict) or "model" not in data:
        raise UsageError("a plan must be a JSON object with at least a \"model\" key")
    options = {}
    for key, value in data.items():
        if key == "hypernetwork_layers" and value is not None:
            value = ",".join(str(v) for v in value)
        if key == "resolution" and isinstance(value, list):
            value = f"{value[0]}x{value[1]}"
        options[key] = value
    # Knobs that the method does not use are stored as null; drop them so validation accepts them.
    return build_spec({k: v for k, v in options.items() if v is not None})

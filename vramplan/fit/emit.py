"""A plan as the tools people already use would run it: `--emit diffusers | kohya | accelerate`.

* diffusers: the `accelerate launch` command line of the diffusers example script that trains
  this family and method (examples/text_to_image, dreambooth, textual_inversion in
  huggingface/diffusers). Each script's flag set below was read off its argparse (main branch,
  2026-08), and a flag is emitted only where the script has it; what a script cannot express
  (say a quantized base, or Adafactor) is written as a `# not expressible:` comment above.
* kohya: sd-scripts (kohya-ss/sd-scripts, 2026-02): train_network.py and its sdxl / sd3 / flux
  siblings for LoRA (networks.lora) and LoHa / LoKr (LyCORIS, `lycoris.kohya` with
  `algo=loha|lokr`), fine_tune.py / train_db.py / sdxl_train.py for full fine-tunes and
  DreamBooth, train_textual_inversion.py for textual inversion.
* accelerate: the config YAML (`accelerate config` format) for `accelerate launch
  --config_file`, written by `vramplan.distributed.configs` (the one writer, which `estimate
  --emit-launch` and `train` use too): mixed precision, the number of processes, and for several
  GPUs the distributed section (MULTI_GPU for ddp, the FSDP plugin, or DeepSpeed with the path of
  its JSON). For zero1/2/3 the DeepSpeed JSON comes with it. On stdout both are printed as one
  YAML stream, the config first and, after a `---` line, the JSON (JSON is YAML), each under a
  `# ==> NAME <==` line (as `head` separates files); the config then names the JSON by the
  relative path `deepspeed.json`, so save the second document under that name in the folder
  you launch from. `fit --emit accelerate --emit-dir FOLDER` writes the files there instead
  (accelerate.yaml, deepspeed.json), the config naming the JSON by its absolute path.
* For several GPUs the diffusers and kohya command lines launch with `--config_file
  accelerate.yaml`, the config of `--emit accelerate`.

Paths default to placeholders (./data, ./output, the model's Hub repository) unless given.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from vramplan.errors import UsageError
from vramplan.spec import Attention, BaseQuant, LoraTargets, Method, Optimizer, Precision, TrainingSpec

TARGETS = ("diffusers", "kohya", "accelerate")
PLACEHOLDER_TOKEN = "<sks>"


@dataclass(frozen=True)
class Paths:
    model: str | None = None
    data: str = "./data"
    output: str = "./output"
    class_data: str = "./class_data"
    instance_prompt: str = "a photo of sks"
    class_prompt: str = "a photo"
    steps: int = 1000


def _flags(text: str) -> frozenset:
    return frozenset(text.split())


# Flags of each diffusers example script (add_argument names), read from the scripts.
_COMMON = _flags("--pretrained_model_name_or_path --output_dir --seed --resolution --train_batch_size "
                 "--max_train_steps --checkpointing_steps --gradient_accumulation_steps "
                 "--gradient_checkpointing --learning_rate --mixed_precision")
DIFFUSERS_SCRIPTS = {
    "text_to_image/train_text_to_image_lora.py": _COMMON | _flags(
        "--train_data_dir --caption_column --center_crop --use_8bit_adam "
        "--enable_xformers_memory_efficient_attention --rank"),
    "text_to_image/train_text_to_image_lora_sdxl.py": _COMMON | _flags(
        "--train_data_dir --caption_column --center_crop --train_text_encoder --use_8bit_adam "
        "--enable_xformers_memory_efficient_attention --rank"),
    "text_to_image/train_text_to_image.py": _COMMON | _flags(
        "--train_data_dir --caption_column --center_crop --use_8bit_adam --use_ema "
        "--enable_xformers_memory_efficient_attention"),
    "text_to_image/train_text_to_image_sdxl.py": _COMMON | _flags(
        "--train_data_dir --caption_column --center_crop --use_8bit_adam --use_ema "
        "--enable_xformers_memory_efficient_attention"),
    "dreambooth/train_dreambooth.py": _COMMON | _flags(
        "--instance_data_dir --class_data_dir --instance_prompt --class_prompt --with_prior_preservation "
        "--prior_loss_weight --center_crop --train_text_encoder --use_8bit_adam "
        "--enable_xformers_memory_efficient_attention --pre_compute_text_embeddings"),
    "dreambooth/train_dreambooth_lora.py": _COMMON | _flags(
        "--instance_data_dir --class_data_dir --instance_prompt --class_prompt --with_prior_preservation "
        "--prior_loss_weight --center_crop --train_text_encoder --use_8bit_adam "
        "--enable_xformers_memory_efficient_attention --pre_compute_text_embeddings --rank"),
    "dreambooth/train_dreambooth_lora_sdxl.py": _COMMON | _flags(
        "--instance_data_dir --class_data_dir --instance_prompt --class_prompt --with_prior_preservation "
        "--prior_loss_weight --center_crop --train_text_encoder --use_8bit_adam --optimizer "
        "--enable_xformers_memory_efficient_attention --rank"),
    "dreambooth/train_dreambooth_lora_sd3.py": _COMMON | _flags(
        "--instance_data_dir --class_data_dir --instance_prompt --class_prompt --with_prior_preservation "
        "--prior_loss_weight --center_crop --train_text_encoder --use_8bit_adam --optimizer --rank "
        "--cache_latents --lora_layers"),
    "dreambooth/train_dreambooth_sd3.py": _COMMON | _flags(
        "--instance_data_dir --class_data_dir --instance_prompt --class_prompt --with_prior_preservation "
        "--prior_loss_weight --center_crop --train_text_encoder --use_8bit_adam --optimizer"),
    "dreambooth/train_dreambooth_lora_flux.py": _COMMON | _flags(
        "--instance_data_dir --class_data_dir --instance_prompt --class_prompt --with_prior_preservation "
        "--prior_loss_weight --center_crop --train_text_encoder --use_8bit_adam --optimizer --rank "
        "--lora_alpha --cache_latents --lora_layers"),
    "dreambooth/train_dreambooth_flux.py": _COMMON | _flags(
        "--instance_data_dir --class_data_dir --instance_prompt --class_prompt --with_prior_preservation "
        "--prior_loss_weight --center_crop --train_text_encoder --use_8bit_adam --optimizer"),
    "textual_inversion/textual_inversion.py": _COMMON | _flags(
        "--train_data_dir --placeholder_token --initializer_token --learnable_property --num_vectors "
        "--center_crop --enable_xformers_memory_efficient_attention"),
    "textual_inversion/textual_inversion_sdxl.py": _COMMON | _flags(
        "--train_data_dir --placeholder_token --initializer_token --learnable_property --num_vectors "
        "--center_crop --use_8bit_adam --enable_xformers_memory_efficient_attention"),
}


def diffusers_script(spec: TrainingSpec) -> str:
    family, method = spec.model.family, spec.method
    unet = family in ("sd1", "sd2")
    if method is Method.LORA:
        if family in ("sd3", "flux"):
            return f"dreambooth/train_dreambooth_lora_{family}.py"
        if spec.prior_preservation:
            return "dreambooth/train_dreambooth_lora.py" if unet else "dreambooth/train_dreambooth_lora_sdxl.py"
        return "text_to_image/train_text_to_image_lora.py" if unet else "text_to_image/train_text_to_image_lora_sdxl.py"
    if method in (Method.FULL, Method.DREAMBOOTH):
        if family in ("sd3", "flux"):
            return f"dreambooth/train_dreambooth_{family}.py"
        if method is Method.DREAMBOOTH:
            if unet:
                return "dreambooth/train_dreambooth.py"
            raise UsageError(f"diffusers has no full DreamBooth script for {spec.model.name}; "
                             f"try --emit kohya (sdxl_train.py with class images)")
        return "text_to_image/train_text_to_image.py" if unet else "text_to_image/train_text_to_image_sdxl.py"
    if method is Method.TEXTUAL_INVERSION and family in ("sd1", "sd2", "sdxl"):
        return "textual_inversion/textual_inversion.py" if unet else "textual_inversion/textual_inversion_sdxl.py"
    raise UsageError(f"no diffusers example script trains {method.value} on {spec.model.name}"
                     + ("; try --emit kohya" if method in (Method.LOHA, Method.LOKR) else ""))


@dataclass
class _Command:
    argv: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    allowed: frozenset | None = None

    def add(self, flag: str, *values, why: str = "") -> None:
        if self.allowed is not None and flag not in self.allowed:
            self.notes.append(f"{flag}{' ' + ' '.join(map(str, values)) if values else ''}"
                              f" ({why or 'the script has no such flag'})")
            return
        self.argv.append(flag)
        self.argv.extend(str(v) for v in values)

    def render(self, prefix: list[str]) -> str:
        lines = [f"# not expressible: {note}" for note in self.notes]
        words = prefix + self.argv
        # one flag per line, as the diffusers READMEs write them
        parts, current = [], []
        for word in words:
            if word.startswith("--") and current:
                parts.append(" ".join(shlex.quote(w) for w in current))
                current = []
            current.append(word)
        parts.append(" ".join(shlex.quote(w) for w in current))
        lines.append(" \\\n  ".join(parts))
        return "\n".join(lines) + "\n"


def _model_path(spec: TrainingSpec, paths: Paths) -> str:
    return paths.model or getattr(spec.model, "local_path", None) or spec.model.repo


def _mixed(spec: TrainingSpec) -> str:
    return {"fp32": "no", "fp16": "fp16", "bf16": "bf16", "fp16-pure": "fp16", "bf16-pure": "bf16"}[spec.precision.value]


def emit_diffusers(spec: TrainingSpec, paths: Paths = Paths()) -> str:
    script = diffusers_script(spec)
    cmd = _Command(allowed=DIFFUSERS_SCRIPTS[script])
    cmd.add("--pretrained_model_name_or_path", _model_path(spec, paths))
    dreambooth_style = script.startswith("dreambooth/")
    if dreambooth_style:
        cmd.add("--instance_data_dir", paths.data)
        cmd.add("--instance_prompt", paths.instance_prompt)
    else:
        cmd.add("--train_data_dir", paths.data)
    if spec.prior_preservation:
        cmd.add("--with_prior_preservation")
        cmd.add("--class_data_dir", paths.class_data)
        cmd.add("--class_prompt", paths.class_prompt)
        cmd.add("--prior_loss_weight", "1.0")
    cmd.add("--output_dir", paths.output)
    width, height = spec.resolution
    cmd.add("--resolution", width)
    if width != height:
        cmd.notes.append(f"--resolution {width}x{height} (the scripts train square images)")
    cmd.add("--center_crop")
    cmd.add("--train_batch_size", spec.batch_size)
    if spec.gradient_accumulation_steps > 1:
        cmd.add("--gradient_accumulation_steps", spec.gradient_accumulation_steps)
    if spec.gradient_checkpointing:
        cmd.add("--gradient_checkpointing")
    cmd.add("--mixed_precision", _mixed(spec))
    if spec.precision in (Precision.FP16_PURE, Precision.BF16_PURE):
        cmd.notes.append(f"--precision {spec.precision.value} (the scripts keep trained weights in fp32)")
    if spec.method is Method.LORA:
        cmd.add("--rank", spec.rank)
        if spec.alpha != spec.rank:
            cmd.add("--lora_alpha", f"{spec.alpha:g}", why="the script sets alpha = rank")
        if spec.lora_targets is not LoraTargets.ATTN:
            cmd.notes.append(f"--lora-targets {spec.lora_targets.value} (the script wraps the attention "
                             f"projections)")
    if spec.method is Method.TEXTUAL_INVERSION:
        cmd.add("--placeholder_token", PLACEHOLDER_TOKEN)
        cmd.add("--initializer_token", "toy")
        cmd.add("--learnable_property", "object")
        cmd.add("--num_vectors", spec.num_vectors or 1)
    if spec.train_text_encoder:
        cmd.add("--train_text_encoder")
    if spec.optimizer is Optimizer.ADAMW8BIT:
        cmd.add("--use_8bit_adam")
    elif spec.optimizer is Optimizer.PRODIGY:
        cmd.add("--optimizer", "prodigy")
    elif spec.optimizer is not Optimizer.ADAMW:
        cmd.notes.append(f"--optimizer {spec.optimizer.value} (the scripts offer AdamW, 8-bit AdamW "
                         f"and, in some, Prodigy)")
    if spec.base_quant is not BaseQuant.NONE:
        cmd.notes.append(f"--base-quant {spec.base_quant.value} (the script loads the base unquantized)")
    if spec.attention is Attention.XFORMERS:
        cmd.add("--enable_xformers_memory_efficient_attention")
    elif spec.attention is Attention.EAGER:
        cmd.notes.append("--attention eager (the scripts use PyTorch's SDPA)")
    if spec.cache_latents:
        cmd.add("--cache_latents", why="this script encodes the images every step")
    if spec.cache_text_embeddings:
        cmd.add("--pre_compute_text_embeddings", why="this script encodes the prompts every step")
    if spec.ema:
        cmd.add("--use_ema")
    cmd.add("--max_train_steps", paths.steps)
    cmd.add("--seed", 0)
    return _several_gpus(spec) + cmd.render(_launch(spec) + [script])


KOHYA_NETWORK_SCRIPT = {"sd1": "train_network.py", "sd2": "train_network.py", "sdxl": "sdxl_train_network.py",
                        "sd3": "sd3_train_network.py", "flux": "flux_train_network.py"}
KOHYA_FULL_SCRIPT = {"sd1": "fine_tune.py", "sd2": "fine_tune.py", "sdxl": "sdxl_train.py",
                     "sd3": "sd3_train.py", "flux": "flux_train.py"}
KOHYA_TI_SCRIPT = {"sd1": "train_textual_inversion.py", "sd2": "train_textual_inversion.py",
                   "sdxl": "sdxl_train_textual_inversion.py"}
KOHYA_OPTIMIZER = {Optimizer.ADAMW: "AdamW", Optimizer.ADAMW8BIT: "AdamW8bit", Optimizer.ADAFACTOR: "Adafactor",
                   Optimizer.LION: "Lion", Optimizer.PRODIGY: "Prodigy", Optimizer.SGD: "SGDNesterov"}


def kohya_script(spec: TrainingSpec) -> str:
    family, method = spec.model.family, spec.method
    if method in (Method.LORA, Method.LOHA, Method.LOKR):
        return KOHYA_NETWORK_SCRIPT[family]
    if method is Method.DREAMBOOTH and family in ("sd1", "sd2"):
        return "train_db.py"
    if method in (Method.FULL, Method.DREAMBOOTH):
        return KOHYA_FULL_SCRIPT[family]
    if method is Method.TEXTUAL_INVERSION and family in KOHYA_TI_SCRIPT:
        return KOHYA_TI_SCRIPT[family]
    raise UsageError(f"kohya sd-scripts has no trainer for {method.value} on {spec.model.name}")


def emit_kohya(spec: TrainingSpec, paths: Paths = Paths()) -> str:
    script = kohya_script(spec)
    cmd = _Command()
    cmd.add("--pretrained_model_name_or_path", _model_path(spec, paths))
    if spec.model.family == "sd2":
        cmd.add("--v2")
        if spec.model.prediction == "v_prediction":
            cmd.add("--v_parameterization")
    cmd.add("--train_data_dir", paths.data)
    cmd.add("--caption_extension", ".txt")
    if spec.prior_preservation:
        cmd.add("--reg_data_dir", paths.class_data)
        cmd.add("--prior_loss_weight", "1.0")
    cmd.add("--output_dir", paths.output)
    width, height = spec.resolution
    cmd.add("--resolution", f"{width},{height}")
    cmd.add("--train_batch_size", spec.batch_size)
    if spec.gradient_accumulation_steps > 1:
        cmd.add("--gradient_accumulation_steps", spec.gradient_accumulation_steps)
    cmd.add("--max_train_steps", paths.steps)
    cmd.add("--mixed_precision", _mixed(spec))
    if spec.precision is Precision.BF16_PURE:
        cmd.add("--full_bf16")
    elif spec.precision is Precision.FP16_PURE:
        cmd.add("--full_fp16")
    cmd.add("--optimizer_type", KOHYA_OPTIMIZER[spec.optimizer])
    if spec.optimizer is Optimizer.ADAFACTOR:
        cmd.add("--optimizer_args", "scale_parameter=True", "relative_step=True", "warmup_init=False")
    if spec.gradient_checkpointing:
        cmd.add("--gradient_checkpointing")
    if spec.attention is Attention.XFORMERS:
        cmd.add("--xformers")
    elif spec.attention is Attention.SDPA:
        cmd.add("--sdpa")
    if spec.cache_latents:
        cmd.add("--cache_latents")
    if spec.cache_text_embeddings:
        if spec.model.family in ("sd1", "sd2"):
            cmd.notes.append("--cache-text-embeddings (train_network.py caches text encoder outputs "
                             "for SDXL, SD3 and Flux only)")
        else:
            cmd.add("--cache_text_encoder_outputs")
    if spec.method in (Method.LORA, Method.LOHA, Method.LOKR):
        if spec.method is Method.LORA:
            cmd.add("--network_module", "networks.lora")
            args = []
        else:
            cmd.add("--network_module", "lycoris.kohya")
            args = [f"algo={spec.method.value}"]
            if spec.method is Method.LOKR and spec.lokr_factor not in (None, -1):
                args.append(f"factor={spec.lokr_factor}")
        cmd.add("--network_dim", spec.rank)
        cmd.add("--network_alpha", f"{spec.alpha:g}")
        if spec.lora_targets is LoraTargets.ALL_LINEAR_CONV:
            args += [f"conv_dim={spec.rank}", f"conv_alpha={spec.alpha:g}"]
        elif spec.lora_targets is LoraTargets.ATTN:
            cmd.notes.append("--lora-targets attn (kohya's networks also wrap the transformer blocks' "
                             "feed-forward and projection layers)")
        if args:
            cmd.add("--network_args", *args)
        if not spec.train_text_encoder:
            cmd.add("--network_train_unet_only")
        if spec.base_quant is not BaseQuant.NONE:
            cmd.notes.append(f"--base-quant {spec.base_quant.value} (sd-scripts offers --fp8_base, "
                             f"not bitsandbytes int8/nf4)")
        cmd.add("--save_model_as", "safetensors")
    elif spec.method is Method.TEXTUAL_INVERSION:
        cmd.add("--token_string", "sks")
        cmd.add("--init_word", "toy")
        cmd.add("--num_vectors_per_token", spec.num_vectors or 1)
        cmd.add("--use_object_template")
    else:
        if spec.train_text_encoder and script in ("fine_tune.py", "sdxl_train.py"):
            cmd.add("--train_text_encoder")
        cmd.add("--save_model_as", "diffusers" if script != "sdxl_train.py" else "safetensors")
    if spec.ema:
        cmd.notes.append("--ema (sd-scripts keeps no EMA of the weights)")
    cmd.add("--seed", 0)
    return _several_gpus(spec) + cmd.render(_launch(spec) + [script])


def _launch(spec: TrainingSpec) -> list[str]:
    if spec.num_gpus > 1 or spec.strategy is not None:
        return ["accelerate", "launch", "--config_file", "accelerate.yaml"]
    return ["accelerate", "launch"]


def _several_gpus(spec: TrainingSpec) -> str:
    if spec.num_gpus <= 1 and spec.strategy is None:
        return ""
    what = spec.strategy.value if spec.strategy else "ddp"
    return (f"# {spec.num_gpus} GPUs, {what}: write accelerate.yaml"
            + (" and deepspeed.json" if spec.strategy is not None and spec.strategy.is_deepspeed else "")
            + " with 'vramplan fit ... --emit accelerate --emit-dir .'\n")


def accelerate_config(spec: TrainingSpec) -> dict:
    """The config `accelerate config` writes for the plan (one machine; several GPUs when the
    plan has them): the same writer `estimate --emit-launch` uses."""
    from vramplan.distributed.configs import accelerate_config as launch_config

    return launch_config(spec)


def launch_files(spec: TrainingSpec) -> list[tuple[str, str]]:
    """(file name, text): accelerate.yaml, and deepspeed.json for zero1/2/3, as one would save
    them side by side (the YAML names the JSON by the relative path)."""
    from vramplan.distributed.configs import ACCELERATE_YAML, DEEPSPEED_JSON, accelerate_yaml, deepspeed_json

    files = [(ACCELERATE_YAML, accelerate_yaml(spec, DEEPSPEED_JSON))]
    if spec.strategy is not None and spec.strategy.is_deepspeed:
        files.append((DEEPSPEED_JSON, deepspeed_json(spec)))
    return files


def emit_accelerate(spec: TrainingSpec, paths: Paths = Paths()) -> str:
    """The launch files as one YAML stream (see the module docstring)."""
    files = launch_files(spec)
    if len(files) == 1:
        return files[0][1]
    return "\n---\n".join(f"# ==> {name} <==\n{text.rstrip()}" for name, text in files) + "\n"


def write_accelerate(spec: TrainingSpec, folder) -> list:
    """--emit-dir: the launch files written into `folder` (the one writer of distributed/configs)."""
    from vramplan.distributed.configs import write_launch_files

    try:
        return write_launch_files(spec, folder)
    except OSError as error:
        raise UsageError(f"--emit-dir: cannot write to {str(folder)!r}: {error.strerror or error}") from None


EMITTERS = {"diffusers": emit_diffusers, "kohya": emit_kohya, "accelerate": emit_accelerate}


def emit(spec: TrainingSpec, target: str, paths: Paths = Paths()) -> str:
    try:
        emitter = EMITTERS[target]
    except KeyError:
        raise UsageError(f"--emit: {target!r} is not one of {', '.join(TARGETS)}") from None
    return emitter(spec, paths)

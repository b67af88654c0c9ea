"""The protocol every training method implements, and the registry that finds it.

A method answers, from the spec and the components' inventories alone (no torch):
  * which tensors it trains (`trainable_tensors`: names as the trained state dict holds them,
    shapes, and whether they start as zeros), hence how many parameters per component
    (`trainable`);
  * for adapter methods, which modules it wraps (`targets`) and the exact size of the file it
    saves (`adapter_file_bytes`).
Torch-side behaviour (building the adapted model for the simulator) belongs on the same classes,
next to these, so that one module holds everything about one method.

As in peft (`register_peft_method(name=..., config_cls=..., model_cls=...)` at the end of each
tuner's `__init__.py`), each method module ends with one `register_method(...)` line; `get_method`
is the only way in. Adding a method is one new module plus that line.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from math import prod
from typing import ClassVar, Iterable, Mapping

from vramplan.errors import UsageError
from vramplan.methods.targets import denoiser_targets, text_encoder_targets
from vramplan.models.inventory import Inventory, ModuleEntry
from vramplan.spec import Method, TrainingSpec

Inventories = Mapping[str, Inventory]  # component name -> inventory


@dataclass(frozen=True)
class TrainableTensor:
    """One trained tensor: its name in the trained component's state dict, as saved (peft's adapter
    weights without the adapter name, e.g. "down_blocks.0...to_q.lora_A.weight"), its shape, and
    whether it is all zeros at the first optimizer step (Prodigy allocates less for those)."""

    name: str
    shape: tuple[int, ...]
    zero_init: bool = False

    @cached_property
    def numel(self) -> int:
        # kept: fit reads it for every tensor of every candidate (states, transients, sums)
        return prod(self.shape)


class MethodImpl(ABC):
    """One training method: subclasses implement `trainable_tensors` (and, for adapters, the file
    size) and register with `register_method`, which sets `method`."""

    method: ClassVar[Method]

    # peft's LyCORIS layers (LoHa, LoKr) return `result.to(previous_dtype)`, the input's dtype;
    # LoRA returns the base layer's. Under autocast that changes what follows the layer.
    output_keeps_input_dtype: ClassVar[bool] = False

    @abstractmethod
    def trainable_tensors(self, spec: TrainingSpec, inventories: Inventories) -> dict[str, list[TrainableTensor]]:
        """Component name -> the tensors this method trains in it (components it leaves frozen are
        absent)."""

    def trainable(self, spec: TrainingSpec, inventories: Inventories) -> dict[str, int]:
        """Component name -> trainable parameter count."""
        return {component: sum(t.numel for t in tensors)
                for component, tensors in self.trainable_tensors(spec, inventories).items()}

    def adapter_file_bytes(self, spec: TrainingSpec, inventories: Inventories) -> int | None:
        """Bytes of the file the trained weights are saved as; None when the method saves whole
        models rather than an adapter."""
        return None

    def apply(self, spec: TrainingSpec, models: dict, inventories: Inventories) -> None:
        """Torch side: make `models` (component name -> nn.Module, on any device, meta included)
        train what this method trains: set requires_grad, inject adapter layers. Called once by
        the step builder (vramplan/step/build.py) before dtypes are set."""
        raise NotImplementedError

    def parameter_filter(self, spec: TrainingSpec, component: str, inventories: Inventories):
        """Predicate over full parameter names ("unet.<module>.<param>") in the recorded graphs:
        does this method train it? By default: the names `trainable_tensors` gives."""
        prefix = component + "."
        names = {t.name for t in self.trainable_tensors(spec, inventories).get(component, [])}
        return lambda name: name.startswith(prefix) and name[len(prefix):] in names

    def wrapped_modules(self, spec: TrainingSpec, component: str,
                        inventories: Inventories) -> list[ModuleEntry]:
        """Modules of `component` whose calls this method replaces by an adapted layer (the
        analytic tier splices a recorded template there). None by default."""
        return []


class AdapterMethod(MethodImpl):
    """peft tuners that wrap chosen Linear / Conv modules with small trainable factors (LoRA,
    LoHa, LoKr): the denoiser's `targets`, plus the text encoders' attention projections under
    `--train-text-encoder`. Subclasses give the tensors one wrapped module gets."""

    @abstractmethod
    def module_tensors(self, spec: TrainingSpec, entry: ModuleEntry) -> list[TrainableTensor]:
        """The adapter tensors peft adds to one module, named relative to it ("lora_A.weight")."""

    def targets(self, spec: TrainingSpec, inventory: Inventory) -> list[ModuleEntry]:
        """The denoiser modules this adapter wraps (`--lora-targets`)."""
        return denoiser_targets(spec, inventory)

    def text_encoder_targets(self, spec: TrainingSpec, inventory: Inventory) -> list[ModuleEntry]:
        return text_encoder_targets(inventory)

    def apply(self, spec, models, inventories):
        from peft import inject_adapter_in_model

        for component, module in models.items():
            module.requires_grad_(False)
            names = [m.name for m in self.wrapped_modules(spec, component, inventories)]
            if names:
                inject_adapter_in_model(self.peft_config(spec, names), module)
                self._after_inject(module)

    def _after_inject(self, module) -> None:
        """Hook for peft layers that need a mode set (LoHa/LoKr)."""

    def wrapped_modules(self, spec, component, inventories):
        name, denoiser = denoiser_inventory(spec, inventories)
        if component == name:
            return self.targets(spec, denoiser)
        if component in trained_text_encoders(spec):
            return self.text_encoder_targets(spec, inventories[component])
        return []

    def trainable_tensors(self, spec, inventories):
        name, denoiser = denoiser_inventory(spec, inventories)
        out = {name: self._wrap(spec, self.targets(spec, denoiser))}
        for encoder in trained_text_encoders(spec):
            out[encoder] = self._wrap(spec, self.text_encoder_targets(spec, inventories[encoder]))
        return out

    def _wrap(self, spec, entries) -> list[TrainableTensor]:
        return [TrainableTensor(module_prefix(m) + t.name, t.shape, t.zero_init)
                for m in entries for t in self.module_tensors(spec, m)]

    def template(self, spec: TrainingSpec, entry: ModuleEntry) -> tuple[str, str, dict]:
        """Which recorded layer template stands for this wrapped module in the analytic tier:
        (template method, regime, sizes). Sizes name the template's symbols (IN, OUT, R...)."""
        return self.method.value, "", {"IN": entry.fan_in, "OUT": entry.fan_out, "R": spec.rank}

    def adapter_prefix(self, spec: TrainingSpec, entry: ModuleEntry) -> str:
        """Prefix of this module's adapter tensors among `trainable_tensors` names."""
        return module_prefix(entry)

    def peft_config(self, spec: TrainingSpec, target_modules: list[str]):
        """The peft config the training step injects (torch side; imports peft)."""
        raise NotImplementedError(f"{type(self).__name__} has no peft config")

    def saved_key(self, spec: TrainingSpec, component: str, name: str) -> str:
        """The key a tensor is saved under: diffusers' `save_lora_weights` prefixes each
        component's state dict with the component's name (`_pack_dict_with_prefix`)."""
        return f"{component}.{name}"

    def adapter_file_bytes(self, spec, inventories, dtype: str = "F16") -> int:
        """The adapter file `save_lora_weights` writes (metadata {"format": "pt"}), in `dtype`.

        fp16 by default. The diffusers scripts call `unet.to(torch.float32)` before saving, so
        their files are F32: pass dtype="F32" to predict those.
        """
        tensors = [(self.saved_key(spec, component, t.name), t.shape)
                   for component, ts in self.trainable_tensors(spec, inventories).items() for t in ts]
        return safetensors_file_bytes(tensors, dtype, PT_FORMAT)


_REGISTRY: dict[Method, MethodImpl] = {}


def register_method(method: Method, impl: type[MethodImpl]) -> None:
    """Make `impl` the implementation of `method` (each method module's last line)."""
    if method in _REGISTRY:
        raise ValueError(f"method {method.value!r} is already registered ({type(_REGISTRY[method]).__name__})")
    declared = impl.__dict__.get("method", method)
    if declared is not method:
        raise ValueError(f"{impl.__name__}.method is {declared!r}, not {method!r}")
    impl.method = method
    _REGISTRY[method] = impl()


def get_method(method: Method) -> MethodImpl:
    try:
        return _REGISTRY[method]
    except KeyError:
        raise UsageError(f"--method {method.value} has no implementation (registered: "
                         f"{', '.join(m.value for m in _REGISTRY)})") from None


def registered_methods() -> tuple[Method, ...]:
    return tuple(_REGISTRY)


def denoiser_inventory(spec: TrainingSpec, inventories: Inventories) -> tuple[str, Inventory]:
    name = spec.model.denoiser.name
    return name, inventories[name]


def trained_text_encoders(spec: TrainingSpec) -> tuple[str, ...]:
    """The text encoders `--train-text-encoder` trains (the catalog's per-model choice)."""
    return spec.model.trainable_text_encoders if spec.train_text_encoder else ()


def module_prefix(entry: ModuleEntry) -> str:
    return entry.name + "." if entry.name else ""


# ---- safetensors files, byte for byte --------------------------------------------------------

SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
PT_FORMAT = {"format": "pt"}  # the metadata diffusers and peft write (`save_file(..., metadata=...)`)


def safetensors_file_bytes(tensors: Iterable[tuple[str, tuple[int, ...]]], dtype: str = "F16",
                           metadata: Mapping[str, str] | None = None) -> int:
    """Size of the .safetensors file holding these (name, shape) tensors, all of `dtype`.

    The layout, as the Rust serializer writes it (safetensors/src/tensor.rs, `prepare` and
    `impl Serialize for Metadata`): an 8-byte little-endian header length; a compact JSON object
    with "__metadata__" (if any) first, then every tensor as {"dtype","shape","data_offsets"} in
    the order the data is laid out -- sorted by descending dtype alignment, then by name -- padded
    with spaces to a multiple of 8; then the raw data. Only the offsets depend on the order (their
    digit counts), and one dtype means name order.
    """
    if dtype not in SAFETENSORS_DTYPE_BYTES:
        raise ValueError(f"unknown safetensors dtype {dtype!r}")
    itemsize = SAFETENSORS_DTYPE_BYTES[dtype]
    parts = []
    if metadata is not None:
        parts.append(_json_str("__metadata__") + ":{" + ",".join(
            f"{_json_str(k)}:{_json_str(v)}" for k, v in metadata.items()) + "}")
    offset = 0
    for name, shape in sorted(tensors, key=lambda t: t[0].encode("utf-8")):
        size = prod(shape) * itemsize
        parts.append(f'{_json_str(name)}:{{"dtype":"{dtype}","shape":[{",".join(str(int(d)) for d in shape)}],'
                     f'"data_offsets":[{offset},{offset + size}]}}')
        offset += size
    header = len(("{" + ",".join(parts) + "}").encode("utf-8"))
    return 8 + (header + 7) // 8 * 8 + offset


def _json_str(text: str) -> str:
    # serde_json and Python's json escape the same characters (quote, backslash, control codes)
    # and pass other non-ASCII through as UTF-8 when ensure_ascii is off.
    return json.dumps(text, ensure_ascii=False)


# ---- torch side: applying a method to real (or meta) models for the training step --------------

def freeze(module) -> None:
    module.requires_grad_(False)


def keep_lycoris_layers_in_eval(module) -> None:
    """peft's LyCORIS layers (LoHa, LoKr) draw `torch.rand(1) > module_dropout` in training mode,
    which fake tensors cannot evaluate; in eval mode they skip the draw, identical when module and
    rank dropout are 0 (ours are). Every tier runs them this way (NOTES.md)."""
    try:
        from peft.tuners.lycoris_utils import LycorisLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return
    for layer in module.modules():
        if isinstance(layer, LycorisLayer):
            layer.eval()

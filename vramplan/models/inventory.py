"""Module inventories: every parameter and every module that owns one, read from shipped JSON.

An inventory is what the analytic tier needs to know about a component without building it: the
parameter names and shapes, and each module that holds parameters (Linear, Conv2d, LayerNorm,
GroupNorm, Embedding, RMSNorm ...) with its geometry. `scripts/build_inventory.py` writes the
catalog's inventories once on the meta device (`vramplan/models/data/<model>/<component>.json`);
local models get theirs built the same way and cached (`vramplan.models.local`).

Nothing here imports torch: loading the SDXL UNet's inventory takes milliseconds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from vramplan.errors import UsageError
from vramplan.models.catalog import MODELS, ModelInfo

DATA_DIR = Path(__file__).parent / "data"
CONFIG_DIR = Path(__file__).parent / "configs"
# Bump when the JSON layout changes; the loader refuses files of another format.
INVENTORY_FORMAT = 1

_DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4,
                "int16": 2, "int8": 1, "uint8": 1, "bool": 1}


def numel(shape) -> int:
    return math.prod(shape)


@dataclass(frozen=True)
class ModuleEntry:
    """A module that owns parameters directly (`module.parameters(recurse=False)` is not empty).

    `kind` is the torch.nn base class (Linear, Conv2d, Embedding, LayerNorm, GroupNorm, RMSNorm)
    or, for a custom module, its own class name; `cls` is always the module's own class.
    `params` counts the parameters this module owns and no earlier module already did: a module
    whose weight is tied to another's (T5's `encoder.embed_tokens` and `shared`) has `tied` set to
    that parameter's name and `params` 0, so the entries sum to the component's total.
    """

    name: str
    kind: str
    cls: str
    params: int
    param_shapes: tuple[tuple[str, tuple[int, ...]], ...]
    bias: bool = False
    in_features: int | None = None
    out_features: int | None = None
    in_channels: int | None = None
    out_channels: int | None = None
    kernel_size: tuple[int, ...] | None = None
    stride: tuple[int, ...] | None = None
    padding: tuple[int, ...] | None = None
    groups: int | None = None
    num_embeddings: int | None = None
    embedding_dim: int | None = None
    normalized_shape: tuple[int, ...] | None = None
    num_groups: int | None = None
    num_channels: int | None = None
    tied: str | None = None

    @property
    def is_linear(self) -> bool:
        return self.kind == "Linear"

    @property
    def is_conv(self) -> bool:
        return self.kind in ("Conv1d", "Conv2d", "Conv3d")

    @property
    def fan_in(self) -> int | None:
        """Input width: in_features, or in_channels for a convolution."""
        return self.in_features if self.in_features is not None else self.in_channels

    @property
    def fan_out(self) -> int | None:
        return self.out_features if self.out_features is not None else self.out_channels

    def shape(self, param: str = "weight") -> tuple[int, ...] | None:
        return dict(self.param_shapes).get(param)


@dataclass(frozen=True)
class BufferEntry:
    name: str
    shape: tuple[int, ...]
    dtype: str          # as built: "float32", "int64" ...
    persistent: bool    # saved in the state dict

    @property
    def numel(self) -> int:
        return numel(self.shape)

    @property
    def bytes(self) -> int:
        return self.numel * _DTYPE_BYTES.get(self.dtype, 4)


@dataclass(frozen=True)
class Inventory:
    model: str                 # catalog key, or the local path
    component: str             # unet, transformer, vae, text_encoder ...
    cls: str
    library: str               # diffusers or transformers
    config: dict
    total_params: int
    params: tuple[tuple[str, tuple[int, ...]], ...]   # named_parameters(), tied ones once
    modules: tuple[ModuleEntry, ...]
    buffers: tuple[BufferEntry, ...] = ()
    built_with: dict | None = None

    @property
    def buffer_numel(self) -> int:
        return sum(b.numel for b in self.buffers)

    @property
    def buffer_bytes(self) -> int:
        """Bytes of all buffers in the dtypes they were built with (float buffers as fp32)."""
        return sum(b.bytes for b in self.buffers)

    def linears(self) -> tuple[ModuleEntry, ...]:
        return tuple(m for m in self.modules if m.is_linear)

    def convs(self) -> tuple[ModuleEntry, ...]:
        return tuple(m for m in self.modules if m.is_conv)

    def of_kind(self, *kinds: str) -> tuple[ModuleEntry, ...]:
        return tuple(m for m in self.modules if m.kind in kinds)

    def find(self, suffixes, kind: str | None = None) -> tuple[ModuleEntry, ...]:
        """Modules whose dotted name is one of `suffixes` or ends with "." + one of them,
        as peft matches `target_modules` ("to_q" matches "attn1.to_q", not "add_to_q")."""
        if isinstance(suffixes, str):
            suffixes = (suffixes,)
        found = []
        for m in self.modules:
            if kind is not None and m.kind != kind:
                continue
            if any(m.name == s or m.name.endswith("." + s) for s in suffixes):
                found.append(m)
        return tuple(found)

    def module(self, name: str) -> ModuleEntry:
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(name)

    def params_under(self, prefix: str) -> int:
        """Parameters whose name starts with `prefix` (e.g. "down_blocks.0.")."""
        return sum(numel(shape) for name, shape in self.params if name.startswith(prefix))


def kept_per_inventory(inventory: Inventory, key: tuple, make):
    """`make()`, kept for this inventory object and `key`: what a caller derives from an inventory
    alone (its weights in a dtype, its adapter targets), which fit asks for once per candidate.
    Keyed by identity (an inventory is immutable but unhashable: its config is a dict) and holding
    the inventory, so that its id is not reused while kept."""
    whole = (id(inventory),) + key
    known = _PER_INVENTORY.get(whole)
    if known is not None and known[0] is inventory:
        return known[1]
    value = make()
    if len(_PER_INVENTORY) >= 256:
        _PER_INVENTORY.clear()
    _PER_INVENTORY[whole] = (inventory, value)
    return value


_PER_INVENTORY: dict = {}


def _tuple(value):
    return None if value is None else tuple(value)


def _module_from_json(row: dict) -> ModuleEntry:
    return ModuleEntry(
        name=row["name"], kind=row["kind"], cls=row.get("cls", row["kind"]), params=row["params"],
        param_shapes=tuple((k, tuple(v)) for k, v in row["shapes"]),
        bias=row.get("bias", False),
        in_features=row.get("in_features"), out_features=row.get("out_features"),
        in_channels=row.get("in_channels"), out_channels=row.get("out_channels"),
        kernel_size=_tuple(row.get("kernel_size")), stride=_tuple(row.get("stride")),
        padding=_tuple(row.get("padding")), groups=row.get("groups"),
        num_embeddings=row.get("num_embeddings"), embedding_dim=row.get("embedding_dim"),
        normalized_shape=_tuple(row.get("normalized_shape")), num_groups=row.get("num_groups"),
        num_channels=row.get("num_channels"), tied=row.get("tied"),
    )


def inventory_from_json(data: dict, source: str = "inventory") -> Inventory:
    """Rebuild an `Inventory` from the dict `build_component_inventory` produced."""
    if not isinstance(data, dict) or data.get("format") != INVENTORY_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise UsageError(f"{source}: inventory format {found!r}, expected {INVENTORY_FORMAT} "
                         f"(rebuild it with scripts/build_inventory.py)")
    return Inventory(
        model=data["model"], component=data["component"], cls=data["cls"],
        library=data["library"], config=data["config"], total_params=data["total_params"],
        params=tuple((name, tuple(shape)) for name, shape in data["params"]),
        modules=tuple(_module_from_json(row) for row in data["modules"]),
        buffers=tuple(BufferEntry(name, tuple(shape), dtype, persistent)
                      for name, shape, dtype, persistent in data["buffers"]),
        built_with=data.get("built_with"),
    )


def inventory_path(model_key: str, component: str) -> Path:
    return DATA_DIR / model_key / f"{component}.json"


def config_path(model_key: str, component: str) -> Path:
    return CONFIG_DIR / model_key / f"{component}.json"


def load_config(model_key: str, component: str) -> dict:
    """The component's shipped config.json, as its Hugging Face repository publishes it."""
    return json.loads(config_path(model_key, component).read_text())


@lru_cache(maxsize=None)
def load_inventory(model_key: str, component: str) -> Inventory:
    """The shipped inventory of one component of a catalog model."""
    path = inventory_path(model_key, component)
    if not path.is_file():
        if model_key not in MODELS:
            raise UsageError(f"no shipped inventory for model {model_key!r}: choose from "
                             f"{', '.join(MODELS)}")
        names = ", ".join(c.name for c in MODELS[model_key].components)
        raise UsageError(f"{model_key} has no component {component!r} (it has {names})")
    return inventory_from_json(json.loads(path.read_text()), source=str(path))


def load_model_inventories(model: ModelInfo) -> dict[str, Inventory]:
    """Every component's inventory: shipped ones for catalog models (and for single-file
    checkpoints, which map to one), built and cached ones for local diffusers folders."""
    local_path = getattr(model, "local_path", None)
    if local_path is not None and getattr(model, "base_model", None) is None:
        from vramplan.models.local import local_inventories

        return local_inventories(model)
    key = getattr(model, "base_model", None) or model.key
    return {c.name: load_inventory(key, c.name) for c in model.components}

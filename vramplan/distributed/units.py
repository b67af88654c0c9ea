"""The FSDP wrap units of a component: which parameters are flattened, gathered and freed together.

accelerate's FSDP plugin wraps with `transformer_auto_wrap_policy` over the classes named in
`fsdp_transformer_layer_cls_to_wrap` (accelerate/utils/dataclasses.py,
`FullyShardedDataParallelPlugin.__post_init__`; its own default is NO_WRAP, one unit for the whole
model, which gathers everything at once and would make FSDP pointless). vramplan's emitted config
names the repeated blocks of each model class below; every other parameter (embeddings, conv_in,
conv_out, final norms) stays in the root unit, the model accelerate wraps itself. A unit nested in
another (a BasicTransformerBlock inside a Transformer2DModel) owns only its own parameters, as
FSDP1's `_recursive_wrap` gives each wrapped module the parameters not already wrapped below it.

Units are read from the inventories' module paths, so no torch is needed; the patterns are checked
against the real module classes in tests/distributed/test_units.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from vramplan.models.inventory import Inventory, kept_per_inventory, numel

# component class -> ((wrapped block class, regex matching the module paths of its instances), ...)
_UNET = (
    ("ResnetBlock2D", r"(?:down_blocks|up_blocks)\.\d+\.resnets\.\d+|mid_block\.resnets\.\d+"),
    ("Transformer2DModel", r"(?:down_blocks|up_blocks)\.\d+\.attentions\.\d+|mid_block\.attentions\.\d+"),
    ("BasicTransformerBlock",
     r"(?:(?:down_blocks|up_blocks)\.\d+|mid_block)\.attentions\.\d+\.transformer_blocks\.\d+"),
    ("Downsample2D", r"down_blocks\.\d+\.downsamplers\.\d+"),
    ("Upsample2D", r"up_blocks\.\d+\.upsamplers\.\d+"),
)
_CLIP = (("CLIPEncoderLayer", r"(?:text_model\.)?encoder\.layers\.\d+"),)
WRAP_CLASSES: dict[str, tuple[tuple[str, str], ...]] = {
    "UNet2DConditionModel": _UNET,
    "SD3Transformer2DModel": (("JointTransformerBlock", r"transformer_blocks\.\d+"),),
    "FluxTransformer2DModel": (("FluxTransformerBlock", r"transformer_blocks\.\d+"),
                               ("FluxSingleTransformerBlock", r"single_transformer_blocks\.\d+")),
    "CLIPTextModel": _CLIP,
    "CLIPTextModelWithProjection": _CLIP,
    "T5EncoderModel": (("T5Block", r"encoder\.block\.\d+"),),
}


@dataclass
class Unit:
    """One FSDP unit: the module at `path` ("" for the root) and the parameters it owns."""

    component: str
    path: str
    cls: str
    params: list = field(default_factory=list)     # (name, numel), names relative to the component
    trainable_numel: int = 0

    @property
    def numel(self) -> int:
        return sum(n for _, n in self.params)

    @property
    def full_path(self) -> str:
        return f"{self.component}.{self.path}" if self.path else self.component

    def holds(self, module: str) -> bool:
        """Does `module` ("unet.down_blocks.0...", component-prefixed) lie inside this unit?"""
        base = self.full_path
        return module == base or module.startswith(base + ".")


def wrap_classes(cls: str) -> tuple[str, ...]:
    return tuple(name for name, _ in WRAP_CLASSES.get(cls, ()))


def _wrapped_prefixes(inventory: Inventory) -> list[tuple[str, str]]:
    """(module path, class) of every wrapped block instance, found from the parameter names
    (kept per inventory: a several-GPU fit asks for every candidate; read-only)."""
    return kept_per_inventory(inventory, ("wrapped prefixes",), lambda: _find_wrapped_prefixes(inventory))


def _find_wrapped_prefixes(inventory: Inventory) -> list[tuple[str, str]]:
    patterns = [(cls, re.compile(regex)) for cls, regex in WRAP_CLASSES.get(inventory.cls, ())]
    found: dict[str, str] = {}
    for pname, _ in inventory.params:
        parts = pname.split(".")
        for k in range(1, len(parts)):
            prefix = ".".join(parts[:k])
            for cls, pattern in patterns:
                if prefix not in found and pattern.fullmatch(prefix):
                    found[prefix] = cls
    return sorted(found.items(), key=lambda kv: (kv[0].count("."), kv[0]))


def wrap_units(component: str, inventory: Inventory, extra_params: list | None = None) -> list[Unit]:
    """The units of `component`, root first, then in parameter order. `extra_params` adds tensors
    a method injects ((name, numel, trainable)), e.g. LoRA factors, to the unit around them."""
    blocks = _wrapped_prefixes(inventory)
    root = Unit(component, "", inventory.cls)
    units = {"": root}
    for path, cls in blocks:
        units[path] = Unit(component, path, cls)
    def owner(name: str) -> Unit:
        """The innermost unit around the parameter: its longest path that is a module of `name`."""
        parts = name.split(".")
        for k in range(len(parts) - 1, 0, -1):
            found = units.get(".".join(parts[:k]))
            if found is not None:
                return found
        return root

    for name, count in _in_module_order(inventory, extra_params or ()):
        owner(name).params.append((name, count))
    for name, count, trainable in extra_params or ():
        if trainable:
            owner(name).trainable_numel += count
    # execution order is unknown without the graph; keep the inventory's (module definition) order
    first_seen = {}
    for i, (name, _) in enumerate(inventory.params):
        first_seen.setdefault(owner(name).path, i)
    rest = sorted((u for p, u in units.items() if p and u.params), key=lambda u: first_seen.get(u.path, 1 << 60))
    return [root] + rest


def _in_module_order(inventory: Inventory, extra_params) -> list[tuple[str, int]]:
    """Parameters in `named_modules()` order, the order FSDP flattens them in: an injected tensor
    (peft's `to_q.lora_A.weight`) follows the parameters of the module it was injected into."""
    base = [(name, numel(shape)) for name, shape in inventory.params]
    after: dict[int, list] = {}
    modules = {name.rpartition(".")[0]: i for i, (name, _) in enumerate(base)}   # last index wins
    for name, count, _ in extra_params:
        parts = name.split(".")
        anchor = len(base) - 1
        for k in range(len(parts) - 1, 0, -1):
            if ".".join(parts[:k]) in modules:
                anchor = modules[".".join(parts[:k])]
                break
        after.setdefault(anchor, []).append((name, count))
    out = []
    for i, item in enumerate(base):
        out.append(item)
        out.extend(after.get(i, ()))
    return out


class UnitIndex:
    """Which unit a module path (component-prefixed, as in the timeline's records) belongs to."""

    def __init__(self, units: list[Unit]):
        self.units = units
        self._by_path = {u.full_path: u for u in units}
        self._memo: dict[str, Unit | None] = {}
        self._enclosing: dict[str, list[Unit]] = {}

    def innermost(self, module: str) -> Unit | None:
        """The deepest unit holding `module`; None outside every unit's component."""
        if module in self._memo:
            return self._memo[module]
        found = None
        parts = module.split(".")
        for k in range(len(parts), 0, -1):
            found = self._by_path.get(".".join(parts[:k]))
            if found is not None:
                break
        self._memo[module] = found
        return found

    def enclosing(self, module: str) -> list[Unit]:
        """Every unit holding `module`, outermost first (the root, then nested blocks). Memoized:
        asked for every record of every candidate of a several-GPU fit (callers do not mutate it)."""
        found = self._enclosing.get(module)
        if found is None:
            parts = module.split(".")
            found = [self._by_path[p] for p in (".".join(parts[:k]) for k in range(1, len(parts) + 1))
                     if p in self._by_path]
            self._enclosing[module] = found
        return found

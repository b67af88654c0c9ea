"""Build a model component from its config: on the meta device, fake, random or from disk.

Memory does not depend on weight values, so simulate (fake tensors) and profile (random weights)
build from the same config the inventory was made from; train loads real weights from a folder.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

from vramplan.errors import UsageError
from vramplan.models.catalog import Component, ModelInfo

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "models" / "configs"


def component_config(model: ModelInfo, component: Component) -> dict:
    local = getattr(model, "local_path", None)
    if local:
        folder = Path(local) / component.name
        path = folder / "config.json"
        if path.exists():
            return json.loads(path.read_text())
    path = CONFIG_ROOT / (getattr(model, "base_model", None) or model.key) / f"{component.name}.json"
    if not path.exists():
        raise UsageError(f"no config for {model.key}/{component.name} ({path})")
    return json.loads(path.read_text())


class _NotTheImageProcessors:
    """Drops transformers' notice that an image processor falls back to PIL without torchvision:
    no step uses an image processor, and the notice lands in the middle of train's progress."""

    def filter(self, record) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


class _CastNoticeOnce:
    """bitsandbytes logs "MatMul8bitLt: inputs will be cast from torch.float32 to float16" at every
    int8 matmul that autocast left in fp32 (1520 lines in a 10-step SD 1.5 run on an H200): the
    cast is the step's, counted by the estimate, and said once."""

    def __init__(self):
        self.seen: set[str] = set()

    def filter(self, record) -> bool:
        message = record.getMessage()
        if not message.startswith("MatMul8bitLt: inputs will be cast"):
            return True
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


@lru_cache(maxsize=1)
def quiet_libraries() -> None:
    """Train draws its own progress (rich): diffusers' and transformers' tqdm bars ("Loading
    weights", pipeline components) are switched off, their warnings kept, but for one notice
    and a repeated one."""
    import logging

    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers.utils.import_utils").addFilter(_NotTheImageProcessors())
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_CastNoticeOnce())


@lru_cache(maxsize=None)
def _class(library: str, name: str):
    if library == "diffusers":
        import diffusers

        return getattr(diffusers, name)
    import transformers

    return getattr(transformers, name)


def build_component(model: ModelInfo, component: Component, device: str | torch.device = "meta",
                    dtype: torch.dtype | None = None, attention: str = "sdpa") -> torch.nn.Module:
    """Instantiate `component` from its config on `device` (weights random, or none on meta)."""
    config = component_config(model, component)
    cls = _class(component.library, component.cls)
    with torch.device(device):
        if component.library == "diffusers":
            module = cls.from_config(config)
        else:
            config_cls = cls.config_class
            cfg = config_cls(**{k: v for k, v in config.items() if not k.startswith("_")})
            # transformers picks the attention kernel from the config: sdpa, or "eager" which
            # materialises the attention matrix.
            cfg._attn_implementation = "eager" if attention == "eager" else "sdpa"
            module = cls(cfg)
    if dtype is not None:
        module = module.to(dtype)
    return module


def load_component(folder: Path, component: Component, dtype: torch.dtype | None = None,
                   attention: str = "sdpa") -> torch.nn.Module:
    """Real weights from a local diffusers pipeline folder (train)."""
    cls = _class(component.library, component.cls)
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    if component.library == "transformers":
        kwargs["attn_implementation"] = "eager" if attention == "eager" else "sdpa"
    return cls.from_pretrained(folder, subfolder=component.name, local_files_only=True, **kwargs)

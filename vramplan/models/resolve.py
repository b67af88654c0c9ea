"""`--model` as users write it: a catalog key or alias, a diffusers folder, or a .safetensors file."""

from __future__ import annotations

from pathlib import Path

from vramplan.errors import UsageError
from vramplan.models.catalog import MODELS, ModelInfo, find_model


def resolve_model(text) -> ModelInfo:
    if isinstance(text, ModelInfo):
        return text
    info = find_model(str(text))
    if info is not None:
        return info
    path = Path(str(text)).expanduser()
    if path.exists():
        from vramplan.models.local import local_model_info

        return local_model_info(path)
    raise UsageError(f"--model: unknown model {text!r}: choose from {', '.join(MODELS)} "
                     f"or give a diffusers folder or a .safetensors checkpoint")

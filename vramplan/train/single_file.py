"""Train from a single-file checkpoint: the original (LDM / A1111) `.safetensors` of an SD 1.x,
SD 2.x or SDXL model, converted once into a diffusers folder by diffusers' own single-file loader
(`from_single_file`) and kept in the cache, so the rest of `train` reads a folder as it always does.

A single file holds weights only. The components' configs and the tokenizers come from
`--checkpoint-config DIR` (a diffusers folder of the same model: only its configs and tokenizers
are read), else from the catalog's configs of the architecture the file holds, with the
tokenizers of the catalog's repository found in the Hugging Face cache (never downloaded).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from vramplan.errors import UsageError


def converted_folder(path: Path, checkpoint_config: Path | None = None, say=print) -> Path:
    """The diffusers folder of the checkpoint `path`, converted now or found in the cache."""
    from vramplan.cache import cache_root
    from vramplan.models.catalog import MODELS
    from vramplan.models.checkpoint import read_safetensors_header, recognise_checkpoint

    path = Path(path)
    if path.suffix != ".safetensors":
        raise UsageError(f"--model: {str(path)!r} is a file but not a .safetensors checkpoint: give a "
                         f"diffusers folder or an original-layout .safetensors file")
    try:
        layout = recognise_checkpoint(read_safetensors_header(path))
    except UsageError as error:
        raise UsageError(f"--model: {error}") from None
    model = MODELS[layout.catalog_key]
    needed = [c.name for c in model.components]
    missing = [c for c in needed if c not in layout.components]
    if layout.layout != "ldm" or missing:
        raise UsageError(f"--model: {str(path)!r} is {layout.description} holding only "
                         f"{', '.join(layout.components)}: train needs the whole model "
                         f"({', '.join(needed)}): give its diffusers folder or a full single-file checkpoint")
    if checkpoint_config is not None and not (Path(checkpoint_config) / "model_index.json").is_file():
        raise UsageError(f"--checkpoint-config: {str(checkpoint_config)!r} is not a diffusers pipeline folder "
                         f"(no model_index.json)")
    stat = path.stat()
    key = json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns,
                      str(Path(checkpoint_config).resolve()) if checkpoint_config else None])
    target = cache_root() / "converted" / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (target / "model_index.json").is_file():
        say(f"{path.name}: converted before, reading {target}")
        return target
    say(f"{path.name}: {layout.description}; converting it once into a diffusers folder at {target}")
    import diffusers

    from vramplan.simulate.variants import DTYPES
    from vramplan.train.save import PIPELINES

    pipeline = getattr(diffusers, PIPELINES[layout.family])
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        with tempfile.TemporaryDirectory() as scratch:
            config = Path(checkpoint_config) if checkpoint_config else catalog_config(model, Path(scratch))
            pipe = pipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                             torch_dtype=DTYPES[layout.dtype])
            pipe.save_pretrained(staging, safe_serialization=True)
            del pipe
        if target.exists():          # another process converted it meanwhile
            shutil.rmtree(staging)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def catalog_config(model, folder: Path) -> Path:
    """A configs-only diffusers folder for `model`: the catalog's component configs, the training
    scheduler, and the tokenizers from the Hugging Face cache."""
    import diffusers
    from transformers import CLIPTokenizer

    from vramplan.step.loading import component_config
    from vramplan.train.save import PIPELINES

    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": PIPELINES[model.family], "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", "DDPMScheduler"]}
    for component in model.components:
        (folder / component.name).mkdir()
        config = component_config(model, component)
        (folder / component.name / "config.json").write_text(json.dumps(config))
        index[component.name] = [component.library, component.cls]
    from huggingface_hub import try_to_load_from_cache

    for encoder in model.text_encoders:
        name = encoder.name.replace("text_encoder", "tokenizer")
        # asked file by file: transformers 5 gives an empty tokenizer, not an error, for files it lacks
        def cached(file, name=name):
            found = try_to_load_from_cache(model.repo, f"{name}/{file}")
            return found if isinstance(found, str) else None

        config = cached("tokenizer_config.json")
        if not (config and (cached("tokenizer.json") or (cached("vocab.json") and cached("merges.txt")))):
            raise UsageError(f"a single-file checkpoint holds no tokenizer, and the Hugging Face cache has no "
                             f"{model.repo}/{name}: give --checkpoint-config FOLDER, a diffusers folder of "
                             f"the same model (only its configs and tokenizers are read)")
        CLIPTokenizer.from_pretrained(Path(config).parent).save_pretrained(folder / name)
        index[name] = ["transformers", "CLIPTokenizer"]
    if model.family == "sd1":
        index.update(safety_checker=[None, None], feature_extractor=[None, None])
    (folder / "scheduler").mkdir()
    from vramplan.step.families import SD_SCHEDULER

    scheduler = dict(SD_SCHEDULER, prediction_type=model.prediction)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder

"""Graphs for a local diffusers folder: recorded on first use, then cached.

Catalog models ship their graphs; a local folder's architecture is only known from its configs,
so the first estimate of a graph records it (this needs torch and takes seconds) and caches it
under `${VRAMPLAN_CACHE:-~/.cache/vramplan}/traces/<hash of the folder's configs>/`. Later
estimates read the cache without importing torch.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

from vramplan import cache
from vramplan.estimate.graph import Graph, parse_graph
from vramplan.models.catalog import ModelInfo


def cache_root() -> Path:
    return cache.cache_root() / "traces"


def _folder_key(model: ModelInfo) -> str:
    digest = hashlib.sha256()
    root = Path(model.local_path)
    for comp in model.components:
        path = root / comp.name / "config.json"
        digest.update(comp.name.encode())
        if path.exists():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def local_graph(model: ModelInfo, name: str) -> Graph:
    folder = cache_root() / _folder_key(model)
    path = folder / f"{name}.json.gz"
    if not path.exists():
        data = _record(model, name)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with gzip.open(tmp, "wt") as f:
            json.dump(data, f, separators=(",", ":"))
        tmp.replace(path)
    with gzip.open(path, "rt") as f:
        return parse_graph(json.load(f))


def _record(model: ModelInfo, name: str) -> dict:
    import gc

    from vramplan.simulate import record_model as rm

    component, variant, attention = name.split(".", 2)
    gc.collect()
    gc.disable()
    try:
        if component == model.denoiser.name:
            graph = rm.record_denoiser(model, variant, attention)
        elif component == "vae":
            graph = rm.record_vae_encode(model, variant, attention)
        else:
            ti = "-ti" in variant
            graph = rm.record_text_encoder(model, component, variant.replace("-ti", ""), attention, ti)
    finally:
        gc.enable()
    return graph.to_json()

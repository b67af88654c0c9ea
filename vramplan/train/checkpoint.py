"""Checkpoints a killed run resumes from, written so that a kill never leaves a half one.

A checkpoint is a folder `checkpoint-<step>/` in the run folder holding
  trainable.safetensors   every trained tensor, keyed "<component>.<parameter name>"
  optimizer.pt            the optimizer's state_dict (and the GradScaler's, EMA's if any)
  rng.pt                  torch (CPU and CUDA), Python and NumPy random states
  state.json              {"format", "step", "plan"}
It is written into a hidden temporary folder beside it, every file flushed to disk, and renamed
into place (a rename is atomic on one file system); the run folder is synced after. Resume takes
the highest complete `checkpoint-<step>`; temporary leftovers of a killed write are removed.
The data order follows from the step number (vramplan.train.data), so nothing else is needed.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

FORMAT = 1
PATTERN = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def trained_tensors(models: dict) -> dict:
    """"component.parameter" -> tensor, for every parameter that trains."""
    out = {}
    for component, module in models.items():
        for name, param in module.named_parameters():
            if param.requires_grad:
                out[f"{component}.{name}"] = param
    return out


def rng_state() -> dict:
    import numpy as np
    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(run: Path, step: int, built, plan: dict) -> Path:
    import torch
    from safetensors.torch import save_file

    final = run / f"checkpoint-{step}"
    tmp = run / f"{TMP_PREFIX}checkpoint-{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in trained_tensors(built.models).items()}
    save_file(tensors, str(tmp / "trainable.safetensors"), metadata={"format": "pt"})
    states = {"optimizer": built.optimizer.state_dict()}
    if built.scaler is not None:
        states["scaler"] = built.scaler.state_dict()
    if built.ema is not None:
        states["ema"] = built.ema.state_dict()
    torch.save(states, tmp / "optimizer.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"format": FORMAT, "step": step, "plan": plan}, indent=2))
    for name in ("trainable.safetensors", "optimizer.pt", "rng.pt", "state.json"):
        _fsync_file(tmp / name)
    fsync_dir(tmp)
    if final.exists():  # a rerun of the same step after --resume: replace it
        old = run / f"{TMP_PREFIX}old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    fsync_dir(run)
    return final


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    out = []
    if not run.is_dir():
        return out
    for entry in run.iterdir():
        match = PATTERN.match(entry.name)
        if match and entry.is_dir() and (entry / "state.json").is_file():
            out.append((int(match.group(1)), entry))
    return sorted(out)


def remove_leftovers(run: Path) -> None:
    """Temporary folders of a write that a kill interrupted."""
    if run.is_dir():
        for entry in run.iterdir():
            if entry.name.startswith(TMP_PREFIX):
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def prune(run: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints (0: keep all)."""
    if keep <= 0:
        return
    for _, path in checkpoints(run)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: Path, built) -> int:
    """Restore trained tensors, optimizer (scaler, EMA) and RNG; returns the step it was taken at."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(path / "trainable.safetensors"))
    params = trained_tensors(built.models)
    missing = set(params) - set(tensors)
    extra = set(tensors) - set(params)
    if missing or extra:
        from vramplan.errors import UsageError

        raise UsageError(f"--resume: {path} does not hold this plan's trained tensors "
                         f"({len(missing)} missing, {len(extra)} unexpected)")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name].to(param.device, param.dtype))
    states = torch.load(path / "optimizer.pt", map_location=built.torch_device, weights_only=False)
    built.optimizer.load_state_dict(states["optimizer"])
    if built.scaler is not None and "scaler" in states:
        built.scaler.load_state_dict(states["scaler"])
    if built.ema is not None and "ema" in states:
        built.ema.load_state_dict(states["ema"])
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "state.json").read_text())["step"]

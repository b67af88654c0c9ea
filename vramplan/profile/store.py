"""The profile store: one JSON file per (GPU, spec), `ROOT/<gpu>/<spec key>.json`.

`<gpu>` is the catalog key of the card (`h100`, `rtx4090`), a slug of its name for a card the
catalog lacks, or `cpu`. `<spec key>` is a readable slug of the spec followed by a short hash of
its JSON (without `gpu`, which the folder already says), so the same spec always lands on the same
file and two specs never share one. Files are written atomically (a temporary file in the same
folder, then `os.replace`): a campaign killed mid-write leaves the old file or none, never half
of one. Reading never crashes on a bad file: it is named in the problems list and skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vramplan.errors import UsageError
from vramplan.profile.result import Profile, slugify

DEFAULT_ROOT = Path("profiles")
HASH_CHARS = 8


class ProfileExists(UsageError):
    """A profile for this (GPU, spec) is stored already and --force was not given."""


@dataclass(frozen=True)
class StoredProfile:
    path: Path
    profile: Profile

    @property
    def key(self) -> str:
        return self.path.stem


def canonical_spec(spec_json: dict) -> dict:
    """The spec as the key sees it: without the card (the folder names it)."""
    return {k: v for k, v in spec_json.items() if k != "gpu"}


def spec_key(spec_json: dict) -> str:
    """"sd15-lora-r16-fp16-b1-512-1f3a9c2e": what a reader needs to know the case, then a hash
    of the whole spec so that specs differing in a knob the slug leaves out stay apart."""
    canonical = canonical_spec(spec_json)
    digest = hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":"))
                            .encode()).hexdigest()[:HASH_CHARS]
    return f"{spec_slug(canonical)}-{digest}"


def spec_slug(spec: dict) -> str:
    model = str(spec.get("model", "model"))
    if "/" in model or os.sep in model:
        model = Path(model).name or "model"     # a local folder or checkpoint: its name
    parts = [model, str(spec.get("method", ""))]
    if spec.get("rank") is not None:
        parts.append(f"r{spec['rank']}")
    parts.append(str(spec.get("precision", "")))
    if spec.get("base_quant") not in (None, "none"):
        parts.append(str(spec["base_quant"]))
    if spec.get("optimizer") not in (None, "adamw"):
        parts.append(str(spec["optimizer"]))
    parts.append(f"b{spec.get('batch_size', 1)}")
    resolution = spec.get("resolution")
    if isinstance(resolution, (list, tuple)) and len(resolution) == 2:
        parts.append(str(resolution[0]) if resolution[0] == resolution[1]
                     else f"{resolution[0]}x{resolution[1]}")
    for flag, short in (("gradient_checkpointing", "gc"), ("train_text_encoder", "te"),
                        ("cache_latents", "cl"), ("cache_text_embeddings", "ct"), ("ema", "ema")):
        if spec.get(flag):
            parts.append(short)
    if spec.get("attention") not in (None, "sdpa"):
        parts.append(str(spec["attention"]))
    return slugify("-".join(parts))


def profile_path(root: Path | str, profile: Profile) -> Path:
    return Path(root) / profile.gpu_key / f"{spec_key(profile.spec)}.json"


def save_profile(profile: Profile, root: Path | str = DEFAULT_ROOT, force: bool = False) -> Path:
    """Write `profile` under `root`; refuses to replace a stored one unless `force`."""
    path = profile_path(root, profile)
    if path.exists() and not force:
        raise ProfileExists(f"{path} exists: --force measures again and replaces it")
    write_json_atomic(path, profile.to_json())
    return path


def write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            json.dump(data, out, indent=2)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)   # mkstemp makes it 0600; give what open() would
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def load_profiles(root: Path | str = DEFAULT_ROOT) -> tuple[list[StoredProfile], list[str]]:
    """Every profile under `root` (`<gpu>/<key>.json`), sorted by path, and one line per file
    that could not be read as one (its path and why). A missing root is a problem, not an error."""
    root = Path(root)
    if not root.is_dir():
        return [], [f"{root}: no such folder (vramplan profile writes there)"]
    profiles, problems = [], []
    for path in sorted(root.glob("*/*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError) as error:
            problems.append(f"{path}: cannot read it: {error}")
            continue
        except json.JSONDecodeError as error:
            problems.append(f"{path}: not valid JSON ({error.msg} at line {error.lineno}), skipped")
            continue
        try:
            profile = Profile.from_json(data)
        except UsageError as error:
            problems.append(f"{path}: {error}, skipped")
            continue
        profiles.append(StoredProfile(path, profile))
    return profiles, problems

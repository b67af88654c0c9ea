"""The safety margin fit keeps below the card: the estimator's measured error band.

When CUDA profiles are stored (`profiles/` beside the package, or in the working folder, where
`vramplan profile` writes them), the band is what `vramplan validate` measures for device used:
the largest relative error of the analytic estimate against those runs. validate re-estimates
every profile, so the band is cached under `${VRAMPLAN_CACHE:-~/.cache/vramplan}/fit-margin/`,
keyed by the profile files (names, sizes, modification times): fit pays it once per change.
Without CUDA profiles the margin is DEFAULT_MARGIN, 3%: the tolerance the estimate is held to
against the fake-tensor simulation of the same step (issue 3), the only band measured so far.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MARGIN = 0.03
DEFAULT_SOURCE = ("default 3%: the estimate-vs-simulate tolerance; no CUDA profiles measured yet "
                  "(vramplan profile, vramplan validate)")
PACKAGE_PROFILES = Path(__file__).resolve().parents[2] / "profiles"


@dataclass(frozen=True)
class SafetyMargin:
    fraction: float     # a plan's device use times (1 + fraction) must be within the card
    source: str

    def required(self, nbytes: int) -> int:
        """Bytes a plan must have on the card: what it uses plus the margin."""
        return math.ceil(nbytes * (1 + self.fraction))

    def describe(self) -> str:
        return f"{100 * self.fraction:g}% ({self.source})"


def _profile_roots() -> list[Path]:
    roots = []
    for root in (PACKAGE_PROFILES, Path.cwd() / "profiles"):
        if root.is_dir() and root.resolve() not in [r.resolve() for r in roots]:
            roots.append(root)
    return roots


def _cuda_files(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*/*.json") if p.parent.name != "cpu")


def _cache_file(files: list[Path]) -> Path:
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    base = Path(os.environ.get("VRAMPLAN_CACHE", "~/.cache/vramplan")).expanduser()
    return base / "fit-margin" / f"{digest.hexdigest()[:16]}.json"


def measured_band(root: Path) -> float | None:
    """The largest |error| of the estimate's device used over the CUDA profiles under root."""
    files = _cuda_files(root)
    if not files:
        return None
    cache = _cache_file(files)
    if cache.is_file():
        try:
            return json.loads(cache.read_text())["band"]
        except (OSError, ValueError, KeyError):
            pass
    try:
        from vramplan.profile.validate import Metric, validate
    except ImportError:
        return None
    result = validate(root, simulate=False)
    rows = [r for r in result.summary if r.device == "cuda" and r.source == "estimate"
            and r.metric is Metric.DEVICE_USED]
    band = rows[0].max_abs_error if rows else None
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"band": band, "profiles": len(files)}))
    except OSError:
        pass
    return band


def safety_margin(override: float | None = None, roots: list[Path] | None = None) -> SafetyMargin:
    if override is not None:
        return SafetyMargin(override, "--margin")
    for root in (_profile_roots() if roots is None else roots):
        try:
            band = measured_band(root)
        except Exception:  # a broken store must not stop fit; validate names such files itself
            band = None
        if band is not None and 0 <= band < 1:
            count = len(_cuda_files(root))
            return SafetyMargin(band, f"the estimate's largest device-used error over {count} CUDA "
                                      f"profile(s) in {root} (vramplan validate)")
    return SafetyMargin(DEFAULT_MARGIN, DEFAULT_SOURCE)

"""The safety margin fit keeps below the card: the estimator's measured error band.

When CUDA profiles of the card being fitted are stored (`profiles/<card>/` beside the package,
or in the working folder, where `vramplan profile` writes them), the band is what `vramplan
validate` measures for device used: the largest relative error of the analytic estimate against
those runs. Only that card's: the CUDA context and cuDNN's choices differ between cards, so an
H200's 0.8% says little of an RTX 4060. validate re-estimates every profile, so the band is cached
under `${VRAMPLAN_CACHE:-~/.cache/vramplan}/fit-margin/`, keyed by the profile files (names,
sizes, modification times): fit pays it once per change. For a card without CUDA profiles the
margin is DEFAULT_MARGIN, 3%: the tolerance the estimate is held to against the fake-tensor
simulation of the same step (issue 3).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from vramplan.cache import cache_root, write_atomic

DEFAULT_MARGIN = 0.03
DEFAULT_SOURCE = ("default 3%: the estimate-vs-simulate tolerance; no CUDA profiles of this card "
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


def _cuda_files(root: Path, card: str) -> list[Path]:
    return sorted((root / card).glob("*.json")) if card != "cpu" else []


def _cache_file(files: list[Path]) -> Path:
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return cache_root() / "fit-margin" / f"{digest.hexdigest()[:16]}.json"


def measured_band(root: Path, card: str) -> tuple[float | None, int]:
    """The largest |error| of the estimate's device used over the CUDA profiles of `card` in the
    store `root`, and how many profiles had a device-used reading (train's have none)."""
    files = _cuda_files(root, card)
    if not files:
        return None, 0
    cache = _cache_file(files)
    if cache.is_file():
        try:
            data = json.loads(cache.read_text())
            return data["band"], data["cases"]
        except (OSError, ValueError, KeyError):
            pass
    try:
        from vramplan.profile.validate import Metric, validate
    except ImportError:
        return None, 0
    result = validate(root, simulate=False, card=card)
    rows = [r for r in result.summary if r.device == "cuda" and r.source == "estimate"
            and r.metric is Metric.DEVICE_USED]
    band, cases = (rows[0].max_abs_error, rows[0].count) if rows else (None, 0)
    # unwritable: made again next time
    write_atomic(cache, json.dumps({"band": band, "cases": cases, "profiles": len(files)}).encode())
    return band, cases


def safety_margin(override: float | None = None, roots: list[Path] | None = None,
                  card: str | None = None) -> SafetyMargin:
    """`card`: the catalog key of the card fitted (None, or a size like "8GB": no profiles)."""
    if override is not None:
        return SafetyMargin(override, "--margin")
    if not card or card == "cpu":
        return SafetyMargin(DEFAULT_MARGIN, DEFAULT_SOURCE)
    for root in (_profile_roots() if roots is None else roots):
        if not (root / card).is_dir():
            continue
        try:
            band, count = measured_band(root, card)
        except Exception:  # a broken store must not stop fit; validate names such files itself
            band = None
        if band is not None and 0 <= band < 1:
            return SafetyMargin(band, f"the estimate's largest device-used error over {count} CUDA "
                                      f"profile(s) in {root / card} (vramplan validate)")
    return SafetyMargin(DEFAULT_MARGIN, DEFAULT_SOURCE)

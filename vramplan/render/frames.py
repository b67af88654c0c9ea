"""Tables of numbers for export: pandas DataFrames of estimates and footprints, written as CSV.

One row per estimate (or per measured footprint), sizes in bytes as ints, so a spreadsheet or a
notebook gets exact figures. pandas is imported inside the functions: the CLI's estimate path never
pays for it. Files are written atomically (a temporary file in the same folder, then `os.replace`).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from vramplan.estimate.result import Estimate
from vramplan.footprint import Category, Footprint
from vramplan.render.tables import spec_values, varied_fields

TOTAL_COLUMNS = ("peak_allocated_bytes", "peak_reserved_bytes", "device_used_bytes")


def category_column(category: Category) -> str:
    return f"{category.value}_bytes"


def footprint_columns(footprint: Footprint) -> dict:
    """Every category in bytes (0 where absent, so columns stay the same), then the totals."""
    row = {category_column(c): footprint.category_bytes(c) for c in Category}
    for name in TOTAL_COLUMNS:
        row[name] = int(getattr(footprint, name))
    return row


def _labelled(items) -> list[tuple[str | None, object]]:
    if isinstance(items, (Estimate, Footprint)):
        return [(None, items)]
    if isinstance(items, dict):
        return list(items.items())
    out = []
    for item in items:
        out.append((None, item) if isinstance(item, (Estimate, Footprint)) else tuple(item))
    return out


def estimates_frame(estimates, spec_fields="varied"):
    """One row per estimate: its spec fields, each category in bytes, the totals, fits, headroom.

    `estimates`: a list of `Estimate` or of `(label, Estimate)`; labels become a first `label`
    column. `spec_fields`: "varied" (the fields that differ between the estimates: all of them
    when there is only one), "all", or a list of field names. The GPU is always named, since
    fits and headroom depend on it.
    """
    import pandas as pd

    items = _labelled(estimates)
    specs = [e.spec for _, e in items]
    if spec_fields == "all" or (spec_fields == "varied" and len(items) < 2):
        fields = list(spec_values(specs[0])) if specs else []
    elif spec_fields == "varied":
        fields = varied_fields(specs)
    else:
        fields = list(spec_fields)
    if "gpu" not in fields:
        fields.append("gpu")

    rows = []
    for label, estimate in items:
        values = spec_values(estimate.spec)
        row = {} if label is None else {"label": label}
        row.update({name: values[name] for name in fields})
        row["gpu_memory_bytes"] = None if estimate.gpu is None else estimate.gpu.memory_bytes
        row.update(footprint_columns(estimate.footprint))
        row["fits"] = estimate.fits
        row["headroom_bytes"] = estimate.headroom_bytes
        row["source"] = estimate.footprint.source
        rows.append(row)
    return pd.DataFrame(rows)


def footprints_frame(footprints):
    """One row per labelled footprint (estimate, simulation, measurement of the same run...).

    `footprints`: a dict label -> Footprint, or a list of `(label, Footprint)`.
    """
    import pandas as pd

    rows = []
    for label, footprint in _labelled(footprints):
        row = {"label": label, "source": footprint.source, "peak_phase": footprint.peak_phase}
        row.update(footprint_columns(footprint))
        rows.append(row)
    return pd.DataFrame(rows)


@contextmanager
def atomic_output(path):
    """Yield a temporary path beside `path`; on success move it onto `path`, else delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temp)
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_csv(frame, path) -> Path:
    """Write `frame` to `path` as CSV (no index), atomically. Returns the path."""
    path = Path(path)
    with atomic_output(path) as temp:
        frame.to_csv(temp, index=False)
    return path

"""Where vramplan keeps what it builds once and reads back later: `${VRAMPLAN_CACHE:-~/.cache/vramplan}`.

Under it, one folder per kind: `native/` (the C library), `compiled-traces/` (the catalog's
graphs, parsed and compiled), `traces/` and `inventories/` (a local folder's, recorded once),
`fit-margin/` (the error band measured from profiles). Each entry is named by a digest of what
it was made from, so a stale entry is never read; it is written atomically (a temporary file in
the same folder, then `os.replace`), so a reader sees all of it or none; and an unwritable cache
only costs making the entry again next time.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("VRAMPLAN_CACHE") or "~/.cache/vramplan").expanduser()


def write_atomic(path: Path, data: bytes) -> bool:
    """Write `data` to `path` all at once; False (and nothing written) where that cannot be done."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=path.parent)
    except OSError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return True
    except OSError:
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

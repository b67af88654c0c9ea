"""`python -m vramplan.profile.worker --spec FILE --steps N --out FILE`: one CPU measurement.

`vramplan profile --device cpu` starts this with MALLOC_MMAP_THRESHOLD_=65536 in its environment,
which glibc only reads at start-up (see vramplan/profile/measure.py). Progress goes to stderr as
`vramplan-progress: ...` lines, the profile to --out; a bad spec exits 2 with the usual one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vramplan.errors import UsageError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vramplan.profile.worker")
    parser.add_argument("--spec", type=Path, required=True, help="TrainingSpec.to_json() as a file")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True, help="where to write the profile JSON")
    args = parser.parse_args(argv)

    from vramplan.profile.measure import PROGRESS_PREFIX, measure_cpu
    from vramplan.profile.store import write_json_atomic
    from vramplan.spec import spec_from_json

    def progress(message: str) -> None:
        print(PROGRESS_PREFIX + message, file=sys.stderr, flush=True)

    try:
        spec = spec_from_json(json.loads(args.spec.read_text()))
        result = measure_cpu(spec, args.steps, progress)
    except UsageError as error:
        print(f"vramplan: error: {error}", file=sys.stderr)
        return 2
    write_json_atomic(args.out, result.to_json())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Run the estimate-vs-simulate matrix and write the per-case error table.

    python scripts/accuracy_matrix.py            # the CI subset
    python scripts/accuracy_matrix.py --full     # SD 1.5 and SDXL x methods x precisions x GC x batch
    python scripts/accuracy_matrix.py --full --out docs/accuracy/simulate-vs-estimate.md
    python scripts/accuracy_matrix.py --others   # FLUX.1-dev, SD 3.5 medium and large, SD 2.1

Each row: the case, simulate's and estimate's peak allocated (GiB), the relative error, the same
for peak reserved, and both tiers' run times.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vramplan.simulate.accuracy import (CLOSE, MATRIX_CI, TOLERANCE, compare, full_matrix,  # noqa: E402
                                       other_models_matrix)

GIB = 2 ** 30


def describe(case: dict) -> str:
    return " ".join(f"{k}={v}" if v is not True else k for k, v in case.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--others", action="store_true", help="the other catalog models' matrix")
    parser.add_argument("--only", default="", help="run cases whose description contains this text")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    cases = full_matrix() if args.full else other_models_matrix() if args.others else MATRIX_CI
    cases = [c for c in cases if args.only in describe(c)]
    lines = ["| case | simulate GiB | estimate GiB | error | reserved error | simulate s | estimate s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    worst, failures, errors = 0.0, 0, []
    for case in cases:
        try:
            r = compare(case)
        except Exception as exc:  # report and go on: one broken case must not hide the others
            print(f"FAILED {describe(case)}: {type(exc).__name__}: {exc}", flush=True)
            failures += 1
            continue
        errors.append(abs(r.error))
        worst = max(worst, abs(r.error))
        failures += abs(r.error) > TOLERANCE
        line = (f"| {describe(case)} | {r.simulated / GIB:.3f} | {r.estimated / GIB:.3f} | "
                f"{100 * r.error:+.2f}% | {100 * r.reserved_error:+.2f}% | {r.simulate_seconds:.1f} | "
                f"{r.estimate_seconds:.2f} |")
        print(line, flush=True)
        lines.append(line)
    errors.sort()
    median = errors[len(errors) // 2] if errors else 0.0
    summary = (f"{len(errors)} cases: median |error| {100 * median:.2f}%, max {100 * worst:.2f}%, "
               f"{failures} over the {100 * TOLERANCE:.0f}% tolerance or failed, "
               f"{sum(e > CLOSE for e in errors)} past {100 * CLOSE:.1f}%")
    print(summary)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines + ["", summary, ""]))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

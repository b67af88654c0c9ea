"""How fast does `vramplan estimate` answer, cold, next to `python -c "import torch"`?

    python scripts/benchmark_estimate.py [--runs 5]

Runs each command in a fresh interpreter `--runs` times and reports the median wall time and the
ratio to importing torch on the same machine (the issue's target: at most 1/3).

"Cold" means a fresh interpreter, as a user typing the command gets, not a first-ever run: both
commands run once untimed first and with bytecode caching on (PYTHONDONTWRITEBYTECODE removed from
the children's environment), so vramplan's modules load from __pycache__ as torch's installed
modules do. With caching off, vramplan compiles its ~100 modules from source on every run
(about 0.1 s here) while torch still loads its compiled ones, which is not the user's case.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import os
import sys
import time

CASES = [
    ["--method", "lora", "--rank", "128", "--gpu", "16GB"],
    ["--method", "full", "--precision", "fp32", "--gpu", "16GB"],
    ["--model", "sdxl", "--method", "lora", "--gpu", "24GB"],
    ["--model", "flux-dev", "--method", "lora", "--gpu", "h100"],
]


ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def timed(cmd: list[str], runs: int) -> float:
    subprocess.run(cmd, check=True, capture_output=True, env=ENV)   # writes the bytecode caches
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=ENV)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    torch_time = timed([sys.executable, "-c", "import torch"], args.runs)
    print(f"python -c 'import torch': {torch_time:.3f} s (median of {args.runs})")
    worst = 0.0
    for case in CASES:
        t = timed([sys.executable, "-m", "vramplan", "estimate", "--json", *case], args.runs)
        worst = max(worst, t / torch_time)
        print(f"vramplan estimate {' '.join(case):45s} {t:.3f} s = {t / torch_time:.2f} x import torch")
    print(f"worst ratio {worst:.2f} (target <= 0.33)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

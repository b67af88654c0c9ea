"""How long does `vramplan simulate` take for two training steps?

    python scripts/benchmark_simulate.py

Targets (issue 3, on the 2-core development machine): SD 1.5 within 10 s, SDXL within 30 s.
Times the library call (torch already imported), then a cold CLI run.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CASES = [({"method": "lora", "rank": 16}, 10), ({"method": "full", "precision": "fp16"}, 10),
         ({"model": "sdxl", "method": "lora", "gradient_checkpointing": True}, 30),
         ({"model": "sdxl", "method": "full", "precision": "bf16", "gradient_checkpointing": True}, 30)]


def main() -> int:
    import torch  # noqa: F401  (import cost is not the simulator's)

    from vramplan.simulate.run import simulate
    from vramplan.spec import build_spec

    for options, target in CASES:
        start = time.perf_counter()
        sim = simulate(build_spec(options))
        seconds = time.perf_counter() - start
        print(f"{str(options):75s} {seconds:6.1f} s (target {target} s) "
              f"peak {sim.footprint.peak_allocated_bytes / 2**30:.2f} GiB")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vramplan", "simulate", "--json", "--method", "lora"],
                   check=True, capture_output=True)
    print(f"cold CLI `vramplan simulate --method lora`: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

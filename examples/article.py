"""Reproduce the pictures of the article that started vramplan, with vramplan's own numbers.

    python examples/article.py [OUT]     # default OUT: docs/img

Writes, for Stable Diffusion 1.5 at 512x512 on a 16 GB card:
  * full-fp32.png   -- full fine-tune, fp32, AdamW
  * full-fp16.png   -- full fine-tune, fp16 mixed precision, AdamW
  * lora-128.png    -- LoRA rank 128, fp16 mixed precision, AdamW
  * grids.png       -- the three side by side
and prints (and writes lora-sizes.md) the LoRA file size per rank, 8 to 128, for the default
attention targets, as fp16 safetensors. Every figure comes from `vramplan.estimate`.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vramplan.estimate import estimate  # noqa: E402
from vramplan.render import write_grid_chart  # noqa: E402
from vramplan.spec import build_spec  # noqa: E402

CASES = {
    "full-fp32": {"method": "full", "precision": "fp32"},
    "full-fp16": {"method": "full", "precision": "fp16"},
    "lora-128": {"method": "lora", "rank": 128, "precision": "fp16"},
}


def main(argv=None) -> int:
    out = Path((argv or sys.argv[1:] or [str(ROOT / "docs" / "img")])[0])
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name, options in CASES.items():
        est = estimate(build_spec({"gpu": "16GB", **options}))
        write_grid_chart(est, out / f"{name}.png")
        results.append((name, est))
        fp = est.footprint
        print(f"{name:10s} peak allocated {fp.peak_allocated_bytes / 1e9:6.2f} GB, device used "
              f"{fp.device_used_bytes / 1e9:6.2f} GB: {'fits' if est.fits else 'does NOT fit'} on 16 GB")
    write_grid_chart(results, out / "grids.png")
    rows = ["| rank | trainable parameters | file (fp16 safetensors) |", "| ---: | ---: | ---: |"]
    for rank in (8, 16, 32, 64, 128):
        est = estimate(build_spec({"method": "lora", "rank": rank}))
        rows.append(f"| {rank} | {est.trainable_params:,} | {est.adapter_file_bytes / 2**20:.1f} MiB |")
    table = "\n".join(rows)
    print(table)
    (out / "lora-sizes.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Which CUDA allocations are alive that are no weight, buffer, gradient or optimizer state?

    python scripts/gpu_leftovers.py --out leftovers.json --model sdxl --method lora --precision bf16

The first campaign (profiles/h200) found more allocated after the model is built than the
weights and buffers the estimator counts (37 MiB for SD 1.5, 113 MiB for SDXL). This builds the
spec's step as `vramplan profile` does under `torch.cuda.memory._record_memory_history`, then
lists every live block that is none of the step's known tensors, with the Python frames that
allocated it: once after the build, once after two steps (then gradients, optimizer states and
the scaler's tensors count as known too).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SKIP = ("torch/nn/modules/module.py", "torch/utils/_contextlib.py", "torch/_dynamo")


def known_pointers(step, torch) -> set:
    tensors = []
    for module in step.models.values():
        tensors += list(module.parameters()) + list(module.buffers())
        tensors += [p.grad for p in module.parameters() if p.grad is not None]
    tensors += list(step.trainable) + [p.grad for p in step.trainable if p.grad is not None]
    for state in step.optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    if step.scaler is not None:
        tensors += [v for v in vars(step.scaler).values() if isinstance(v, torch.Tensor)]
    if step.ema is not None:
        tensors += list(step.ema.shadow_params)
    return {t.untyped_storage().data_ptr() for t in tensors if t.is_cuda}


def unknown_blocks(torch, known: set) -> list:
    out = []
    for segment in torch.cuda.memory._snapshot()["segments"]:
        for block in segment["blocks"]:
            if block["state"] != "active_allocated" or block["address"] in known:
                continue
            frames = [f"{f['filename'].split('site-packages/')[-1]}:{f['line']} {f['name']}"
                      for f in block.get("frames", []) if not any(s in f["filename"] for s in SKIP)][:8]
            out.append({"size": block["size"], "requested": block.get("requested_size"), "frames": frames})
    return out


def summary(blocks: list) -> list:
    by = Counter()
    count = Counter()
    for b in blocks:
        key = " <- ".join(b["frames"][:4]) or "(no Python frames)"
        by[key] += b["size"]
        count[key] += 1
    return [[round(v / 2**20, 2), count[k], k] for k, v in by.most_common(15)]


def main(argv=None) -> int:
    from vramplan.cli import add_spec_flags, given_options

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    add_spec_flags(parser)                 # the same spec flags as `vramplan profile`
    args = parser.parse_args(argv)

    import torch

    from vramplan.profile.measure import place_like_a_checkpoint
    from vramplan.spec import build_spec
    from vramplan.step.build import build_step

    spec = build_spec(given_options(args))
    torch.cuda.init()
    torch.cuda.memory._record_memory_history(max_entries=3_000_000, stacks="python")
    step = build_step(spec, "cuda")
    place_like_a_checkpoint(step, torch)
    torch.cuda.synchronize()
    after_build = unknown_blocks(torch, known_pointers(step, torch))
    allocated_build = torch.cuda.memory_allocated()
    for _ in range(2):
        batch = step.make_batch()
        step.run_step(batch)
        del batch
    torch.cuda.synchronize()
    after_steps = unknown_blocks(torch, known_pointers(step, torch))
    result = {"spec": spec.to_json(), "allocated_after_build": allocated_build,
              "allocated_after_steps": torch.cuda.memory_allocated(),
              "unknown_after_build_bytes": sum(b["size"] for b in after_build),
              "unknown_after_steps_bytes": sum(b["size"] for b in after_steps),
              "after_build": summary(after_build), "after_steps": summary(after_steps)}
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "spec"}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

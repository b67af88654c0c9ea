"""Every CUDA allocation of a few real training steps, for finding where a prediction goes wrong.

    python scripts/gpu_trace.py --out trace-sd15-lora.json.gz --model sd15 --method lora --precision fp16

Builds the spec's step exactly as `vramplan profile` does (`build_step` + `place_like_a_checkpoint`),
then runs `--steps` steps under `torch.cuda.memory._record_memory_history` (Python stacks) and
writes the allocator's trace compactly, gzip'd JSON:

    {"spec": ..., "environment": ..., "frames": ["file:line name", ...],
     "events": [[action, address, size, [frame indices]], ...],   # in the allocator's order
     "marks": [[phase, allocated, reserved, peak allocated since the mark before]]}

Actions are the snapshot's ("alloc", "free_requested", "free_completed", "segment_alloc",
"segment_free", ...). Frames are the innermost four outside torch.nn's call machinery, so an event
names the layer that made it; backward's allocations run on autograd's thread and have none.
Each phase mark is also one MARK_BYTES allocation in the trace (its frames name this file), so a
peak can be put in its phase and compared with the estimator's records for the same spec
(`vramplan.footprint_build`). Only for CUDA; scripts/gpu_campaign.sh runs it after the campaign.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from pathlib import Path

MARK_BYTES = 512 * 1021   # small pool (< 1 MiB), a size no layer of these models allocates
SKIP = ("torch/nn/modules/module.py", "torch/utils/_contextlib.py", "torch/_dynamo",
        "torch/autograd/function.py", "torch/utils/checkpoint.py")


def compact(snapshot: dict, keep_frames: int = 4) -> tuple[list, list]:
    """The snapshot's device-0 trace as (frame table, events)."""
    table: dict[str, int] = {}
    events = []
    traces = snapshot.get("device_traces") or [[]]
    for entry in traces[0]:
        frames = []
        for frame in entry.get("frames") or ():
            name = str(frame.get("filename", ""))
            if any(s in name for s in SKIP):
                continue
            short = name.split("site-packages/")[-1]
            text = f"{short}:{frame.get('line')} {frame.get('name')}"
            frames.append(table.setdefault(text, len(table)))
            if len(frames) == keep_frames:
                break
        events.append([entry.get("action"), int(entry.get("addr", 0)), int(entry.get("size", 0)), frames])
    return list(table), events


def main(argv: list[str] | None = None) -> int:
    from vramplan.cli import add_spec_flags, given_options

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-entries", type=int, default=2_000_000)
    add_spec_flags(parser)                 # the same spec flags as `vramplan profile`
    args = parser.parse_args(argv)

    import torch

    from vramplan.profile.measure import collect_environment, place_like_a_checkpoint
    from vramplan.spec import build_spec
    from vramplan.step.build import build_step

    spec = build_spec(given_options(args))
    torch.cuda.init()
    step = build_step(spec, "cuda")
    place_like_a_checkpoint(step, torch)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    memory = torch.cuda.memory
    memory._record_memory_history(max_entries=args.max_entries, stacks="python")
    marks = []

    def mark(phase: str) -> None:
        # The trace has no room for a label, so a mark is one allocation of MARK_BYTES made and
        # freed here: its frames name this file, and the n-th such event is the n-th mark.
        torch.cuda.synchronize()
        marks.append([phase, int(torch.cuda.memory_allocated()), int(torch.cuda.memory_reserved()),
                      int(torch.cuda.max_memory_allocated())])
        torch.cuda.reset_peak_memory_stats()
        torch.empty(MARK_BYTES, dtype=torch.uint8, device="cuda")   # made and freed at once

    for i in range(args.steps):
        prefix = "" if i == 0 else f"step {i + 1} "
        mark(prefix + "encode")
        batch = step.make_batch()
        step.run_step(batch, hook=lambda phase, prefix=prefix: mark(prefix + phase))
        del batch
    mark("end")
    snapshot = memory._snapshot()
    memory._record_memory_history(enabled=None)
    frames, events = compact(snapshot)
    result = {"spec": spec.to_json(), "environment": collect_environment(torch), "frames": frames,
              "events": events, "marks": marks, "steps": args.steps,
              "segments_at_end": [[s.get("address"), s.get("total_size"), s.get("allocated_size"),
                                   s.get("segment_type")] for s in snapshot.get("segments", [])]}
    tmp = args.out.with_name(args.out.name + ".tmp")
    with gzip.open(tmp, "wt") as f:
        json.dump(result, f)
    os.replace(tmp, args.out)
    print(f"{args.out}: {len(events)} events, {len(frames)} frames, "
          f"{args.out.stat().st_size / 2**20:.1f} MiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

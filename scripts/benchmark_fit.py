"""How long `vramplan fit` takes to search: the three cases issue 5 names, three on several GPUs,
and four more cards and models.

    python scripts/benchmark_fit.py [--repeat 3] [--json] [--case NAME] [--breakdown]

Each case is searched in a fresh process (what a user's `vramplan fit` pays: imports, the
catalog's traces read from disk -- compiled, from `${VRAMPLAN_CACHE}/compiled-traces/` after the
first run -- then the search) and again in the same process with the
estimate cache and the step's kept replays cleared (the search alone, traces already loaded).
Reported per case: wall time, estimates (candidates whose device used was counted: most by
`vramplan.fit.walk.estimated_device_used`, without the composition; the winner in whole),
candidates decided without one, the plans found, and the shares of the time spent inside those
estimates and inside the device floor (the step's records without the allocator's replay,
`vramplan.fit.walk.device_floor`). `--breakdown` adds, per
case, one more search timed part by part (each part's own time, nested parts taken out): where a
search goes, the figures the README's Speed section quotes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = {
    "sd15 lora 8GB": {"model": "sd15", "method": "lora", "gpu": "8GB"},
    "sdxl lora 8GB": {"model": "sdxl", "method": "lora", "gpu": "8GB"},
    "sd15 dreambooth 12GB": {"model": "sd15", "method": "dreambooth", "gpu": "12GB"},
    "sdxl full 4xrtx4090": {"model": "sdxl", "method": "full", "gpus": "4xrtx4090"},
    # several GPUs with adapters: every strategy, quantization and rank (FSDP widens what trains)
    "sdxl lora 2x8GB": {"model": "sdxl", "method": "lora", "gpus": "2x8GB"},
    "flux-dev lora 4xrtx4090": {"model": "flux-dev", "method": "lora", "gpus": "4xrtx4090"},
    # more cards and models, to show where the search's time goes up: how little fits
    "sdxl lora 12GB": {"model": "sdxl", "method": "lora", "gpu": "12GB"},
    "sdxl full 24GB": {"model": "sdxl", "method": "full", "gpu": "24GB"},
    "sdxl dreambooth 24GB": {"model": "sdxl", "method": "dreambooth", "gpu": "24GB"},
    "flux-dev lora 24GB": {"model": "flux-dev", "method": "lora", "gpu": "24GB"},
}

CHILD = r"""
import json, sys, time
start = time.perf_counter()
from vramplan.spec import build_spec
from vramplan.fit import fit_request, search
from vramplan.timeline import gc_paused
with gc_paused(freeze=True):          # as the CLI searches (vramplan.cli._searching)
    result = search(fit_request(build_spec(json.loads(sys.argv[1]))))
pending = [[]]                        # a collection the search left due runs here, and is counted
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "search_seconds": result.seconds,
                  "estimates": result.estimates, "fits": result.fits}))
"""


def cold(options: dict) -> dict:
    """One search in a fresh interpreter: imports and trace loading included."""
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(options)], check=True, capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def warm(options: dict) -> dict:
    """The search alone: traces loaded, the estimate cache and the kept replays empty; time
    inside estimate() and inside the device floor, measured around the search's own ones."""
    import vramplan.estimate.step as step
    import vramplan.fit.walk as walk
    from vramplan.fit import fit_request, search
    from vramplan.spec import build_spec
    from vramplan.timeline import gc_paused

    search(fit_request(build_spec(options)))          # load the model's traces once
    inside, floors = [], []

    def timed(function, seconds):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds.append(time.perf_counter() - start)
        return run

    real_estimator, real_floor, real_used = walk._default_estimator, walk.device_floor, walk.estimated_device_used
    walk._default_estimator = timed(real_estimator, inside)   # still the default: the floor is used
    walk.estimated_device_used = timed(real_used, inside)     # a candidate's estimate, decided alone
    walk.device_floor = timed(real_floor, floors)
    walk.clear_cache()
    step.clear_reuse()
    try:
        start = time.perf_counter()
        with gc_paused(freeze=True):              # as the CLI searches
            result = search(fit_request(build_spec(options)))
        seconds = time.perf_counter() - start
    finally:
        walk._default_estimator, walk.device_floor = real_estimator, real_floor
        walk.estimated_device_used = real_used
        walk.clear_cache()
        step.clear_reuse()
    return {"seconds": seconds, "estimates": result.estimates, "decided_free": result.decided_free,
            "in_estimate": sum(inside), "per_estimate": statistics.mean(inside) if inside else 0.0,
            "in_floor": sum(floors), "floors": len(floors),
            "plans": [" ".join(p.labels) for p in result.plans], "fits": result.fits,
            "notes": list(result.notes)}


# (module, attribute, label): the parts of a search, timed apart by --breakdown
PARTS = [
    ("vramplan.estimate.replay", "Replayer.forward", "graph replay, forward"),
    ("vramplan.estimate.replay", "Replayer.backward", "graph replay, backward"),
    ("vramplan.estimate.native_replay", "replay", "graph replay in C, and its rows"),
    ("vramplan.estimate.native_replay", "_Structure.__init__", "graph structures for C"),
    ("vramplan.estimate.step", "_adapted_graph", "adapters spliced into graphs"),
    ("vramplan.estimate.step", "_place_rows", "load and optimizer rows"),
    ("vramplan.estimate.step", "_repeat_step", "second step copied"),
    ("vramplan.estimate.step", "_resized_window", "replays resized to another rank"),
    ("vramplan.estimate.step", "_build_timeline", "records of the step (the rest of it)"),
    ("vramplan.native", "Columns.__init__", "records handed to C"),
    ("vramplan.estimate.record_log", "RecordLog.columns", "records handed to C"),
    ("vramplan.footprint_build", "replay_allocator", "allocator replay"),
    ("vramplan.footprint_build", "analyse", "peak, phases, composition"),
    ("vramplan.fit.walk", "estimated_device_used", "decided by device used (the rest of it)"),
    ("vramplan.fit.walk", "peak_live_bytes", "live-bytes peak (lower bound)"),
    ("vramplan.fit.walk", "static_bytes", "static lower bound"),
    # several GPUs: the step rewritten per strategy (vramplan/distributed/)
    ("vramplan.distributed.plan", "fsdp_rewrite", "FSDP rewrite"),
    ("vramplan.distributed.plan", "zero_rewrite", "ZeRO rewrite"),
    ("vramplan.distributed.plan", "ddp_rewrite", "DDP rewrite"),
    ("vramplan.distributed.rewrite", "RewrittenRecords.columns", "rewritten records to C"),
    ("vramplan.distributed.floor", "strategy_floor", "strategy bound (the rest of it)"),
    ("vramplan.distributed.floor", "kept_peaks", "strategy bound: the step's peaks"),
]


def breakdown(options: dict) -> dict:
    """One search (traces loaded, kept replays empty) with each part's own seconds and calls."""
    import importlib

    import vramplan.estimate.step as step
    import vramplan.fit.walk as walk
    from vramplan.fit import fit_request, search
    from vramplan.spec import build_spec
    from vramplan.timeline import gc_paused

    search(fit_request(build_spec(options)))
    own, calls, stack, restore = {}, {}, [], []

    def wrap(owner, name, label):
        function = getattr(owner, name)

        def run(*args, **kwargs):
            start = time.perf_counter()
            stack.append(0.0)
            try:
                return function(*args, **kwargs)
            finally:
                inner = stack.pop()
                spent = time.perf_counter() - start
                own[label] = own.get(label, 0.0) + spent - inner
                calls[label] = calls.get(label, 0) + 1
                if stack:
                    stack[-1] += spent
        setattr(owner, name, run)
        restore.append((owner, name, function))

    for module, attribute, label in PARTS:
        owner = importlib.import_module(module)
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        wrap(owner, name, label)
    walk.clear_cache()
    step.clear_reuse()
    try:
        start = time.perf_counter()
        with gc_paused(freeze=True):              # as the CLI searches
            search(fit_request(build_spec(options)))
        total = time.perf_counter() - start
    finally:
        for owner, name, function in reversed(restore):
            setattr(owner, name, function)
        walk.clear_cache()
        step.clear_reuse()
    parts = {label: {"seconds": own[label], "calls": calls[label]} for label in own}
    parts["everything else"] = {"seconds": total - sum(own.values()), "calls": 1}
    return {"seconds": total, "parts": parts}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the median is reported")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--case", action="append", choices=list(CASES), help="only this case (repeatable)")
    parser.add_argument("--breakdown", action="store_true", help="also time one search part by part")
    args = parser.parse_args(argv)
    rows = {}
    for name, options in CASES.items():
        if args.case and name not in args.case:
            continue
        colds = [cold(options) for _ in range(args.repeat)]
        warms = [warm(options) for _ in range(args.repeat)]
        rows[name] = {
            "cold_seconds": statistics.median(c["seconds"] for c in colds),
            "warm_seconds": statistics.median(w["seconds"] for w in warms),
            "estimates": warms[0]["estimates"], "decided_free": warms[0]["decided_free"],
            "per_estimate_seconds": statistics.median(w["per_estimate"] for w in warms),
            "share_in_estimate": statistics.median(w["in_estimate"] / w["seconds"] for w in warms),
            "floors": warms[0]["floors"],
            "share_in_floor": statistics.median(w["in_floor"] / w["seconds"] for w in warms),
            "fits": warms[0]["fits"], "plans": warms[0]["plans"], "notes": warms[0]["notes"],
        }
        if args.breakdown:
            rows[name]["breakdown"] = breakdown(options)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'case':24} {'cold s':>7} {'search s':>9} {'estimates':>10} {'free':>5} {'s/estimate':>11} "
          f"{'in estimate':>12} {'floors':>7} {'in floor':>9}")
    for name, row in rows.items():
        print(f"{name:24} {row['cold_seconds']:7.2f} {row['warm_seconds']:9.2f} {row['estimates']:10d} "
              f"{row['decided_free']:5d} {row['per_estimate_seconds']:11.3f} {100 * row['share_in_estimate']:11.0f}% "
              f"{row['floors']:7d} {100 * row['share_in_floor']:8.0f}%")
    for name, row in rows.items():
        print(f"\n{name}: {len(row['plans'])} plan(s)" + ("" if row["fits"] else " (nothing fits)"))
        for plan in row["plans"]:
            print(f"  {plan}")
        for note in row["notes"]:
            print(f"  note: {note}")
        if "breakdown" in row:
            parts = row["breakdown"]["parts"]
            print(f"  one search, {row['breakdown']['seconds']:.2f} s, part by part:")
            for label, part in sorted(parts.items(), key=lambda item: -item[1]["seconds"]):
                print(f"    {label:38} {part['seconds']:6.3f} s  {part['calls']:5d} calls")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

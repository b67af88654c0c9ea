"""Against a real run: two CPU processes (gloo, world size 2) run the shared training step on the
tiny SD pipeline's UNet under torch's own FSDP (FSDP1, accelerate's default), each measuring its
tensor bytes with the simulator's MemoryTracker; vramplan's per-rank prediction must match within
3%. And DDP's Reducer, measured the same way, allocates the buckets ddp.py counts.

The prediction is the analytic per-GPU timeline (no cuBLAS workspaces: a CPU run has none),
plus one thing only a CPU run has: AdamW's `step` scalars, which live on the host when the
parameters are on a GPU (the estimate leaves them out) and on the same device here.
"""

import json
import os

import pytest
import torch

from vramplan.distributed.ddp import BUCKET_CAP_BYTES, FIRST_BUCKET_BYTES, assign_buckets
from vramplan.distributed.measure import free_port, measure_fsdp
from vramplan.distributed.plan import per_gpu_records
from vramplan.models.inventory import load_model_inventories
from vramplan.spec import build_spec
from vramplan.timeline import analyse

CPU_BLOCK = 512   # the tracker rounds every storage as the CUDA allocator would


def predicted(spec, rank: int):
    rw, *_ = per_gpu_records(spec, load_model_inventories(spec.model), rank)
    return analyse(rw.records, rw.phases)


def compare(tiny_pipeline, tmp_path, **options):
    spec = build_spec({"model": str(tiny_pipeline / "model"), "resolution": 128, "num_gpus": 2,
                       "strategy": "fsdp", **options})
    measured = measure_fsdp(spec, 2, tmp_path / "ranks")
    rows = []
    for rank in measured:
        prediction = predicted(spec, rank["rank"])
        peak = prediction.peak_bytes + rank["optimizer_step_scalars"] * CPU_BLOCK
        rows.append((rank["rank"], rank["peak_bytes"], peak, rank["phases"],
                     {name: b for name, b, _ in prediction.phase_peaks}))
    return rows


def check(rows, tolerance=0.03):
    for rank, measured, peak, measured_phases, predicted_phases in rows:
        error = (peak - measured) / measured
        print(f"rank {rank}: measured {measured:,} B, predicted {peak:,} B ({error:+.2%})")
        assert abs(error) <= tolerance, (rank, measured, peak)
        # phase by phase too: forward and backward hold the unsharded units
        for phase in ("forward", "backward", "step 2 forward", "step 2 backward"):
            assert predicted_phases[phase] == pytest.approx(measured_phases[phase], rel=tolerance), phase


def test_fsdp_full_fine_tune_matches_a_real_run(tiny_pipeline, tmp_path):
    check(compare(tiny_pipeline, tmp_path, method="full", precision="fp32", batch_size=4))


def test_fsdp_lora_matches_a_real_run(tiny_pipeline, tmp_path):
    """Adapters share FlatParameters with the frozen base: the base views require grad."""
    check(compare(tiny_pipeline, tmp_path, method="lora", rank=4, precision="fp32", batch_size=2))


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    {"method": "full", "precision": "bf16", "batch_size": 4},                # MixedPrecision(bf16)
    {"method": "full", "precision": "fp32", "batch_size": 4, "fsdp_sharding": "shard-grad-op"},
])
def test_fsdp_variants_match_a_real_run(tiny_pipeline, tmp_path, options):
    check(compare(tiny_pipeline, tmp_path, **options))


def _ddp_rank(rank, world, port, out):
    import torch.distributed as dist

    from vramplan.simulate.tracker import MemoryTracker

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)],
                                torch.nn.Linear(512, 4096), torch.nn.Linear(4096, 2048))
    tracker = MemoryTracker()
    with tracker:
        tracker.set_phase("construct")
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        for step in range(2):
            tracker.set_phase(f"step {step}")
            ddp(torch.randn(4, 512)).sum().backward()
            for p in model.parameters():
                p.grad = None
    records = [{"nbytes": r.nbytes, "phase": r.phase, "op": r.op, "freed": r.free_at is not None}
               for r in tracker.records.values()]
    with open(os.path.join(out, f"ddp{rank}.json"), "w") as f:
        json.dump(records, f)
    dist.destroy_process_group()


def test_ddp_reducer_allocates_the_counted_buckets(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    records = json.loads((tmp_path / "ddp0.json").read_text())
    sizes = [512 * 512 * 4, 512 * 4] * 8 + [512 * 4096 * 4, 4096 * 4, 4096 * 2048 * 4, 2048 * 4]
    total = sum(sizes)
    # construction: the start-up broadcast's flat bucket (< 250 MiB: all of it) and one gradient
    # bucket of everything, freed when the buckets are rebuilt
    built = [r for r in records if r["phase"] == "construct" and r["nbytes"] == total]
    assert [r["op"] for r in built] == ["cat", "empty"] and all(r["freed"] for r in built)
    # second step: rebuilt in gradient-ready order (last layer first), 1 MiB then 25 MiB limits
    ready = []
    for weight, bias in reversed(list(zip(sizes[::2], sizes[1::2]))):
        ready += [bias, weight]
    expected = assign_buckets(ready, [FIRST_BUCKET_BYTES, BUCKET_CAP_BYTES])
    rebuilt = [r["nbytes"] for r in records if r["phase"] == "step 1" and r["op"] == "empty" and not r["freed"]]
    assert sorted(rebuilt) == sorted(expected) and sum(rebuilt) == total

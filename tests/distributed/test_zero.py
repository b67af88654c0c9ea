"""ZeRO-3's prefetch (`vramplan.distributed.zero.prefetched`) against DeepSpeed's rule walked entry
by entry, as `PartitionedParameterCoordinator.fetch_sub_module` reads the trace: after the
submodule that runs, the next ones with parameters still partitioned are gathered until the
prefetch bucket is full."""

import random

from vramplan.distributed.zero import Waiting, prefetched
from vramplan.spec import build_spec


def walked(paths, i, live, large, budget):
    live, out, ahead = set(live), [], 0
    for path in paths[i + 1:]:
        if ahead >= budget:
            break
        if path not in live and large[path]:
            out.append(path)
            live.add(path)
            ahead += large[path]
    return out


def test_prefetch_takes_what_the_entry_by_entry_walk_takes():
    """Submodules gathered and released in a random order: `Waiting` keeps the entries of those
    not gathered, and the prefetch read from it is the walk's over every entry."""
    rng = random.Random(5)
    for _ in range(300):
        names = [f"m{k}" for k in range(rng.randint(1, 12))]
        # most submodules of an adapter's trace hold only small parameters (large 0)
        large = {n: rng.choice([0, 0, 0, rng.randint(1, 40)]) for n in names}
        paths = [rng.choice(names) for _ in range(rng.randint(1, 40))]
        waiting = Waiting(paths, [j for j, p in enumerate(paths) if large[p]])
        live = set()
        for i in range(len(paths)):
            for name in rng.sample(names, rng.randint(0, len(names))):
                if not large[name]:
                    continue
                if name in live:
                    live.discard(name)
                    waiting.released(name)
                else:
                    live.add(name)
                    waiting.gathered(name)
            budget = rng.randint(1, 80)
            assert prefetched(paths, waiting.positions, i, large, budget) == walked(paths, i, live, large, budget)


def test_a_lora_zero3_step_prefetches_past_its_adapters():
    """Between two blocks' large weights an SD 1.5 LoRA trace holds the adapters' small factors:
    the first step gathers each submodule alone (the trace is being recorded), the second
    gathers others ahead of the one running, and never more at once than the bucket allows."""
    from collections import Counter

    from vramplan.distributed.plan import per_gpu_records
    from vramplan.distributed.zero import ZeroConfig
    from vramplan.models.inventory import load_model_inventories

    spec = build_spec({"model": "sd15", "method": "lora", "gpus": "2xh100", "strategy": "zero3"})
    rw = per_gpu_records(spec, load_model_inventories(spec.model))[0]
    gathered = [r for r in rw.records if r.op == "zero3_gathered"]
    first = Counter(r.alloc_at for r in gathered if r.phase == "forward")
    second = Counter(r.alloc_at for r in gathered if r.phase == "step 2 forward")
    assert first and set(first.values()) == {1}
    assert max(second.values()) > 1
    for at in second:
        together = [r.nbytes // 2 for r in gathered if r.alloc_at == at]    # 16-bit elements
        # the running submodule's, then prefetched ones until the bucket holds the budget
        assert sum(together[1:-1]) < ZeroConfig().prefetch_bucket_size

"""SD 1.5 full fine-tune (fp16 mixed, AdamW, batch 1, 512 px) on 2, 4 and 8 GPUs: per-GPU bytes
by hand for every strategy, from the parameter counts and each engine's rules.

Ψ = 859,520,964 UNet parameters (NOTES.md). Every allocation is rounded up to 512 bytes as the
CUDA caching allocator does (`r512`). Sources of each rule are in vramplan/distributed/*.py.
"""

import math

import pytest

from vramplan.distributed.ddp import FIRST_BUCKET_BYTES, BUCKET_CAP_BYTES
from vramplan.estimate import estimate
from vramplan.models.catalog import MODELS
from vramplan.models.inventory import load_model_inventories
from vramplan.spec import build_spec

PSI = 859_520_964
UNET = load_model_inventories(MODELS["sd15"])["unet"]
NUMELS = [math.prod(shape) for _, shape in UNET.params]


def r512(n: int) -> int:
    return -(-n // 512) * 512


def run(gpus: int, **options):
    return estimate(build_spec({"method": "full", "gpus": f"{gpus}xh100", **options}))


def phase_peak(result, name: str) -> int:
    return next(p.peak_bytes for p in result.footprint.phases if p.phase == name)


@pytest.fixture(scope="module")
def single():
    return estimate(build_spec({"method": "full", "gpu": "h100"}))


@pytest.mark.parametrize("n", [2, 4, 8])
def test_ddp_adds_one_copy_of_the_gradients(n, single):
    result = run(n)
    states = result.distributed.model_states
    grads = sum(r512(4 * k) for k in NUMELS)                   # fp32 gradients, one per parameter
    # after the first step the Reducer rebuilds 1 MiB, then 25 MiB buckets in gradient-ready order
    assert grads <= states["ddp_gradient_buckets"] <= grads + 512 * states["ddp_bucket_count"]
    assert states["ddp_bucket_count"] > 1
    # the first step holds one bucket of everything, allocated when DDP is built: every phase of
    # step 1 is the single GPU's plus that bucket
    for phase in ("forward", "backward", "optimizer"):
        assert phase_peak(result, phase) == phase_peak(single, phase) + r512(grads)
    assert result.distributed.single_gpu_peak_allocated_bytes == single.footprint.peak_allocated_bytes
    assert (FIRST_BUCKET_BYTES, BUCKET_CAP_BYTES) == (1024 * 1024, 25 * 1024 * 1024)


def fsdp_shards(n: int, compute_itemsize: int) -> tuple[int, int]:
    """(sum of padded shard numels, largest unsharded unit numel) by the flat-parameter rules."""
    from vramplan.distributed.units import wrap_units

    align = 16 // compute_itemsize
    total, largest = 0, 0
    for unit in wrap_units("unet", UNET):
        numel = 0
        for _, k in unit.params:
            numel += (-numel) % align
            numel += k
        numel += (-numel) % n
        total += r512(numel // n * 4)
        largest = max(largest, numel)
    return total, largest


@pytest.mark.parametrize("n", [2, 4, 8])
def test_fsdp_full_shard(n, single):
    result = run(n, strategy="fsdp")
    states = result.distributed.model_states
    shards, largest = fsdp_shards(n, 2)
    assert states["sharded_parameters"] == shards
    assert states["sharded_gradients"] == shards               # fp32 shard after the cast back
    assert states["largest_unsharded_unit"] == r512(largest * 2)   # 16-bit all-gather
    # AdamW: exp_avg and exp_avg_sq per local slice (fp32); slices sum to the unpadded shard
    assert 2 * 4 * PSI / n <= states["optimizer_states"] <= 2 * 4 * PSI / n + 2 * 512 * len(NUMELS)
    # 4Ψ/N + 4Ψ/N + 8Ψ/N: the ZeRO paper's 16Ψ/N for P_os+g+p, fp32 params instead of fp16 + master
    model_states = states["sharded_parameters"] + states["sharded_gradients"] + states["optimizer_states"]
    assert model_states == pytest.approx(16 * PSI / n, rel=1e-3)
    assert result.footprint.peak_allocated_bytes < single.footprint.peak_allocated_bytes


@pytest.mark.parametrize("n", [2, 4, 8])
def test_fsdp_shard_grad_op_holds_more_than_full_shard(n):
    full = run(n, strategy="fsdp")
    grad_op = run(n, strategy="fsdp", fsdp_sharding="shard-grad-op")
    # by the end of the forward every unit is gathered (16-bit) and stays so into the backward
    unsharded = 2 * PSI
    extra = phase_peak(grad_op, "forward") - phase_peak(full, "forward")
    assert 0.9 * unsharded < extra < 1.01 * unsharded


def zero_partition(n: int) -> int:
    return -(-PSI // (2 * n)) * 2                                # padded to 2 x N, then / N


@pytest.mark.parametrize("n", [2, 4, 8])
def test_zero1(n):
    states = run(n, strategy="zero1").distributed.model_states
    p = zero_partition(n)
    assert states["parameters"] == r512(p * n * 2)               # one flat fp16 buffer
    assert states["gradients"] == sum(r512(2 * k) for k in NUMELS)   # full fp16 gradients
    assert states["fp32_master_weights"] == r512(p * 4)
    assert states["optimizer_states"] == 2 * r512(p * 4)
    assert states["ipg_buckets"] == r512(500_000_000 * 2)        # one bucket: overlap_comm off


@pytest.mark.parametrize("n", [2, 4, 8])
def test_zero2(n):
    result = run(n, strategy="zero2")
    states = result.distributed.model_states
    p = zero_partition(n)
    assert states["parameters"] == r512(p * n * 2)
    assert states["gradients"] == r512(p * 2)                    # grads_in_partition
    assert states["fp32_master_weights"] == r512(p * 4)
    assert states["optimizer_states"] == 2 * r512(p * 4)
    # model states against the ZeRO paper's P_os+g, 2Ψ + (2 + 12)Ψ/N: equal up to padding
    ours = states["parameters"] + states["gradients"] + states["fp32_master_weights"] + states["optimizer_states"]
    paper = result.distributed.published["zero_paper_mixed_adam_bytes"]["stage2"]
    assert ours == pytest.approx(paper, abs=512 * 8 + 2 * 2 * n)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_zero3(n):
    states = run(n, strategy="zero3").distributed.model_states
    p = sum(-(-k // n) for k in NUMELS)                          # ds_tensor: ceil(numel / N) each
    assert states["parameters"] == r512(p * 2)
    assert states["gradients"] == r512(p * 2)                    # grad_partitions_flat_buffer
    assert states["fp32_master_weights"] == r512(p * 4)
    assert states["optimizer_states"] == 2 * r512(p * 4)
    assert states["ipg_buckets"] == r512(500_000_000 * 2)
    # biases and norms (<= 1e5 elements) stay gathered: stage3_param_persistence_threshold
    assert states["persistent_parameters"] > 0


def test_more_gpus_never_need_more_memory_per_gpu():
    for strategy in ("fsdp", "zero2", "zero3"):
        peaks = [run(n, strategy=strategy).footprint.peak_allocated_bytes for n in (2, 4, 8)]
        assert peaks == sorted(peaks, reverse=True), strategy


def test_offload_moves_bytes_to_the_host():
    n = 2
    result = run(n, strategy="zero2", offload="optimizer")
    plan = result.distributed
    p = zero_partition(n)
    # master + fp32 gradient pinned, AdamW states pageable (DeepSpeedCPUAdam), per GPU
    assert plan.host.pinned_bytes_per_gpu == r512(p * 4) + r512(p * 4)
    assert plan.host.pageable_bytes_per_gpu == 2 * r512(p * 4)
    assert plan.host.bytes_per_node == n * plan.host.bytes_per_gpu
    assert plan.model_states["fp32_master_weights"] == plan.model_states["optimizer_states"] == 0
    assert plan.offload_saved_gpu_bytes > 4 * p * 4 * 0.9
    fsdp = run(4, strategy="fsdp", offload="params").distributed
    shards, _ = fsdp_shards(4, 2)
    assert fsdp.host.pinned_bytes_per_gpu == 2 * shards            # _local_shard and _cpu_grad
    assert fsdp.model_states["optimizer_states"] == 0 and fsdp.offload_saved_gpu_bytes > 0


def test_batch_size_is_per_gpu():
    """Each GPU runs --batch-size images: its activations are the one-GPU step's for that batch."""
    from vramplan.footprint import Category

    def activations(result):
        peak = next(p for p in result.footprint.phases if p.phase == "forward")
        return peak.categories.get(Category.ACTIVATIONS, 0)

    four = run(8, strategy="fsdp", batch_size=4)
    alone = estimate(build_spec({"method": "full", "batch_size": 4}))
    assert activations(four) == activations(alone) > activations(run(8, strategy="fsdp"))
    assert four.distributed.images_per_optimizer_step == 32
    assert any("batch size is per GPU" in note for note in four.notes)


def test_fsdp_gradient_accumulation_keeps_unsharded_gradients():
    """no_sync() micro-steps hold every unit's unsharded 16-bit gradient until the sync step."""
    plain = run(8, strategy="fsdp")
    accumulating = run(8, strategy="fsdp", gradient_accumulation_steps=2)
    extra = accumulating.footprint.peak_allocated_bytes - plain.footprint.peak_allocated_bytes
    assert 0.95 * 2 * PSI < extra < 1.05 * 2 * PSI
    assert any("no_sync" in rule for rule in accumulating.distributed.rules)

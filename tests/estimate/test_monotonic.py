"""Monotonicity: properties the estimate must keep whatever its per-layer model, on SD 1.5.

Asked of the tensors' peak (what `torch.cuda.max_memory_allocated` measures, less the whole-block
slack the caching allocator adds) and, for the activation properties, of the activations at every
phase's peak. The allocator's own figures -- block slack and peak *reserved* -- are left out on
purpose: its segments can split and fragment less at a larger size, so they are not monotone in
every knob on a real GPU either.
"""

import pytest

from vramplan.estimate.overheads import CUBLASLT_WORKSPACE_BYTES
from vramplan.footprint import Category

ADAPTERS = ["lora", "loha", "textual-inversion", "hypernetwork"]


def peak(est) -> int:
    return est.footprint.peak_allocated_bytes - est.footprint.category_bytes(Category.BLOCK_SLACK)


def activations(h, est) -> int:
    return h.max_over_phases(est, Category.ACTIVATIONS)


@pytest.mark.parametrize("method", ["lora", "full", "hypernetwork"])
def test_more_batch_never_less_memory(h, method):
    peaks = [peak(h.estimate(method=method, batch_size=b)) for b in (1, 2, 3)]
    assert peaks == sorted(peaks)
    acts = [activations(h, h.estimate(method=method, batch_size=b)) for b in (1, 2, 3)]
    assert acts == sorted(acts) and acts[0] < acts[-1]


@pytest.mark.parametrize("method", ["lora", "full", "loha", "textual-inversion"])
@pytest.mark.parametrize("batch", [1, 2])
def test_gradient_checkpointing_never_more(h, method, batch):
    plain = h.estimate(method=method, batch_size=batch)
    checkpointed = h.estimate(method=method, batch_size=batch, gradient_checkpointing=True)
    assert activations(h, checkpointed) <= activations(h, plain)
    assert checkpointed.footprint.category_bytes(Category.ACTIVATIONS) <= \
        plain.footprint.category_bytes(Category.ACTIVATIONS)
    # checkpointing reruns Linear-with-bias forwards on autograd's thread, whose cuBLASLt handle
    # then takes its own 1 MiB workspace (profiles/h200 traces): the one thing it adds
    assert peak(checkpointed) <= peak(plain) + CUBLASLT_WORKSPACE_BYTES


@pytest.mark.parametrize("method", ["lora", "loha"])
def test_higher_rank_never_less(h, method):
    # LoKr is left out: peft switches a layer's w2 from two rank-r factors to one full matrix when
    # r >= max(out_k, in_n) / 2, which can save activations; peft's own counts say so.
    ests = [h.estimate(method=method, rank=r) for r in (4, 16, 64)]
    assert [peak(e) for e in ests] == sorted(peak(e) for e in ests)
    trainable = [e.trainable_params for e in ests]
    assert trainable == sorted(trainable) and trainable[0] < trainable[-1]
    files = [e.adapter_file_bytes for e in ests]
    assert files == sorted(files) and files[0] < files[-1]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_higher_resolution_never_less(h, method):
    ests = [h.estimate(method=method, resolution=r) for r in (256, 512, 768)]
    assert [peak(e) for e in ests] == sorted(peak(e) for e in ests)
    acts = [activations(h, e) for e in ests]
    assert acts == sorted(acts) and acts[0] < acts[-1]


def test_non_square_resolution_sits_between_its_sides(h):
    small, mid, large = (peak(h.estimate(resolution=r)) for r in ("512", "512x768", "768"))
    assert small <= mid <= large


@pytest.mark.parametrize("method", ["lora", "full", "textual-inversion"])
def test_fp32_never_less_than_fp16_mixed(h, method):
    fp32, fp16 = h.estimate(method=method, precision="fp32"), h.estimate(method=method, precision="fp16")
    assert peak(fp32) >= peak(fp16)
    assert fp32.footprint.category_bytes(Category.FROZEN_WEIGHTS) >= \
        fp16.footprint.category_bytes(Category.FROZEN_WEIGHTS)


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("cache", [{"cache_latents": True}, {"cache_text_embeddings": True},
                                   {"cache_latents": True, "cache_text_embeddings": True}],
                         ids=["latents", "text", "both"])
def test_caching_never_more(h, method, cache):
    assert peak(h.estimate(method=method, **cache)) <= peak(h.estimate(method=method))
    assert h.estimate(method=method, **cache).footprint.category_bytes(Category.FROZEN_WEIGHTS) < \
        h.estimate(method=method).footprint.category_bytes(Category.FROZEN_WEIGHTS)


def test_eager_attention_never_less_than_sdpa(h):
    # eager keeps the sequence x sequence attention probabilities for backward; sdpa does not
    eager, sdpa = h.estimate(attention="eager"), h.estimate()
    assert activations(h, eager) > activations(h, sdpa)
    assert peak(eager) >= peak(sdpa)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_prior_preservation_is_a_doubled_batch(h, method):
    # class images are concatenated to the instance images: the step sees twice the batch
    doubled = h.estimate(method=method, prior_preservation=True)
    batch2 = h.estimate(method=method, batch_size=2)
    assert peak(doubled) == peak(batch2)
    assert doubled.footprint.categories == batch2.footprint.categories


def test_dreambooth_is_full_with_prior_preservation(h):
    assert h.estimate(method="dreambooth").footprint == \
        h.estimate(method="full", prior_preservation=True).footprint


def test_ema_adds_an_fp32_copy(h):
    plain, ema = h.estimate(method="full"), h.estimate(method="full", ema=True)
    assert ema.footprint.category_bytes(Category.EMA) > 0
    assert peak(ema) > peak(plain)

"""Bytes the analytic tier must get exactly, computed here by hand from the shipped inventories.

Every expectation is rebuilt from the inventory JSON files (parameter shapes, module sizes) and
the rules the issue states: one CUDA allocation per tensor, rounded up to 512 bytes by the
caching allocator; fp32 gradients are 4 bytes per parameter, AdamW keeps exp_avg and exp_avg_sq
in the parameter's dtype, and its `step` scalars live on the CPU. Nothing here asks the code
under test for the numbers it is checked against.
"""

import json
from math import prod

import pytest

from vramplan.footprint import Category
from vramplan.models.catalog import MODELS

SD15_UNET = 859_520_964
SD_VAE = 83_653_863
CLIP_L = 123_060_480
LORA_ATTN_PER_RANK = 199_296       # SD 1.5 UNet, --lora-targets attn (the issue)
LORA_ATTN_LAYERS = 128
POSITION_IDS = 1 * 77 * 8          # CLIP's int64 position_ids buffer, the only SD 1.5 buffer
# cuBLAS workspace (aten/src/ATen/cuda/CublasHandlePool.cpp, not Hopper): 4096*1024*2 + 16*1024*8
# bytes, one for the forward thread and one for autograd's backward thread.
CUBLAS_WORKSPACE = 4096 * 1024 * 2 + 16 * 1024 * 8
CUBLASLT_WORKSPACE = 2**20              # cuBLASLt, the main thread (Linear with bias forwards)


def test_sd15_inventory_is_the_reference_model(h):
    assert sum(h.numels("sd15", "unet")) == SD15_UNET
    assert sum(h.numels("sd15", "vae")) == SD_VAE
    assert sum(h.numels("sd15", "text_encoder")) == CLIP_L


def test_rounding_is_per_tensor_not_per_category(h):
    # 686 UNet tensors: rounding each to 512 bytes adds 27,888 bytes to 4 x 859,520,964
    unrounded = 4 * SD15_UNET
    rounded = h.per_tensor(h.numels("sd15", "unet"), 4)
    assert rounded == 3_438_111_744
    assert unrounded < rounded < unrounded + 512 * len(h.numels("sd15", "unet"))


@pytest.mark.parametrize("phase", ["optimizer", "step 2 optimizer"])
def test_sd15_full_fp32_adamw_optimizer_phase(h, phase):
    est = h.estimate(method="full", precision="fp32")
    unet4 = h.per_tensor(h.numels("sd15", "unet"), 4)
    at = {p.phase: p for p in est.footprint.phases}[phase].categories
    assert at[Category.GRADIENTS] == unet4
    assert at[Category.OPTIMIZER_STATES] == 2 * unet4           # exp_avg + exp_avg_sq, 8 bytes/param
    assert at[Category.TRAINABLE_WEIGHTS] == unet4
    assert at[Category.FROZEN_WEIGHTS] == (h.per_tensor(h.numels("sd15", "vae"), 4)
                                           + h.per_tensor(h.numels("sd15", "text_encoder"), 4))
    assert at[Category.BUFFERS] == h.blocks(POSITION_IDS)
    # foreach AdamW: `torch._foreach_sqrt(exp_avg_sqs)` is one transient copy of every exp_avg_sq
    assert at[Category.TEMPORARIES] == unet4
    assert at[Category.WORKSPACES] == 2 * CUBLAS_WORKSPACE + CUBLASLT_WORKSPACE
    assert at.get(Category.ACTIVATIONS, 0) == 0
    assert at.get(Category.MASTER_WEIGHTS, 0) == 0


def test_sd15_full_fp32_adamw_peak(h):
    est = h.estimate(method="full", precision="fp32")
    fp = est.footprint
    unet4 = h.per_tensor(h.numels("sd15", "unet"), 4)
    frozen = h.per_tensor(h.numels("sd15", "vae"), 4) + h.per_tensor(h.numels("sd15", "text_encoder"), 4)
    # weights + gradients + exp_avg + exp_avg_sq + the sqrt transient: five copies of the UNet
    # the batch (fp32 pixels, int64 token ids) stays alive through the optimizer step
    batch = h.blocks(3 * 512 * 512 * 4) + h.blocks(77 * 8)
    workspaces = 2 * CUBLAS_WORKSPACE + CUBLASLT_WORKSPACE
    expected = 5 * unet4 + frozen + h.blocks(POSITION_IDS) + workspaces + batch
    tensors = max(p.peak_bytes for p in fp.phases)
    assert tensors == expected == 18_038_654_464
    # max_memory_allocated counts whole blocks: the allocator's unsplit slack comes on top
    slack = fp.category_bytes(Category.BLOCK_SLACK)
    assert fp.peak_allocated_bytes == tensors + slack and 0 < slack < 2**20 * len(h.numels("sd15", "unet"))
    assert fp.peak_phase == "optimizer"
    assert fp.category_bytes(Category.GRADIENTS) == unet4
    assert fp.category_bytes(Category.OPTIMIZER_STATES) == 2 * unet4


def test_sd15_full_fp16_mixed_keeps_trained_weights_fp32(h):
    est = h.estimate(method="full", precision="fp16")
    at = {p.phase: p for p in est.footprint.phases}["optimizer"].categories
    unet4 = h.per_tensor(h.numels("sd15", "unet"), 4)
    assert at[Category.TRAINABLE_WEIGHTS] == unet4
    assert at[Category.GRADIENTS] == unet4
    assert at[Category.OPTIMIZER_STATES] == 2 * unet4
    # frozen VAE and text encoder are cast to fp16 (weight_dtype)
    assert at[Category.FROZEN_WEIGHTS] == (h.per_tensor(h.numels("sd15", "vae"), 2)
                                           + h.per_tensor(h.numels("sd15", "text_encoder"), 2))
    assert at.get(Category.MASTER_WEIGHTS, 0) == 0


def test_sd15_full_fp16_pure_is_two_bytes_everywhere(h):
    est = h.estimate(method="full", precision="fp16-pure")
    at = {p.phase: p for p in est.footprint.phases}["optimizer"].categories
    unet2 = h.per_tensor(h.numels("sd15", "unet"), 2)
    assert at[Category.TRAINABLE_WEIGHTS] == unet2
    assert at[Category.GRADIENTS] == unet2
    assert at[Category.OPTIMIZER_STATES] == 2 * unet2


def lora_targets(h, model="sd15"):
    return [m for m in h.inventory(model, "unet")["modules"]
            if m["kind"] == "Linear" and any(m["name"].endswith("." + s) for s in ("to_q", "to_k", "to_v", "to_out.0"))]


def test_sd15_lora_attn_targets_by_hand(h):
    targets = lora_targets(h)
    assert len(targets) == LORA_ATTN_LAYERS
    assert sum(m["in_features"] + m["out_features"] for m in targets) == LORA_ATTN_PER_RANK


@pytest.mark.parametrize("rank", [4, 8, 16, 64])
def test_sd15_lora_attn_trainable_params(h, rank):
    est = h.estimate(method="lora", rank=rank)
    assert est.parameters["unet"].trainable == rank * LORA_ATTN_PER_RANK
    assert est.parameters["vae"].trainable == est.parameters["text_encoder"].trainable == 0
    assert est.trainable_params == rank * LORA_ATTN_PER_RANK


def test_sd15_lora_r16_bytes(h):
    est = h.estimate(method="lora", rank=16)
    assert est.parameters["unet"].trainable == 3_188_736
    fp = est.footprint
    # lora_A (16, in) and lora_B (out, 16), fp32, one allocation each
    lora = [16 * m["in_features"] for m in lora_targets(h)] + [16 * m["out_features"] for m in lora_targets(h)]
    trainable = h.per_tensor(lora, 4)
    assert trainable == 4 * 3_188_736        # every size here is a multiple of 512 bytes
    assert fp.category_bytes(Category.TRAINABLE_WEIGHTS) == trainable
    assert fp.category_bytes(Category.OPTIMIZER_STATES) == 2 * trainable
    frozen = sum(h.per_tensor(h.numels("sd15", c), 2) for c in ("unet", "vae", "text_encoder"))
    assert fp.category_bytes(Category.FROZEN_WEIGHTS) == frozen
    assert fp.category_bytes(Category.BUFFERS) == h.blocks(POSITION_IDS)
    optimizer = {p.phase: p for p in fp.phases}["step 2 optimizer"].categories
    assert optimizer[Category.GRADIENTS] == trainable


def test_cached_components_hold_no_weights(h):
    est = h.estimate(method="lora", rank=16, cache_latents=True, cache_text_embeddings=True)
    assert est.footprint.category_bytes(Category.FROZEN_WEIGHTS) == h.per_tensor(h.numels("sd15", "unet"), 2)
    assert est.footprint.category_bytes(Category.BUFFERS) == 0
    # the parameters table still lists every component of the model
    assert est.parameters["vae"].total == SD_VAE and est.parameters["text_encoder"].total == CLIP_L


def test_sdxl_keeps_its_vae_in_fp32(h):
    # train_text_to_image_sdxl.py / train_dreambooth_lora_sdxl.py: "The VAE is always in float32"
    est = h.estimate(model="sdxl", cache_text_embeddings=True)
    assert est.footprint.category_bytes(Category.FROZEN_WEIGHTS) == \
        h.per_tensor(h.numels("sdxl", "unet"), 2) + h.per_tensor(h.numels("sdxl", "vae"), 4)


def quantized_unet_bytes(h, quant: str) -> int:
    """bitsandbytes' allocations for the SD 1.5 UNet with every Linear weight quantized:
    int8 (LLM.int8, has_fp16_weights=False): CB int8 of the weight's shape + SCB fp32 per row;
    nf4 (blocksize 64): packed 2 values per byte + fp32 absmax per block + the 16-entry fp32 code
    table `quantize_4bit` gives each weight's QuantState. Everything else stays fp16."""
    inventory = h.inventory("sd15", "unet")
    linear = {m["name"] + ".weight" for m in inventory["modules"] if m["kind"] == "Linear"}
    assert len(linear) == 184
    total = 0
    for name, shape in inventory["params"]:
        n = 1
        for d in shape:
            n *= d
        if name not in linear:
            total += h.blocks(2 * n)
        elif quant == "int8":
            total += h.blocks(n) + h.blocks(4 * shape[0])
        else:
            total += h.blocks((n + 1) // 2) + h.blocks(4 * -(-n // 64)) + h.blocks(16 * 4)
    return total


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_base_bytes(h, quant):
    est = h.estimate(base_quant=quant, cache_latents=True, cache_text_embeddings=True)
    assert est.footprint.category_bytes(Category.FROZEN_WEIGHTS) == quantized_unet_bytes(h, quant)


# ---- adapter files, byte for byte ---------------------------------------------------------

def safetensors_size(tensors: dict, itemsize: int, dtype: str, metadata: dict | None) -> int:
    """A .safetensors file by the format's definition: u64 header length, the JSON header (compact,
    "__metadata__" first, tensors in name order with their data offsets) padded with spaces to a
    multiple of 8, then the data."""
    header = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name in sorted(tensors, key=lambda n: n.encode()):
        size = itemsize
        for d in tensors[name]:
            size *= d
        header[name] = {"dtype": dtype, "shape": list(tensors[name]), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return 8 + -(-len(text) // 8) * 8 + offset


def sd15_lora_file_tensors(h, rank: int) -> dict:
    # diffusers' SD 1.x LoRA save: peft names converted by `convert_state_dict_to_diffusers`
    # ("to_q.lora_A" -> "to_q.lora.down", "lora_B" -> "lora.up") and packed under "unet."
    out = {}
    for m in lora_targets(h):
        out[f"unet.{m['name']}.lora.down.weight"] = (rank, m["in_features"])
        out[f"unet.{m['name']}.lora.up.weight"] = (m["out_features"], rank)
    return out


def test_sd15_lora_r8_file_bytes_by_hand(h):
    tensors = sd15_lora_file_tensors(h, 8)
    assert len(tensors) == 2 * LORA_ATTN_LAYERS
    expected = safetensors_size(tensors, 2, "F16", {"format": "pt"})
    assert expected > 2 * 8 * LORA_ATTN_PER_RANK
    assert h.estimate(method="lora", rank=8).adapter_file_bytes == expected


def test_hand_layout_matches_the_real_serializer(h):
    """The hand layout above, checked once against safetensors' own writer (numpy, no torch)."""
    np = pytest.importorskip("numpy")
    from safetensors.numpy import save

    tensors = sd15_lora_file_tensors(h, 8)
    data = save({k: np.zeros(s, dtype=np.float16) for k, s in tensors.items()}, metadata={"format": "pt"})
    assert len(data) == safetensors_size(tensors, 2, "F16", {"format": "pt"})


@pytest.mark.parametrize("vectors", [1, 4])
def test_textual_inversion_file_and_params(h, vectors):
    est = h.estimate(method="textual-inversion", num_vectors=vectors)
    assert est.parameters["text_encoder"].trainable == vectors * 768
    assert est.parameters["unet"].trainable == 0
    expected = safetensors_size({"<cat-toy>": (vectors, 768)}, 2, "F16", {"format": "pt"})
    assert est.adapter_file_bytes == expected


@pytest.mark.parametrize("method", ["full", "dreambooth"])
def test_whole_model_methods_have_no_adapter_file(h, method):
    est = h.estimate(method=method)
    assert est.adapter_file_bytes is None
    assert "adapter_file_bytes" not in est.to_json()
    assert est.parameters["unet"].trainable == est.parameters["unet"].total == SD15_UNET


def test_full_with_text_encoder_trains_it_whole(h):
    est = h.estimate(method="full", train_text_encoder=True, precision="fp32")
    assert est.parameters["text_encoder"].trainable == CLIP_L
    assert est.parameters["vae"].trainable == 0
    at = {p.phase: p for p in est.footprint.phases}["optimizer"].categories
    trained = h.per_tensor(h.numels("sd15", "unet"), 4) + h.per_tensor(h.numels("sd15", "text_encoder"), 4)
    assert at[Category.GRADIENTS] == trained
    assert at[Category.OPTIMIZER_STATES] == 2 * trained


# ---- parameters per catalog model ---------------------------------------------------------

# ../shared/NOTES.md "Reference parameter counts" (and tests/models/test_inventory.py for the two
# that NOTES does not list: SD3.5 Medium's MMDiT-X and CLIP-L with its text projection).
REFERENCE = {
    "sd15": {"unet": SD15_UNET, "vae": SD_VAE, "text_encoder": CLIP_L},
    "sd21": {"unet": 865_910_724, "vae": SD_VAE, "text_encoder": 340_387_840},
    "sdxl": {"unet": 2_567_463_684, "vae": SD_VAE, "text_encoder": CLIP_L, "text_encoder_2": 694_659_840},
    "sd35-medium": {"transformer": 2_243_171_520, "vae": 83_819_683, "text_encoder": 123_650_304,
                    "text_encoder_2": 694_659_840, "text_encoder_3": 4_762_310_656},
    "sd35-large": {"transformer": 8_056_627_520, "vae": 83_819_683, "text_encoder": 123_650_304,
                   "text_encoder_2": 694_659_840, "text_encoder_3": 4_762_310_656},
    "flux-dev": {"transformer": 11_901_408_320, "vae": 83_819_683, "text_encoder": CLIP_L,
                 "text_encoder_2": 4_762_310_656},
}


def test_reference_covers_the_catalog():
    assert set(REFERENCE) == set(MODELS)


@pytest.mark.parametrize("model", sorted(REFERENCE))
def test_estimate_parameters_are_the_reference_counts(h, model):
    # cached components keep the estimate quick; the parameters table lists them all the same
    est = h.estimate(model=model, cache_latents=True, cache_text_embeddings=True)
    totals = {name: p.total for name, p in est.parameters.items()}
    assert totals == REFERENCE[model]
    for name, total in totals.items():
        assert h.inventory(model, name)["total_params"] == total
        assert sum(h.numels(model, name)) == total
    data = est.to_json()["parameters"]
    assert data == {name: {"total": p.total, "trainable": p.trainable} for name, p in est.parameters.items()}
    denoiser = MODELS[model].denoiser.name
    assert 0 < est.parameters[denoiser].trainable < est.parameters[denoiser].total
    assert all(p.trainable == 0 for name, p in est.parameters.items() if name != denoiser)


@pytest.mark.parametrize("precision,itemsize", [("bf16", 2), ("fp16", 2), ("fp32", 4)])
def test_buffers_stay_in_the_frozen_dtype_when_the_model_trains_whole(h, precision, itemsize):
    """The step casts trained parameters to fp32 and every floating buffer to the frozen dtype
    (`step.build`): SD 3.5 Medium's position table (1 x 147456 x 1536, built in fp32) is 16-bit
    in a mixed-precision full fine-tune, and gets no gradient."""
    (name, shape, dtype, _), = h.inventory("sd35-medium", "transformer")["buffers"]
    assert dtype == "float32"
    est = h.estimate(model="sd35-medium", method="full", precision=precision, cache_latents=True,
                     cache_text_embeddings=True, gradient_checkpointing=True)
    for phase in est.footprint.phases:
        assert phase.categories[Category.BUFFERS] == h.blocks(prod(shape) * itemsize), phase.phase
    # every parameter's gradient, none for the buffer, alive while the optimizer steps
    at = {p.phase: p for p in est.footprint.phases}["optimizer"].categories
    assert at[Category.GRADIENTS] == h.per_tensor(h.numels("sd35-medium", "transformer"), 4)

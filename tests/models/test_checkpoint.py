"""Single-file checkpoints: the safetensors header reader and the layout recognition.

The full-size files here are sparse: a hand-written header with the real shapes, the file then
extended with `truncate`, so a 5 GB SDXL checkpoint costs no disk and no time.
"""

import json
import math
import struct

import pytest

from vramplan.errors import UsageError
from vramplan.models.checkpoint import read_safetensors_header, recognise_checkpoint
from vramplan.models.inventory import load_inventory, load_model_inventories
from vramplan.models.local import local_model_info
from vramplan.models.resolve import resolve_model

BYTES = {"F16": 2, "BF16": 2, "F32": 4}


def ldm_unet_shapes(*, mc=320, mult=(1, 2, 4, 4), num_res=2, attn_levels=(0, 1, 2),
                    depth=(1, 1, 1, 1), mid_depth=1, context=768, linear_proj=False, adm_in=None,
                    in_ch=4, out_ch=4, prefix="model.diffusion_model."):
    """Tensor shapes of an original (CompVis `openaimodel.UNetModel`) Stable Diffusion UNet."""
    s = {}
    emb = 4 * mc

    def lin(name, i, o, bias=True):
        s[name + ".weight"] = (o, i)
        if bias:
            s[name + ".bias"] = (o,)

    def conv(name, i, o, k):
        s[name + ".weight"] = (o, i, k, k)
        s[name + ".bias"] = (o,)

    def norm(name, c):
        s[name + ".weight"] = (c,)
        s[name + ".bias"] = (c,)

    def proj(name, c):  # SD 1.x: 1x1 convolutions; SD 2.x and SDXL: Linear
        lin(name, c, c) if linear_proj else conv(name, c, c, 1)

    def res(name, i, o):
        norm(f"{name}.in_layers.0", i)
        conv(f"{name}.in_layers.2", i, o, 3)
        lin(f"{name}.emb_layers.1", emb, o)
        norm(f"{name}.out_layers.0", o)
        conv(f"{name}.out_layers.3", o, o, 3)
        if i != o:
            conv(f"{name}.skip_connection", i, o, 1)

    def attn(name, c, d):
        norm(f"{name}.norm", c)
        proj(f"{name}.proj_in", c)
        for b in range(d):
            t = f"{name}.transformer_blocks.{b}"
            for a, kv in (("attn1", c), ("attn2", context)):
                lin(f"{t}.{a}.to_q", c, c, bias=False)
                lin(f"{t}.{a}.to_k", kv, c, bias=False)
                lin(f"{t}.{a}.to_v", kv, c, bias=False)
                lin(f"{t}.{a}.to_out.0", c, c)
            lin(f"{t}.ff.net.0.proj", c, 8 * c)  # GEGLU: value and gate
            lin(f"{t}.ff.net.2", 4 * c, c)
            for n in ("norm1", "norm2", "norm3"):
                norm(f"{t}.{n}", c)
        proj(f"{name}.proj_out", c)

    lin("time_embed.0", mc, emb)
    lin("time_embed.2", emb, emb)
    if adm_in:
        lin("label_emb.0.0", adm_in, emb)
        lin("label_emb.0.2", emb, emb)
    conv("input_blocks.0.0", in_ch, mc, 3)
    chans, ch, block = [mc], mc, 1
    for level, m in enumerate(mult):
        for _ in range(num_res):
            res(f"input_blocks.{block}.0", ch, m * mc)
            ch = m * mc
            if level in attn_levels:
                attn(f"input_blocks.{block}.1", ch, depth[level])
            chans.append(ch)
            block += 1
        if level != len(mult) - 1:
            conv(f"input_blocks.{block}.0.op", ch, ch, 3)
            chans.append(ch)
            block += 1
    res("middle_block.0", ch, ch)
    attn("middle_block.1", ch, mid_depth)
    res("middle_block.2", ch, ch)
    block = 0
    for level, m in reversed(list(enumerate(mult))):
        for i in range(num_res + 1):
            res(f"output_blocks.{block}.0", ch + chans.pop(), m * mc)
            ch = m * mc
            layer = 1
            if level in attn_levels:
                attn(f"output_blocks.{block}.1", ch, depth[level])
                layer = 2
            if level and i == num_res:
                conv(f"output_blocks.{block}.{layer}.conv", ch, ch, 3)
            block += 1
    norm("out.0", mc)
    conv("out.2", mc, out_ch, 3)
    return {prefix + k: v for k, v in s.items()}


LDM = {
    "sd15": dict(),
    "sd21": dict(context=1024, linear_proj=True),
    "sdxl": dict(mult=(1, 2, 4), attn_levels=(1, 2), depth=(0, 2, 10), mid_depth=10,
                 context=2048, linear_proj=True, adm_in=2816),
}
# Keys the rest of an original single file holds (a sample is enough for recognition).
EXTRA = {
    "sd15": {"first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
             "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)},
    "sd21": {"first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
             "cond_stage_model.model.token_embedding.weight": (49408, 1024)},
    "sdxl": {"first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3),
             "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
             "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280)},
}


def write_header_only(path, shapes, dtype="F16", metadata=None):
    """A valid safetensors file with these shapes, its data a sparse hole (no disk used)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = math.prod(shape) * BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return path


def write_raw(path, header_bytes, length=None, data=b""):
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes) if length is None else length) + header_bytes + data)
    return path


def test_ldm_shapes_are_what_diffusers_converts_to_its_unets():
    """The generator above is checked against diffusers' own LDM -> diffusers converter."""
    torch = pytest.importorskip("torch")
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from vramplan.models.inventory import load_config

    for key, kwargs in LDM.items():
        shapes = ldm_unet_shapes(**kwargs)
        converted = convert_ldm_unet_checkpoint(
            {k: torch.empty(v, device="meta") for k, v in shapes.items()}, load_config(key, "unet"))
        assert {k: tuple(v.shape) for k, v in converted.items()} == dict(load_inventory(key, "unet").params)


@pytest.mark.parametrize("key,family,dtype", [("sd15", "sd1", "F16"), ("sd21", "sd2", "F32"),
                                              ("sdxl", "sdxl", "BF16")])
def test_full_original_checkpoint_maps_to_the_catalog(tmp_path, key, family, dtype):
    shapes = {**ldm_unet_shapes(**LDM[key]), **EXTRA[key]}
    path = write_header_only(tmp_path / f"{key}.safetensors", shapes, dtype, metadata={"x": "y"})
    header = read_safetensors_header(path)
    assert header.metadata == {"x": "y"}
    layout = recognise_checkpoint(header)
    assert (layout.family, layout.catalog_key, layout.layout) == (family, key, "ldm")
    assert layout.denoiser_params == load_inventory(key, "unet").total_params
    expected_components = ("unet", "vae", "text_encoder") + (("text_encoder_2",) if key == "sdxl" else ())
    assert layout.components == expected_components

    model = local_model_info(path)
    torch_name = {"F16": "float16", "F32": "float32", "BF16": "bfloat16"}[dtype]
    assert (model.key, model.local_path, model.base_model, model.checkpoint_dtype) == (
        str(path), str(path), key, torch_name)
    assert model.family == family and model.components == resolve_model(key).components
    assert resolve_model(str(path)) == model
    inventories = load_model_inventories(model)
    assert inventories["unet"] is load_inventory(key, "unet")


@pytest.mark.parametrize("key,family", [("sd15", "sd1"), ("sd21", "sd2"), ("sdxl", "sdxl")])
def test_diffusers_format_unet_file(tmp_path, key, family):
    params = dict(load_inventory(key, "unet").params)
    path = write_header_only(tmp_path / "diffusion_pytorch_model.safetensors", params)
    layout = recognise_checkpoint(read_safetensors_header(path))
    assert (layout.family, layout.layout, layout.dtype) == (family, "diffusers", "float16")
    assert local_model_info(path).base_model == key


def test_small_real_files_are_recognised(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    pre = "model.diffusion_model."
    cases = {
        "sd1": {pre + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
                pre + "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1)},
        "sd2": {pre + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
                pre + "input_blocks.1.1.proj_in.weight": (320, 320)},
        "sdxl": {pre + "label_emb.0.0.weight": (1280, 2816),
                 "conditioner.embedders.1.model.text_projection": (1280, 1280)},
    }
    for family, shapes in cases.items():
        path = tmp_path / f"{family}.safetensors"
        save_file({k: torch.zeros(v, dtype=torch.float16) for k, v in shapes.items()}, str(path))
        layout = recognise_checkpoint(read_safetensors_header(path))
        assert (layout.family, layout.dtype) == (family, "float16")
        # A file this small is not the whole UNet: the count check says so in one line.
        with pytest.raises(UsageError, match=r"parameter unet, but .* has [\d,]+") as err:
            local_model_info(path)
        assert "\n" not in str(err.value)


def test_inpainting_unet_fails_the_count_check(tmp_path):
    shapes = ldm_unet_shapes(in_ch=9)  # SD 1.5 inpainting: 4 latent + 4 masked-image + 1 mask
    path = write_header_only(tmp_path / "inpaint.safetensors", shapes)
    with pytest.raises(UsageError, match=r"859,535,364-parameter unet, but Stable Diffusion 1.5's "
                                         r"has 859,520,964"):
        local_model_info(path)


def test_sdxl_refiner_is_not_taken_for_the_base(tmp_path):
    shapes = {"model.diffusion_model.label_emb.0.0.weight": (1536, 2560)}
    path = write_header_only(tmp_path / "refiner.safetensors", shapes)
    with pytest.raises(UsageError, match="neither SD 1.x, SD 2.x nor SDXL"):
        recognise_checkpoint(read_safetensors_header(path))


@pytest.mark.parametrize("name,make,message", [
    ("empty", lambda p: p.write_bytes(b""), "too short for the 8-byte header length"),
    ("short", lambda p: p.write_bytes(b"\x01\x02\x03"), "too short"),
    ("beyond", lambda p: write_raw(p, b"{}", length=10_000),
     "the header claims 10,000 bytes but only 2 follow"),
    ("huge", lambda p: write_raw(p, b"{}" + b" " * 64, length=2**63),
     "truncated or not a safetensors file"),
    ("json", lambda p: write_raw(p, b'{"a": [1, 2'), "header is not valid JSON"),
    ("binary", lambda p: write_raw(p, b"\xff\xfe\x00\x01"), "header is not valid JSON"),
    ("list", lambda p: write_raw(p, b"[1, 2, 3]"), "header is a JSON list, not an object of tensors"),
    ("entry", lambda p: write_raw(p, b'{"w": {"dtype": "F16", "shape": [2]}}'),
     "entry 'w' is not {dtype, shape, data_offsets}"),
    ("shape", lambda p: write_raw(p, b'{"w": {"dtype": "F16", "shape": "2", "data_offsets": [0, 4]}}'),
     "'w' has dtype 'F16' and shape '2'"),
    ("offsets", lambda p: write_raw(p, b'{"w": {"dtype": "F16", "shape": [2], "data_offsets": [4, 0]}}'),
     "'w' has data_offsets [4, 0]"),
    ("size", lambda p: write_raw(p, b'{"w": {"dtype": "F16", "shape": [2], "data_offsets": [0, 6]}}',
                                 data=b"\0" * 6), "'w' is F16 [2] but spans 6 bytes"),
    ("truncated",
     lambda p: write_raw(p, b'{"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}',
                         data=b"\0" * 100),
     "truncated: tensor 'w' ends at byte 4,000 of the data, which has only 100 bytes"),
    ("metadata", lambda p: write_raw(p, b'{"__metadata__": [1]}'), "__metadata__ is not an object"),
    ("no tensors", lambda p: write_raw(p, b'{"__metadata__": {}}'), "holds no tensors"),
])
def test_malformed_files_are_one_line_usage_errors(tmp_path, name, make, message):
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(UsageError) as err:
        local_model_info(path)
    assert message in str(err.value)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_real_file_cut_short_is_a_truncation_error(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    path = tmp_path / "cut.safetensors"
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    save_file({key: torch.zeros(320, 768, dtype=torch.float16)}, str(path))
    size = path.stat().st_size
    with open(path, "r+b") as f:  # an interrupted download: the data stops halfway
        f.truncate(size // 2)
    with pytest.raises(UsageError, match=r"truncated: tensor .* \(an incomplete download\?\)"):
        local_model_info(path)
    with open(path, "r+b") as f:  # ... or inside the header
        f.truncate(40)
    with pytest.raises(UsageError, match="truncated or not a safetensors file: the header claims"):
        local_model_info(path)


@pytest.mark.parametrize("shapes,message", [
    ({"foo.weight": (3, 3)}, "unknown checkpoint layout (keys like foo.weight)"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}, "a LoRA, not a model"),
    ({"double_blocks.0.img_attn.qkv.weight": (9216, 3072)}, "FLUX / SD3 transformer single file"),
    ({"model.diffusion_model.double_blocks.0.img_attn.qkv.weight": (9216, 3072)}, "a FLUX single-file"),
    ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (4608, 1536)}, "an SD3 / SD3.5"),
    ({"conv_in.weight": (128, 3, 3, 3), "down_blocks.0.resnets.0.conv1.weight": (128, 128, 3, 3)},
     "diffusers-format UNet that is neither"),
    ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_in.weight": (512, 4, 3, 3)},
     "a VAE on its own"),
])
def test_unknown_layouts(tmp_path, shapes, message):
    path = write_header_only(tmp_path / "x.safetensors", shapes)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        local_model_info(path)


def test_other_paths(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"PK")
    with pytest.raises(UsageError, match="give a .safetensors checkpoint or a diffusers folder"):
        local_model_info(ckpt)
    with pytest.raises(UsageError, match="does not exist"):
        local_model_info(tmp_path / "nothing.safetensors")

"""Reading a pipeline from disk for `train`: every component arrives on the device in the dtype
the step keeps it in. Loading diffusers' default float32 and casting on the device put the whole
fp32 model there first (H200: SD 1.5 LoRA in bf16 peaked at 3.85 GiB while loading, 3.22 GiB in
its steps). And the meter keeps loading's peak apart from the steps', which the estimate predicts."""

import pytest
import torch

import vramplan.step.build as build
from vramplan.methods import get_method
from vramplan.models.inventory import load_model_inventories
from vramplan.train.progress import MemoryMeter


def _loaded_dtypes(monkeypatch):
    """component -> the set of floating dtypes its parameters had as read from disk."""
    seen = {}
    real = build.load_component

    def recording(folder, component, **kwargs):
        module = real(folder, component, **kwargs)
        seen[component.name] = {p.dtype for p in module.parameters() if p.is_floating_point()}
        return module

    monkeypatch.setattr(build, "load_component", recording)
    return seen


@pytest.mark.parametrize("method,precision,unet", [
    ("lora", "bf16", torch.bfloat16), ("lora", "fp16", torch.float16), ("full", "bf16", torch.float32),
    ("full", "bf16-pure", torch.bfloat16), ("textual-inversion", "fp16", torch.float16)])
def test_components_are_read_in_the_dtype_the_step_keeps(tiny, kit, monkeypatch, method, precision, unet):
    model, _ = tiny
    seen = _loaded_dtypes(monkeypatch)
    spec = kit.spec(model, method=method, precision=precision, **({"rank": 2} if method == "lora" else {}))
    built = build.build_step(spec, "cpu", weights=model)
    assert seen["unet"] == {unet}, seen        # the tiny pipeline is stored in float32
    low = torch.bfloat16 if precision.startswith("bf16") else torch.float16
    assert seen["text_encoder"] == {low} and seen["vae"] == {low}, seen
    for name, module in built.models.items():  # and none of the frozen weights needed a cast after
        frozen = {p.dtype for p in module.parameters() if not p.requires_grad and p.is_floating_point()}
        assert frozen <= seen[name], (name, frozen, seen[name])


def test_a_trained_text_encoder_is_read_in_the_trained_dtype(tiny, kit):
    spec = kit.spec(tiny[0], method="full", precision="fp16", train_text_encoder=True)
    inventories = load_model_inventories(spec.model)
    method = get_method(spec.method)
    assert build.load_dtype(spec, "text_encoder", method, inventories) is torch.float32
    assert build.load_dtype(spec, "vae", method, inventories) is torch.float16
    lora = kit.spec(tiny[0], method="lora", rank=2, precision="fp16", train_text_encoder=True)
    # LoRA on the text encoder trains adapters, not its weights: those stay 16-bit
    assert build.load_dtype(lora, "text_encoder", get_method(lora.method), inventories) is torch.float16


def test_the_meter_keeps_loading_apart_from_the_steps():
    meter = MemoryMeter("cpu")
    held = b"\x01" * (256 << 20)           # 256 MiB, touched: "loading"
    del held
    meter.start_steps()
    if not meter.split:
        pytest.skip("this kernel does not let a process reset its RSS high-water mark")
    assert meter.load_peak >= 200 << 20
    step = b"\x02" * (64 << 20)
    meter.end_steps()
    del step
    assert 48 << 20 <= meter.peak() < meter.load_peak - (128 << 20)
    later = b"\x03" * (256 << 20)          # after end_steps (saving the result): not a step
    assert meter.peak() < meter.load_peak - (128 << 20)
    del later

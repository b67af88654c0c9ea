"""The peak `train` prints beside its measurement is predicted for the card the run is on: a plan
made for "8GB" names no card, and cuBLAS' and cuDNN's workspaces differ between cards (H200,
SD 1.5 LoRA in bf16: 3.18 GiB predicted for "8GB", 3.23 GiB for the H200, 3.22 GiB measured)."""

from rich.console import Console

from vramplan.estimate import estimate
from vramplan.gpus import CATALOG
from vramplan.profile.result import MeasuredGpu
from vramplan.spec import build_spec
from vramplan.train.run import Run


def _run(spec):
    return Run(spec, spec, options=type("O", (), {"output": "."})(), console=Console(quiet=True))


def test_the_prediction_is_for_the_running_card():
    spec = build_spec({"model": "sd15", "method": "lora", "precision": "bf16", "gpu": "8GB"})
    h200 = MeasuredGpu(name="NVIDIA H200", memory_bytes=CATALOG["h200"].memory_bytes, compute_capability="9.0",
                       catalog_key="h200")
    run = _run(spec)
    for_h200 = estimate(spec.replace(gpu=CATALOG["h200"])).footprint.peak_allocated_bytes
    for_plan = estimate(spec).footprint.peak_allocated_bytes
    assert for_h200 != for_plan              # else this test could not tell them apart
    assert run.predicted_peak(h200) == for_h200
    assert run.predicted_peak() == for_plan  # on the CPU: the plan's


def test_a_card_the_catalog_lacks_is_made_from_what_torch_reports():
    spec = build_spec({"model": "sd15", "method": "lora", "precision": "bf16", "gpu": "8GB"})
    other = MeasuredGpu(name="NVIDIA Made Up", memory_bytes=50 * 2**30, compute_capability="9.0", catalog_key=None)
    from vramplan.profile.validate import gpu_for

    card = gpu_for(other, source="reported by torch")
    assert (card.key, card.memory_bytes, card.bf16) == ("made-up", 50 * 2**30, True)
    assert _run(spec).predicted_peak(other) == estimate(spec.replace(gpu=card)).footprint.peak_allocated_bytes

"""Which recorded graph a spec replays (`traces.graph_for`): FLUX's transformer clips each
block's output to +-65504 in float16 only (diffusers transformer_flux.py), so a bf16 run replays
graphs recorded in bf16 (`ModelInfo.bf16_traces`), an fp16 run the fp16 ones."""

import gzip
import importlib.util
import json
from pathlib import Path

import pytest

from vramplan.estimate import traces
from vramplan.estimate.graph import trace_path
from vramplan.models.catalog import MODELS
from vramplan.spec import build_spec

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("model,precision,component,variant,expected", [
    ("flux-dev", "bf16", "transformer", "amp-frozen", "transformer.amp-frozen-bf16.sdpa"),
    ("flux-dev", "bf16", "transformer", "amp-frozen-keep-attn", "transformer.amp-frozen-keep-attn-bf16.sdpa"),
    ("flux-dev", "bf16-pure", "transformer", "pure-nf4", "transformer.pure-nf4-bf16.sdpa"),
    ("flux-dev", "fp16", "transformer", "amp-frozen", "transformer.amp-frozen.sdpa"),
    ("flux-dev", "fp32", "transformer", "fp32", "transformer.fp32.sdpa"),
    ("flux-dev", "bf16", "text_encoder_2", "pure", "text_encoder_2.pure.sdpa"),
    ("sdxl", "bf16", "unet", "amp-frozen", "unet.amp-frozen.sdpa"),
])
def test_the_graph_a_spec_replays(monkeypatch, model, precision, component, variant, expected):
    asked = []
    monkeypatch.setattr(traces, "load_graph", lambda key, name: asked.append((key, name)))
    traces.graph_for(build_spec({"model": model, "precision": precision}), component, variant)
    assert asked == [(model, expected)]


def _ops(model: str, name: str) -> list[str]:
    with gzip.open(trace_path(model, name), "rt") as f:
        data = json.load(f)
    return [data["opnames"][op[0]] for op in data["ops"]]


def test_flux_clips_in_fp16_only():
    fp16, bf16 = _ops("flux-dev", "transformer.amp-frozen.sdpa"), _ops("flux-dev", "transformer.amp-frozen-bf16.sdpa")
    # one clip per single block (38) and per double block's text stream (19)
    assert fp16.count("clamp.default") - bf16.count("clamp.default") >= 38 + 19
    assert len(bf16) < len(fp16)


def test_every_bf16_graph_is_shipped():
    spec = importlib.util.spec_from_file_location("record_traces", ROOT / "scripts" / "record_traces.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    flagged = [m for m in MODELS.values() if m.bf16_traces]
    assert [m.key for m in flagged] == ["flux-dev"]
    for model in flagged:
        names = [name for name, _ in script.jobs(model) if "-bf16." in name]
        assert len(names) == 2 * (len(script.DENOISER_VARIANTS) - 1)
        assert all(trace_path(model.key, name).exists() for name in names)


@pytest.mark.parametrize("model", ["flux-dev", "sd35-medium", "sd35-large"])
def test_eager_attention_of_dispatcher_models_is_the_math_kernel(model):
    """SD 3 and Flux route attention through diffusers' dispatcher: eager is SDPA's math kernel
    (`step.attention.attention_context`), which keeps the scores; the recorder runs it too."""
    denoiser = MODELS[model].denoiser.name
    for variant in ("amp-frozen", "pure", "amp-frozen-nf4") + (("amp-frozen-bf16",) if MODELS[model].bf16_traces else ()):
        sdpa, eager = (_ops(model, f"{denoiser}.{variant}.{a}") for a in ("sdpa", "eager"))
        fused = [name for name in sdpa if "scaled_dot_product" in name]
        assert fused, variant
        assert not any("scaled_dot_product" in name for name in eager), variant
        assert sum("softmax" in name for name in eager) >= len(fused), variant     # _safe_softmax

"""Which recorded graph a spec replays, and where it comes from.

Catalog models ship their graphs under `vramplan/models/traces/<model>/` (made by
`scripts/record_traces.py`). A graph is named `<component>.<variant>.<attention>`: variant from
`vramplan.precision.graph_variant` (+ `-ti` for a text encoder carrying textual-inversion rows),
attention `sdpa` (xformers keeps the same bytes) or `eager`.
"""

from __future__ import annotations

from vramplan.estimate.graph import Graph, load_graph
from vramplan.models.catalog import MODELS
from vramplan.spec import Attention, TrainingSpec


def attention_name(spec: TrainingSpec) -> str:
    return "eager" if spec.attention is Attention.EAGER else "sdpa"


def graph_for(spec: TrainingSpec, component: str, variant: str) -> Graph:
    """The recorded graph of `component` in `variant`; for a bf16 precision, the graph recorded
    in bf16 where the model has one (`ModelInfo.bf16_traces`: its denoiser's code branches on
    float16; a local folder's are recorded on first use, as the family's catalog model's)."""
    model = spec.model
    local = getattr(model, "local_path", None)
    key = model.key if not local else model.base_model or model.key
    recorded = model if local and not model.base_model else MODELS[key]
    if (component == model.denoiser.name and variant != "fp32" and spec.precision.low_dtype == "bfloat16"
            and recorded.bf16_traces):
        variant += "-bf16"
    name = f"{component}.{variant}.{attention_name(spec)}"
    if local and not model.base_model:
        from vramplan.estimate.local_traces import local_graph

        return local_graph(model, name)
    return load_graph(key, name)

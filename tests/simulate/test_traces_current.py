"""The recorded graphs shipped for the analytic tier are what the recorder makes today.

A few graphs are re-recorded here (seconds each); `python scripts/record_traces.py --check`
re-records all of them (slow) and is marked slow below.
"""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from vramplan.estimate.adapters import TEMPLATES
from vramplan.estimate.graph import trace_path
from vramplan.models.catalog import MODELS
from vramplan.simulate import record_model as rm
from vramplan.simulate.record_templates import record_template, template_key

ROOT = Path(__file__).resolve().parents[2]


def shipped(path: Path) -> dict:
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    data.pop("meta", None)
    return data


def fresh(graph) -> dict:
    data = json.loads(json.dumps(graph.to_json()))
    data.pop("meta", None)
    return data


@pytest.mark.parametrize("name, record", [
    ("unet.amp-frozen.sdpa", lambda m: rm.record_denoiser(m, "amp-frozen", "sdpa")),
    ("text_encoder.amp-frozen-ti.sdpa", lambda m: rm.record_text_encoder(m, "text_encoder", "amp-frozen", "sdpa", True)),
    ("vae.pure.eager", lambda m: rm.record_vae_encode(m, "pure", "eager")),
])
def test_sd15_graphs_are_current(name, record):
    assert fresh(record(MODELS["sd15"])) == shipped(trace_path("sd15", name))


@pytest.mark.parametrize("job", [
    ("lora", "linear3", False, "amp-frozen", "float32", ""),
    ("loha", "conv:k3:s1:p1", True, "amp-frozen", "float16", ""),
    ("lokr", "linear3", True, "fp32", "float32", "w2ab"),
    ("lora", "linear3", False, "amp-frozen-nf4", "float32", ""),
])
def test_layer_templates_are_current(job):
    with gzip.open(TEMPLATES, "rt") as f:
        store = json.load(f)
    expected = store[template_key(*job)]
    expected.pop("meta", None)
    assert fresh(record_template(*job)) == expected


@pytest.mark.slow
def test_every_shipped_graph_is_current():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "record_traces.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:]

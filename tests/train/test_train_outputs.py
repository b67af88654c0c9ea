"""Three steps of each method on the tiny pipeline, and the result read back by diffusers itself:
`load_lora_weights`, `load_textual_inversion`, `from_pretrained`. Each adapter must change the
image a fixed seed generates (lr 1e-2 so that three steps move the weights visibly)."""

import numpy as np
import pytest
from safetensors import safe_open

from vramplan.train import train


@pytest.fixture(scope="module")
def runs(tiny, kit, tmp_path_factory):
    """method -> (spec, TrainResult, output folder), trained once for the module."""
    model, images = tiny
    base = tmp_path_factory.mktemp("runs")
    cases = {
        "lora": dict(method="lora", rank=4),
        "kohya": dict(method="lora", rank=4, train_text_encoder=True),
        "textual-inversion": dict(method="textual-inversion", num_vectors=2),
        "full": dict(method="full"),
        "loha": dict(method="loha", rank=2),
        "lokr": dict(method="lokr", rank=2),
    }
    out = {}
    for name, settings in cases.items():
        spec = kit.spec(model, **settings)
        folder = base / name
        result = train(spec, kit.options(model, images, folder,
                                         save_format="kohya" if name == "kohya" else "diffusers"),
                       kit.console())
        out[name] = (spec, result, folder)
    return out


@pytest.fixture(scope="module")
def reference(tiny, kit):
    model, _ = tiny
    return kit.generate(kit.load(model))


def _differs(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.mark.parametrize("name", ["lora", "kohya", "loha", "lokr"])
def test_adapter_loads_with_load_lora_weights_and_changes_the_image(runs, tiny, kit, reference, name):
    spec, result, folder = runs[name]
    assert result.steps == 3
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    pipe = kit.load(tiny[0])
    pipe.load_lora_weights(str(folder))
    assert _differs(kit.generate(pipe), reference) > 1e-3


def test_lora_file_is_in_diffusers_format(runs):
    _, _, folder = runs["lora"]
    with safe_open(str(folder / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("unet.") for k in keys)
    # convert_state_dict_to_diffusers: to_q.lora_A -> to_q.lora.down
    assert any(k.endswith("to_q.lora.down.weight") for k in keys)


def test_kohya_file_has_kohya_keys_for_unet_and_text_encoder(runs):
    _, _, folder = runs["kohya"]
    with safe_open(str(folder / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
        alpha = f.get_tensor(next(k for k in keys if k.endswith(".alpha")))
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in keys)
    assert any(k.startswith("lora_te1_") for k in keys)
    assert int(alpha) == 4   # the rank: alpha / rank is folded into lora_up


def test_textual_inversion_loads_and_changes_the_image(runs, tiny, kit):
    spec, result, folder = runs["textual-inversion"]
    with safe_open(str(folder / "learned_embeds.safetensors"), "pt") as f:
        assert list(f.keys()) == ["<sks>"]
        assert tuple(f.get_tensor("<sks>").shape) == (2, 32)   # num_vectors x the tiny CLIP's width
    pipe = kit.load(tiny[0])
    before = kit.generate(pipe, "a photo of <sks>")
    pipe.load_textual_inversion(str(folder))
    assert "<sks>_1" in pipe.tokenizer.get_vocab()
    assert _differs(kit.generate(pipe, "a photo of <sks>"), before) > 1e-3


def test_full_finetune_is_a_pipeline_folder(runs, kit, reference):
    _, result, folder = runs["full"]
    assert (folder / "model_index.json").is_file() and (folder / "unet").is_dir()
    assert _differs(kit.generate(kit.load(folder)), reference) > 1e-3


def test_lycoris_native_weights_are_kept(runs):
    for name, prefix in (("loha", "hada_w1_a"), ("lokr", "lokr_w1")):
        _, _, folder = runs[name]
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
            assert any(prefix in k for k in f.keys())
        assert (folder / "adapter_config.json").is_file()


def test_run_marker_says_done(runs):
    import json

    _, result, folder = runs["lora"]
    info = json.loads((folder / "vramplan-run.json").read_text())
    assert info["status"] == "done" and info["steps_done"] == 3
    assert info["files"] == ["pytorch_lora_weights.safetensors"]


def test_prediction_is_reported(runs):
    import json

    _, result, folder = runs["lora"]
    assert result.predicted_peak_bytes and result.predicted_peak_bytes > 0
    assert result.measured_peak_bytes is not None and result.device == "cpu"
    memory = json.loads((folder / "vramplan-run.json").read_text())["memory"]   # for scripts
    assert memory["peak_bytes"] == result.measured_peak_bytes and memory["kind"] == "RSS"
    assert memory["load_peak_bytes"] == result.load_peak_bytes is not None
    assert memory["predicted_peak_bytes"] == result.predicted_peak_bytes and memory["predicted_for"] is None

"""`vramplan fit` with the real analytic estimate: the plan it prints is a plan `estimate --plan`
takes and agrees fits; fixed flags stay; impossible requests say why; emitted command lines and
configs parse; --train runs the chosen plan."""

import json
import shlex

import pytest
import yaml

from vramplan.cli import main
from vramplan.fit import fit_request, search
from vramplan.spec import build_spec, spec_from_json


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_json_round_trips_through_estimate(capsys, tmp_path):
    code, out, _ = run(capsys, "fit", "--model", "sd15", "--method", "lora", "--gpu", "8GB", "--json")
    assert code == 0
    plan = json.loads(out)
    assert plan["model"] == "sd15" and plan["method"] == "lora" and plan["gpu"] == "8GB"
    path = tmp_path / "plan.json"
    path.write_text(out)
    code, out, _ = run(capsys, "estimate", "--plan", path, "--json")
    assert code == 0
    estimate = json.loads(out)
    assert estimate["spec"] == plan and estimate["fits"] is True
    assert spec_from_json(plan).to_json() == plan


def test_fixed_flags_stay_fixed(capsys):
    code, out, _ = run(capsys, "fit", "--model", "sd15", "--method", "lora", "--gpu", "6GB", "--rank", "8",
                       "--optimizer", "adamw", "--precision", "fp16", "--json")
    plan = json.loads(out)
    assert code == 0 and (plan["rank"], plan["optimizer"], plan["precision"]) == (8, "adamw", "fp16")


def test_a_plan_is_where_the_search_starts(capsys, tmp_path):
    code, out, _ = run(capsys, "fit", "--model", "sd15", "--method", "lora", "--gpu", "24GB", "--json")
    roomy = json.loads(out)
    assert code == 0 and not roomy["gradient_checkpointing"]
    path = tmp_path / "plan.json"
    path.write_text(out)
    code, out, _ = run(capsys, "fit", "--plan", path, "--gpu", "3GB", "--json")
    tight = json.loads(out)
    assert code == 0 and tight["gpu"] == "3GB" and tight["method"] == "lora"
    assert tight != {**roomy, "gpu": "3GB"}     # re-searched for the smaller card, not just re-checked


def test_plans_are_ordered_and_each_a_trade_off():
    request = fit_request(build_spec({"model": "sd15", "method": "dreambooth", "gpu": "12GB"}), top=5)
    result = search(request)
    assert result.fits
    choices = [p.choice for p in result.plans]
    assert choices == sorted(choices)                      # preference (lexicographic) order
    for i, later in enumerate(choices):
        for earlier in choices[:i]:                        # no earlier plan at least as good everywhere
            assert any(e > l for e, l in zip(earlier, later))
    for plan in result.plans:
        assert plan.required_bytes <= plan.capacity_bytes
        assert plan.required_bytes >= plan.estimate.footprint.device_used_bytes * 1.03 - 1


def test_nothing_fits_says_why(capsys):
    code, out, _ = run(capsys, "fit", "--model", "sd15", "--method", "full", "--gpu", "4GB",
                       "--optimizer", "adamw", "--json")
    assert code == 1
    answer = json.loads(out)
    assert answer["fits"] is False and answer["shortfall_bytes"] > 0
    constraints = {b["constraint"]: b for b in answer["blockers"]}
    assert "--optimizer adamw" in constraints and "--method full" in constraints
    assert constraints["--method full"]["fits"] is True
    code, out, _ = run(capsys, "fit", "--model", "sd15", "--method", "full", "--gpu", "4GB",
                       "--optimizer", "adamw")
    assert code == 1 and "nothing fits" in out and "short" in out and "--method full" in out


def test_table_and_grid_of_the_winner(capsys):
    code, out, _ = run(capsys, "fit", "--model", "sd15", "--method", "dreambooth", "--gpu", "12GB")
    assert code == 0
    assert "plans fit" in out and "the winner" in out and "1 square = 1 GB" in out
    assert "margin" in out and "estimates" in out


def test_emit_diffusers(capsys):
    code, out, _ = run(capsys, "fit", "--model", "sd15", "--method", "lora", "--gpu", "8GB", "--emit",
                       "diffusers", "--data", "./photos", "--output", "./run", "--steps", "800")
    assert code == 0
    command = shlex.split(" ".join(line for line in out.splitlines() if not line.startswith("#"))
                          .replace("\\", " "))
    assert command[:3] == ["accelerate", "launch", "text_to_image/train_text_to_image_lora.py"]
    flags = {command[i]: command[i + 1] if i + 1 < len(command) and not command[i + 1].startswith("--")
             else True for i in range(3, len(command)) if command[i].startswith("--")}
    assert flags["--pretrained_model_name_or_path"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert flags["--rank"] == "16" and flags["--resolution"] == "512" and flags["--train_batch_size"] == "1"
    assert flags["--mixed_precision"] == "bf16" and flags["--max_train_steps"] == "800"
    assert flags["--train_data_dir"] == "photos" and flags["--output_dir"] == "run"
    assert "--gradient_checkpointing" not in flags


def test_emit_diffusers_dreambooth_sdxl_text_inversion_scripts():
    from vramplan.fit.emit import emit

    cases = {
        ("sd15", "dreambooth"): "dreambooth/train_dreambooth.py",
        ("sdxl", "lora"): "text_to_image/train_text_to_image_lora_sdxl.py",
        ("sd15", "textual-inversion"): "textual_inversion/textual_inversion.py",
        ("flux-dev", "lora"): "dreambooth/train_dreambooth_lora_flux.py",
    }
    for (model, method), script in cases.items():
        spec = build_spec({"model": model, "method": method, "gradient_checkpointing": True,
                           "optimizer": "adamw8bit"})
        text = emit(spec, "diffusers")
        assert script in text
        assert "--gradient_checkpointing" in text and "--use_8bit_adam" in text
    db = emit(build_spec({"model": "sd15", "method": "dreambooth"}), "diffusers")
    assert "--with_prior_preservation" in db and "--class_data_dir" in db and "--instance_prompt" in db


def test_emit_names_what_a_script_cannot_do():
    from vramplan.errors import UsageError
    from vramplan.fit.emit import emit

    text = emit(build_spec({"model": "sd15", "method": "lora", "base_quant": "nf4",
                            "optimizer": "adafactor"}), "diffusers")
    assert "# not expressible: --base-quant nf4" in text and "# not expressible: --optimizer adafactor" in text
    with pytest.raises(UsageError, match="kohya"):
        emit(build_spec({"model": "sd15", "method": "loha"}), "diffusers")


def test_emit_kohya(capsys):
    code, out, _ = run(capsys, "fit", "--model", "sdxl", "--method", "lora", "--gpu", "24GB", "--emit", "kohya",
                       "--top", "1")
    assert code == 0
    assert "sdxl_train_network.py" in out and "--network_module networks.lora" in out
    assert "--network_dim" in out and "--resolution 1024,1024" in out
    from vramplan.fit.emit import emit

    loha = emit(build_spec({"model": "sd15", "method": "loha", "precision": "bf16-pure"}), "kohya")
    assert "lycoris.kohya" in loha and "algo=loha" in loha and "--full_bf16" in loha


def test_emit_accelerate_config_loads(capsys, tmp_path):
    code, out, _ = run(capsys, "fit", "--model", "sd15", "--method", "lora", "--gpu", "rtx2080ti",
                       "--emit", "accelerate")
    assert code == 0
    config = yaml.safe_load(out)
    assert config["mixed_precision"] == "fp16"        # no bf16 on Turing
    assert config["num_processes"] == 1 and config["distributed_type"] == "NO"
    path = tmp_path / "accelerate.yaml"
    path.write_text(out)
    from accelerate.commands.config.config_args import ClusterConfig

    loaded = ClusterConfig.from_yaml_file(str(path))
    assert loaded.mixed_precision == "fp16" and loaded.num_processes == 1


@pytest.mark.parametrize("argv,words", [
    (["--model", "sd15"], "--gpu"),
    (["--gpu", "8GB", "--rank", "8", "--min-rank", "16"], "--min-rank 16 is above --rank 8"),
    (["--gpu", "8GB", "--method", "full", "--min-rank", "4"], "--min-rank applies"),
    (["--gpu", "8GB", "--prefer", "colour"], "--prefer"),
    (["--gpu", "8GB", "--margin", "lots"], "--margin"),
    (["--gpu", "8GB", "--json", "--emit", "kohya"], "give one of them"),
    (["--gpu", "8GB", "--train", "--data", "x"], "--train needs --model-path, --output"),
    (["--gpu", "8GB", "--effective-batch", "3", "--batch-size", "2"], "not a multiple"),
    (["--gpu", "8GB", "--min-resolution", "100"], "--min-resolution"),
])
def test_bad_input(capsys, argv, words):
    code, out, err = run(capsys, "fit", *argv)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1


def test_min_resolution_lowers_the_size_only_when_allowed():
    # sd15 lora without checkpointing or quantization on 4 GB: 768 px needs 4.7 GiB, 512 px 3.2
    spec = build_spec({"model": "sd15", "method": "lora", "gpu": "4GB", "resolution": 768,
                       "gradient_checkpointing": False, "base_quant": "none"})
    fixed = search(fit_request(spec, top=1))
    assert not fixed.fits
    resolution = next(b for b in fixed.blockers if b.constraint.startswith("--resolution"))
    assert resolution.fits and resolution.relaxed.startswith("--resolution ")
    lowered = search(fit_request(spec, min_resolution=256, top=1))
    assert lowered.fits and lowered.best.spec.resolution < (768, 768)
    size = int(resolution.relaxed.split()[1].split("x")[0])
    assert lowered.best.spec.resolution == (size, size)   # the explanation and the search agree


def test_fit_then_train(capsys, tmp_path, tiny_pipeline):
    model, images = tiny_pipeline
    code, out, err = run(capsys, "fit", "--model", model, "--method", "lora", "--rank", "4", "--resolution", "64",
                         "--gpu", "8GB", "--train", "--model-path", model, "--data", images,
                         "--output", tmp_path / "run", "--steps", "1", "--quiet")
    assert code == 0, err
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
    info = json.loads((tmp_path / "run" / "vramplan-run.json").read_text())
    assert info["plan"]["gpu"] == "8GB" and info["plan"]["rank"] == 4

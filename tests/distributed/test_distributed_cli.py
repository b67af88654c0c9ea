"""`vramplan estimate --gpus ... --strategy ...`: the JSON contract's per_gpu and host sections, the
per-GPU grid and panel, the launch files, and every bad input as one line with exit code 2."""

import json

import pytest

from vramplan.cli import main
from vramplan.estimate import estimate
from vramplan.spec import build_spec


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_has_per_gpu_and_host(capsys):
    code, out, err = run(capsys, "estimate", "--model", "sdxl", "--method", "full", "--gpus", "2x24GB",
                         "--strategy", "zero2", "--offload", "optimizer", "--json")
    assert code == 0, err
    data = json.loads(out)
    per_gpu, host = data["per_gpu"], data["host"]
    for key in ("strategy", "offload", "num_gpus", "gpus_per_node", "batch_size_per_gpu",
                "images_per_optimizer_step", "peak_allocated_bytes", "peak_reserved_bytes",
                "device_used_bytes", "categories", "model_states", "single_gpu_peak_allocated_bytes",
                "offload_saved_gpu_bytes", "published", "rules"):
        assert key in per_gpu, key
    for key in ("pinned_bytes_per_gpu", "pageable_bytes_per_gpu", "bytes_per_gpu", "pinned_bytes_per_node",
                "bytes_per_node", "gpus_per_node"):
        assert key in host, key
    # the top-level totals, verdict and grid are one GPU's
    assert data["peak_allocated_bytes"] == per_gpu["peak_allocated_bytes"]
    assert data["gpu"]["memory_bytes"] == 24 * 10**9 and data["fits"] is True
    assert data["spec"]["num_gpus"] == 2 and data["spec"]["strategy"] == "zero2"
    assert per_gpu["offload_saved_gpu_bytes"] > 0 and host["bytes_per_node"] == 2 * host["bytes_per_gpu"] > 0
    # a single-GPU estimate keeps the old contract
    code, out, _ = run(capsys, "estimate", "--json")
    assert "per_gpu" not in json.loads(out) and "host" not in json.loads(out)


def test_terminal_output_draws_the_per_gpu_grid_and_the_strategy_panel(capsys):
    code, out, err = run(capsys, "estimate", "--method", "full", "--gpus", "8xh100", "--strategy", "fsdp")
    assert code == 0, err
    assert "8 GPU(s), fsdp FULL_SHARD" in out
    assert "sharded parameters" in out and "host RAM per node" in out
    assert "batch size is per GPU" in " ".join(out.split())


def test_emit_launch_writes_accelerate_and_deepspeed_files(capsys, tmp_path):
    code, out, err = run(capsys, "estimate", "--method", "full", "--gpus", "4xh100", "--strategy", "zero3",
                         "--emit-launch", str(tmp_path / "launch"), "--json")
    assert code == 0, err
    assert (tmp_path / "launch" / "accelerate.yaml").exists()
    assert json.loads((tmp_path / "launch" / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 3
    assert "launch file written to" in err        # stdout stays pure JSON
    json.loads(out)


def test_plan_round_trip_and_override(capsys, tmp_path):
    code, out, _ = run(capsys, "estimate", "--method", "full", "--gpus", "8xh100", "--strategy", "fsdp",
                       "--fsdp-sharding", "shard-grad-op", "--json")
    plan = tmp_path / "plan.json"
    plan.write_text(out)
    code, out, err = run(capsys, "estimate", "--plan", str(plan), "--gpus", "4xa100-80g", "--strategy", "zero2",
                         "--json")
    assert code == 0, err
    spec = json.loads(out)["spec"]
    assert (spec["num_gpus"], spec["gpu"], spec["strategy"], spec["fsdp_sharding"]) == (4, "a100-80g", "zero2", None)


def test_compare_across_strategies(capsys):
    code, out, err = run(capsys, "compare", "--method", "full", "--gpus", "4xh100",
                         "--strategy", "ddp,fsdp,zero2", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["per_gpu"]["strategy"] for r in rows] == ["ddp", "fsdp", "zero2"]
    peaks = [r["peak_allocated_bytes"] for r in rows]
    assert peaks[0] > peaks[2] > peaks[1]


@pytest.mark.parametrize("argv, message", [
    (["--gpus", "0xh100"], "--gpus: '0xh100' asks for 0 GPUs"),
    (["--gpus", "2xh100,a100"], "mixed card types"),
    (["--gpus", "2xh100", "--method", "textual-inversion", "--strategy", "zero3"], "makes no sense for textual-inversion"),
    (["--gpus", "2xh100", "--strategy", "zero9"], "--strategy: invalid choice 'zero9'"),
    (["--gpus", "2xh100", "--offload", "cpu"], "--offload: invalid choice 'cpu'"),
    (["--offload", "optimizer"], "needs a sharding strategy"),
    (["--gpus", "2xh100", "--gpu", "h100"], "drop --gpu"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    code, out, err = run(capsys, "estimate", *argv)
    assert code == 2 and out == ""
    assert err.startswith("vramplan: error: ") and message in err and err.count("\n") == 1


def test_help_lists_the_new_flags(capsys):
    code, out, _ = run(capsys, "estimate", "--help")
    for flag in ("--gpus", "--strategy", "--fsdp-sharding", "--offload", "--emit-launch"):
        assert flag in out
    squeezed = "".join(out.split())          # argparse wraps lines, at hyphens too
    for choice in ("ddp", "fsdp", "zero1", "zero2", "zero3", "full-shard", "shard-grad-op", "hybrid-shard"):
        assert choice in squeezed


def test_estimate_is_fast_enough_for_fit():
    import time

    spec = build_spec({"model": "sdxl", "method": "full", "gpus": "8xh100", "strategy": "fsdp"})
    estimate(spec)
    started = time.perf_counter()
    estimate(spec)
    assert time.perf_counter() - started < 5

"""The profile store: keys, atomic writes, no silent overwrite, bad files named and skipped."""

import json
import os

import pytest

from vramplan.errors import UsageError
from vramplan.profile.result import SCHEMA, SCHEMA_VERSION, MeasuredGpu, PhaseMeasure, Profile
from vramplan.profile.store import (
    ProfileExists, load_profiles, profile_path, save_profile, spec_key, write_json_atomic,
)
from vramplan.spec import build_spec

H100 = MeasuredGpu("NVIDIA H100 80GB HBM3", 81559 * 2**20, "9.0", "h100")


def cuda_profile(**options) -> Profile:
    spec = build_spec({"method": "lora", "rank": 16, **options})
    return Profile(spec=spec.to_json(), device="cuda", fits=True, peak_allocated_bytes=3_400_000_000,
                   peak_reserved_bytes=3_600_000_000, device_used_bytes=4_000_000_000, gpu=H100, steps=3,
                   phases=(PhaseMeasure("load", 2_000_000_000, 2_100_000_000, 2_600_000_000),
                           PhaseMeasure("forward", 3_400_000_000, 3_600_000_000, 4_000_000_000)),
                   step_seconds=(0.9, 0.4, 0.4), cuda_context_bytes=500_000_000,
                   capacity_bytes=H100.memory_bytes, environment={"driver": "580.159.04"},
                   measured_at="2026-11-25T00:00:00+00:00", notes=("a note",))


def test_round_trip_is_exact(tmp_path):
    profile = cuda_profile()
    path = save_profile(profile, tmp_path)
    assert path == tmp_path / "h100" / f"{spec_key(profile.spec)}.json"
    data = json.loads(path.read_text())
    assert data["schema"] == SCHEMA and data["schema_version"] == SCHEMA_VERSION
    stored, problems = load_profiles(tmp_path)
    assert problems == []
    assert [s.profile for s in stored] == [profile]
    assert stored[0].key == path.stem


def test_key_is_readable_stable_and_ignores_the_card():
    a = build_spec({"method": "lora", "rank": 16, "gradient_checkpointing": True})
    key = spec_key(a.to_json())
    assert key.startswith("sd15-lora-r16-fp16-b1-512-gc-") and len(key.rsplit("-", 1)[1]) == 8
    assert spec_key(a.replace(gpu=None).to_json()) == key
    assert spec_key(build_spec({"method": "lora", "rank": 16, "gradient_checkpointing": True,
                                "gpu": "h100"}).to_json()) == key
    # a knob the slug leaves out still changes the key
    assert spec_key(a.replace(alpha=32.0).to_json()) != key


def test_cpu_and_unknown_cards_get_their_folders(tmp_path):
    cpu = Profile(spec=cuda_profile().spec, device="cpu", fits=True, peak_allocated_bytes=10)
    assert profile_path(tmp_path, cpu).parent.name == "cpu"
    other = Profile(spec=cuda_profile().spec, device="cuda", fits=True, peak_allocated_bytes=10,
                    gpu=MeasuredGpu("NVIDIA GeForce RTX 5090", 32607 * 2**20, "12.0"))
    assert profile_path(tmp_path, other).parent.name == "geforce-rtx-5090"


def test_refuses_to_overwrite_without_force(tmp_path):
    first = cuda_profile()
    path = save_profile(first, tmp_path)
    second = Profile(**{**first.__dict__, "peak_allocated_bytes": 1})
    with pytest.raises(ProfileExists, match="--force") as error:
        save_profile(second, tmp_path)
    assert isinstance(error.value, UsageError) and str(path) in str(error.value)
    assert json.loads(path.read_text())["peak_allocated_bytes"] == first.peak_allocated_bytes
    save_profile(second, tmp_path, force=True)
    assert json.loads(path.read_text())["peak_allocated_bytes"] == 1


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = save_profile(cuda_profile(), tmp_path)
    before = path.read_text()

    def broken_dump(data, out, **kwargs):
        out.write('{"schema": "vramplan.pro')   # half a file, then the disk fills
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", broken_dump)
    with pytest.raises(OSError):
        write_json_atomic(path, {"anything": 1})
    assert path.read_text() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_a_failed_rename_leaves_no_temporary(tmp_path, monkeypatch):
    def broken_replace(src, dst):
        raise OSError("cross-device link")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        save_profile(cuda_profile(), tmp_path)
    assert list((tmp_path / "h100").iterdir()) == []


def test_bad_files_are_named_and_skipped(tmp_path):
    good = save_profile(cuda_profile(), tmp_path)
    folder = good.parent
    (folder / "corrupt.json").write_text('{"schema": "vramplan.profile", ')
    (folder / "foreign.json").write_text(json.dumps({"name": "something else"}))
    (folder / "list.json").write_text("[1, 2]")
    newer = cuda_profile().to_json() | {"schema_version": SCHEMA_VERSION + 1}
    (folder / "newer.json").write_text(json.dumps(newer))
    broken = cuda_profile().to_json()
    del broken["fits"]
    (folder / "broken.json").write_text(json.dumps(broken))
    bad_size = cuda_profile().to_json() | {"peak_allocated_bytes": "lots"}
    (folder / "bad-size.json").write_text(json.dumps(bad_size))
    (folder / "notes.txt").write_text("not a profile, not a .json: ignored")

    stored, problems = load_profiles(tmp_path)
    assert [s.path for s in stored] == [good]
    named = {line.split(":")[0].rsplit("/", 1)[-1]: line for line in problems}
    assert set(named) == {"corrupt.json", "foreign.json", "list.json", "newer.json", "broken.json",
                          "bad-size.json"}
    assert "not valid JSON" in named["corrupt.json"]
    assert "not a vramplan profile" in named["foreign.json"]
    assert "schema version" in named["newer.json"]
    assert "fits" in named["broken.json"]
    assert all(line.endswith("skipped") for line in problems)


def test_a_missing_store_is_a_problem_not_a_crash(tmp_path):
    stored, problems = load_profiles(tmp_path / "nowhere")
    assert stored == [] and len(problems) == 1 and "no such folder" in problems[0]

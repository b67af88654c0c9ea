"""Campaigns: the TOML matrix, the run loop (budget, stored cases, out-of-memory, failures) and
the forked process each CUDA case runs in -- with stand-in measurements, no GPU."""

import time
from pathlib import Path

import pytest

import vramplan.profile.campaign as campaign
import vramplan.profile.measure as measure
from vramplan.errors import UsageError
from vramplan.profile.campaign import Status, read_matrix, run_campaign
from vramplan.profile.result import MeasuredGpu, Profile
from vramplan.profile.store import save_profile

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "examples" / "matrix-quick.toml"
H100 = MeasuredGpu("NVIDIA H100 80GB HBM3", 81559 * 2**20, "9.0", "h100")


def write(tmp_path, text) -> Path:
    path = tmp_path / "m.toml"
    path.write_text(text)
    return path


def test_the_quick_matrix_covers_what_the_issue_asks():
    matrix = read_matrix(QUICK)
    specs = [c.spec for c in matrix.cases]
    assert {s.model.key for s in specs} == {"sd15", "sdxl"}
    assert {s.method.value for s in specs} == {"full", "dreambooth", "lora", "loha", "lokr",
                                               "textual-inversion", "hypernetwork"}
    for model in ("sd15", "sdxl"):
        mine = [s for s in specs if s.model.key == model]
        assert {s.method.value for s in mine} == {"full", "dreambooth", "lora", "loha", "lokr",
                                                  "textual-inversion", "hypernetwork"}
        assert {s.precision.value for s in mine} == {"fp32", "fp16", "bf16"}
        assert {s.gradient_checkpointing for s in mine} == {False, True}
    assert {s.batch_size for s in specs} >= {1, 2, 4}
    assert len({c.key for c in matrix.cases}) == len(matrix.cases)   # a spec listed twice runs once
    assert matrix.steps == 3 and matrix.budget_seconds == 420
    # every method of both models comes before the rest: a cut-short campaign still covers them
    first = [(s.model.key, s.method.value) for s in specs[:14]]
    assert len(set(first)) == 14


def test_axes_fixed_values_and_layers(tmp_path):
    matrix = read_matrix(write(tmp_path, """
[[matrix]]
name = "hn"
method = "hypernetwork"
hypernetwork-layers = [[1, 2, 1], [1, 4, 1]]
batch_size = [1, 2]

[[matrix]]
method = "hypernetwork"
hypernetwork_layers = [1, 2, 1]
batch_size = 1
"""))
    assert [c.label for c in matrix.cases] == [
        "hypernetwork_layers=1,2,1 batch_size=1", "hypernetwork_layers=1,2,1 batch_size=2",
        "hypernetwork_layers=1,4,1 batch_size=1", "hypernetwork_layers=1,4,1 batch_size=2"]
    assert matrix.name == "m" and matrix.steps is None


@pytest.mark.parametrize("text, message", [
    ("[[matrix]]\nmethod = 'lora'\nwidth = 3\n", "'block 1': unknown setting"),
    ("[[matrix]]\nname = 'x'\nmethod = ['full', 'lora']\nrank = 4\n", "'x', method=full: --rank does not apply"),
    ("[[matrix]]\nmethod = []\n", "gives no case"),
    ("[campaign]\nsteps = 1\n[[matrix]]\nmethod = 'lora'\n", "steps must be"),
    ("[campaign]\nbudget = 5\n[[matrix]]\nmethod = 'lora'\n", "unknown [campaign] key"),
    ("[campaign]\nname = 'x'\n", "no [[matrix]] block"),
    ("[matrices]\n", "unknown table"),
    ("[[matrix]\n", "not valid TOML"),
])
def test_bad_matrices_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(UsageError, match="--matrix") as error:
        read_matrix(write(tmp_path, text))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_missing_matrix_file(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        read_matrix(tmp_path / "none.toml")


# -- the run loop --------------------------------------------------------------------------------

def fake_profile(spec, fits=True) -> Profile:
    return Profile(spec=spec.to_json(), device="cuda", fits=fits, peak_allocated_bytes=2**30,
                   peak_reserved_bytes=2**30, device_used_bytes=2**30, gpu=H100,
                   capacity_bytes=H100.memory_bytes, oom_phase=None if fits else "backward",
                   oom_message=None if fits else "CUDA out of memory.")


@pytest.fixture
def four_cases(tmp_path):
    return read_matrix(write(tmp_path, "[[matrix]]\nmethod = 'lora'\nbatch_size = [1, 2, 3, 4]\n"))


@pytest.fixture
def on_an_h100(monkeypatch):
    monkeypatch.setattr(measure, "store_folder", lambda device: "h100")
    monkeypatch.setattr(campaign, "_import_ahead", lambda matrix: None)


def test_oom_and_failures_do_not_stop_the_campaign(tmp_path, four_cases, on_an_h100, monkeypatch):
    def run_case(case, device, steps, timeout):
        b = case.spec.batch_size
        if b == 2:
            return campaign._measured(case, fake_profile(case.spec, fits=False))
        if b == 3:
            return campaign.Outcome(case, Status.FAILED, message="RuntimeError: a bug")
        return campaign._measured(case, fake_profile(case.spec))

    monkeypatch.setattr(campaign, "_run_case", run_case)
    store = tmp_path / "profiles"
    seen = []
    result = run_campaign(four_cases, "cuda", store, steps=3, report=lambda i, n, item: seen.append((i, n, item)))
    assert [o.status for o in result.outcomes] == [Status.MEASURED, Status.OUT_OF_MEMORY, Status.FAILED,
                                                   Status.MEASURED]
    assert sorted(p.name for p in (store / "h100").iterdir()) == sorted(
        o.path.name for o in result.outcomes if o.path is not None)
    assert len(list((store / "h100").iterdir())) == 3          # the OOM is stored, the failure is not
    assert result.outcomes[1].message.startswith("in backward")
    assert [i for i, n, item in seen] == [1, 1, 2, 2, 3, 3, 4, 4]


def test_stored_cases_are_skipped_unless_forced(tmp_path, four_cases, on_an_h100, monkeypatch):
    store = tmp_path / "profiles"
    save_profile(fake_profile(four_cases.cases[0].spec), store)
    ran = []
    monkeypatch.setattr(campaign, "_run_case",
                        lambda case, *a: ran.append(case) or campaign._measured(case, fake_profile(case.spec)))
    result = run_campaign(four_cases, "cuda", store, steps=3)
    assert result.outcomes[0].status is Status.STORED and len(ran) == 3
    ran.clear()
    result = run_campaign(four_cases, "cuda", store, steps=3, force=True)
    assert result.count(Status.MEASURED) == 4 and len(ran) == 4


def test_the_budget_stops_between_cases(tmp_path, four_cases, on_an_h100, monkeypatch):
    def slow(case, *args):
        time.sleep(0.4)
        return campaign._measured(case, fake_profile(case.spec))

    monkeypatch.setattr(campaign, "_run_case", slow)
    result = run_campaign(four_cases, "cuda", tmp_path, steps=3, budget_seconds=1.0)
    # after two cases of 0.4 s another would end past 1 s: it is not started
    assert [o.status for o in result.outcomes] == [Status.MEASURED, Status.MEASURED, Status.NOT_RUN,
                                                   Status.NOT_RUN]


# -- the forked case -----------------------------------------------------------------------------

def test_each_cuda_case_runs_in_a_forked_process(tmp_path, four_cases, on_an_h100, monkeypatch):
    import os

    parent = os.getpid()

    def measure_cuda(spec, steps):
        # runs in the child: the stand-in is inherited through fork
        assert os.getpid() != parent
        if spec.batch_size == 2:
            return fake_profile(spec, fits=False)
        if spec.batch_size == 3:
            raise RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR")
        if spec.batch_size == 4:
            os._exit(9)   # a crash that sends nothing back
        return fake_profile(spec)

    monkeypatch.setattr(measure, "measure_cuda", measure_cuda)
    result = run_campaign(four_cases, "cuda", tmp_path, steps=3)
    statuses = [o.status for o in result.outcomes]
    assert statuses == [Status.MEASURED, Status.OUT_OF_MEMORY, Status.FAILED, Status.FAILED]
    assert result.outcomes[0].profile == fake_profile(four_cases.cases[0].spec)
    assert "CUDNN_STATUS_INTERNAL_ERROR" in result.outcomes[2].message
    assert "died" in result.outcomes[3].message


def test_a_stuck_case_is_stopped(tmp_path, four_cases, monkeypatch):
    def stuck(spec, steps):
        time.sleep(60)

    monkeypatch.setattr(measure, "measure_cuda", stuck)
    started = time.monotonic()
    outcome = campaign._run_isolated(four_cases.cases[0], 3, timeout=0.5)
    assert outcome.status is Status.FAILED and "stopped" in outcome.message
    assert time.monotonic() - started < 20


def test_cuda_poisoned_before_the_fork_falls_back_to_new_interpreters(tmp_path, four_cases, monkeypatch):
    def poisoned(spec, steps):
        raise RuntimeError("Cannot re-initialize CUDA in forked subprocess. To use CUDA with "
                           "multiprocessing, you must use the 'spawn' start method")

    monkeypatch.setattr(measure, "measure_cuda", poisoned)
    monkeypatch.setattr(campaign, "_start_method", "fork")
    outcome = campaign._run_case(four_cases.cases[0], "cuda", 2, timeout=120)
    assert campaign._start_method == "spawn"
    # the new interpreter ran the real measurement, which on this CPU-only machine finds no CUDA
    assert outcome.status is Status.FAILED and "forked subprocess" not in outcome.message


def test_check_first_stops_when_the_first_case_fails_and_only_then(tmp_path, four_cases, on_an_h100,
                                                                   monkeypatch):
    failing = {1}

    def run_case(case, device, steps, timeout):
        if case.spec.batch_size in failing:
            return campaign.Outcome(case, Status.FAILED, message="ImportError: no diffusers")
        return campaign._measured(case, fake_profile(case.spec, fits=case.spec.batch_size != 2))

    monkeypatch.setattr(campaign, "_run_case", run_case)
    result = run_campaign(four_cases, "cuda", tmp_path / "a", steps=3, check_first=True)
    assert [o.status for o in result.outcomes] == [Status.FAILED] + [Status.NOT_RUN] * 3
    assert result.outcomes[1].message == "the first case failed"
    # without the check a broken first case does not stop the campaign
    result = run_campaign(four_cases, "cuda", tmp_path / "b", steps=3)
    assert [o.status for o in result.outcomes][1:] == [Status.OUT_OF_MEMORY, Status.MEASURED, Status.MEASURED]
    # a later failure does not stop it either; an out-of-memory first is no failure
    failing = {3}
    result = run_campaign(four_cases, "cuda", tmp_path / "c", steps=3, check_first=True)
    assert [o.status for o in result.outcomes] == [Status.MEASURED, Status.OUT_OF_MEMORY, Status.FAILED,
                                                   Status.MEASURED]
    # the first case *run* is the check: one stored already is skipped and does not count
    failing = {2}
    save_profile(fake_profile(four_cases.cases[0].spec), tmp_path / "d")
    result = run_campaign(four_cases, "cuda", tmp_path / "d", steps=3, check_first=True)
    assert [o.status for o in result.outcomes] == [Status.STORED, Status.FAILED, Status.NOT_RUN,
                                                   Status.NOT_RUN]


def test_a_failing_case_prints_its_whole_traceback(tmp_path, four_cases, on_an_h100, monkeypatch, capfd):
    def broken(spec, steps):
        def deep():
            raise ValueError("the real cause")
        deep()

    monkeypatch.setattr(measure, "measure_cuda", broken)
    outcome = campaign._run_isolated(four_cases.cases[0], 3, timeout=60)
    assert outcome.status is Status.FAILED and outcome.message.startswith("ValueError: the real cause")
    err = capfd.readouterr().err
    assert "Traceback" in err and "in deep" in err and "in broken" in err

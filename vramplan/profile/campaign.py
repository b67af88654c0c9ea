"""A measurement campaign: the specs of a TOML matrix, profiled one after another into the store.

    [campaign]
    name = "quick"
    steps = 3                 # steps per case (default 3)
    budget_seconds = 420      # start no case that would end after this (--budget overrides)

    [[matrix]]                # one cartesian product; a list is an axis, anything else fixed
    name = "sd15 methods"
    model = "sd15"
    method = ["full", "lora", "loha"]
    precision = "fp16"
    gradient_checkpointing = [false, true]

Keys are the spec's field names (`vramplan estimate --help`), with `_` or `-`. A list is one value
only for `hypernetwork_layers` when it holds numbers (`[1, 2, 1]`); a list of such lists is an axis.
Every combination is validated before anything runs; a spec listed twice runs once.

On CUDA each case runs in a process forked from this one (torch and diffusers imported once,
CUDA never initialised here): every case starts from a fresh CUDA context and an empty caching
allocator, as a training run does, and a case that runs out of memory or hangs cannot disturb
the next. An out-of-memory is stored as a measured "does not fit"; the campaign goes on.
"""

from __future__ import annotations

import itertools
import time
import traceback
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable

from vramplan.errors import UsageError
from vramplan.profile.result import Profile
from vramplan.profile.store import ProfileExists, profile_path, save_profile, spec_key
from vramplan.spec import TrainingSpec, build_spec

CAMPAIGN_KEYS = {"name", "steps", "budget_seconds"}
CASE_TIMEOUT_SECONDS = 300      # one case longer than this is stuck, not slow
JOIN_SECONDS = 30


@dataclass(frozen=True)
class Case:
    block: str
    label: str                  # the block's varied values, "method=lora precision=bf16"
    spec: TrainingSpec

    @property
    def key(self) -> str:
        return spec_key(self.spec.to_json())


@dataclass(frozen=True)
class Matrix:
    path: Path
    name: str
    cases: tuple[Case, ...]
    steps: int | None = None
    budget_seconds: float | None = None


class Status(str, Enum):
    MEASURED = "measured"
    OUT_OF_MEMORY = "out of memory"
    STORED = "stored already"
    FAILED = "failed"
    NOT_RUN = "not run"          # the budget, or --check-first after the first case failed


@dataclass
class Outcome:
    case: Case
    status: Status
    path: Path | None = None
    profile: Profile | None = None
    message: str = ""
    seconds: float = 0.0


@dataclass
class CampaignResult:
    matrix: Matrix
    outcomes: list = field(default_factory=list)
    seconds: float = 0.0

    def count(self, status: Status) -> int:
        return sum(o.status is status for o in self.outcomes)


# -- reading the matrix --------------------------------------------------------------------------

def read_matrix(path: Path | str) -> Matrix:
    path = Path(path)
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise UsageError("--matrix needs Python 3.11 or newer (tomllib)") from None
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--matrix: {str(path)!r} does not exist") from None
    except OSError as error:
        raise UsageError(f"--matrix: cannot read {str(path)!r}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"--matrix: {path} is not valid TOML: {error}") from None
    campaign = data.get("campaign", {})
    if not isinstance(campaign, dict):
        raise UsageError(f"--matrix: {path}: [campaign] must be a table")
    unknown = set(campaign) - CAMPAIGN_KEYS
    if unknown:
        raise UsageError(f"--matrix: {path}: unknown [campaign] key(s) {', '.join(sorted(unknown))} "
                         f"(known: {', '.join(sorted(CAMPAIGN_KEYS))})")
    unknown = set(data) - {"campaign", "matrix"}
    if unknown:
        raise UsageError(f"--matrix: {path}: unknown table(s) {', '.join(sorted(unknown))}: "
                         f"write [campaign] and [[matrix]] blocks")
    blocks = data.get("matrix")
    if not isinstance(blocks, list) or not blocks:
        raise UsageError(f"--matrix: {path} has no [[matrix]] block")
    cases, keys = [], set()
    for number, block in enumerate(blocks, 1):
        name = str(block.get("name", f"block {number}"))
        for label, options in _combinations(block):
            try:
                spec = build_spec(options)
            except UsageError as error:
                where = f"[[matrix]] {name!r}" + (f", {label}" if label else "")
                raise UsageError(f"--matrix: {path}: {where}: {error}") from None
            case = Case(block=name, label=label, spec=spec)
            if case.key not in keys:
                keys.add(case.key)
                cases.append(case)
    steps = campaign.get("steps")
    budget = campaign.get("budget_seconds")
    if steps is not None and (not isinstance(steps, int) or steps < 2):
        raise UsageError(f"--matrix: {path}: [campaign] steps must be a whole number >= 2")
    if budget is not None and (not isinstance(budget, (int, float)) or budget <= 0):
        raise UsageError(f"--matrix: {path}: [campaign] budget_seconds must be a positive number")
    return Matrix(path=path, name=str(campaign.get("name", path.stem)), cases=tuple(cases),
                  steps=steps, budget_seconds=None if budget is None else float(budget))


def _combinations(block: dict) -> list[tuple[str, dict]]:
    axes = []
    for raw_key, value in block.items():
        if raw_key == "name":
            continue
        key = raw_key.replace("-", "_")
        if isinstance(value, list) and not (key == "hypernetwork_layers"
                                            and all(isinstance(v, (int, float)) for v in value)):
            if not value:
                raise UsageError(f"--matrix: {key} = [] gives no case")
            axes.append((key, value, True))
        else:
            axes.append((key, [value], False))
    combos = []
    for chosen in itertools.product(*(values for _, values, _ in axes)):
        label = " ".join(f"{key}={_show(v)}" for (key, _, varied), v in zip(axes, chosen) if varied)
        combos.append((label, {key: v for (key, _, _), v in zip(axes, chosen)}))
    return combos


def _show(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


# -- running it ----------------------------------------------------------------------------------

Report = Callable[[int, int, "Outcome | Case"], None]


def run_campaign(matrix: Matrix, device: str, root: Path, *, steps: int, force: bool = False,
                 budget_seconds: float | None = None, report: Report | None = None,
                 check_first: bool = False) -> CampaignResult:
    """Profile every case of `matrix` into `root`. `report(i, n, case)` is called as a case starts
    and `report(i, n, outcome)` when it ends. Cases stored already are skipped unless `force`.
    `check_first`: the first case run is a check of the environment -- if it fails (an
    out-of-memory is a measurement, not a failure) the campaign stops there, so a broken install
    costs one case of a lent GPU's time, not every case's; later failures do not stop it."""
    from vramplan.profile.measure import check_steps, store_folder

    check_steps(steps)
    report = report or (lambda i, n, item: None)
    started = time.monotonic()
    result = CampaignResult(matrix)
    gpu_key = store_folder(device)
    if device == "cuda":
        _import_ahead(matrix)
    longest = 0.0
    total = len(matrix.cases)
    for number, case in enumerate(matrix.cases, 1):
        elapsed = time.monotonic() - started
        if budget_seconds is not None and elapsed + longest > budget_seconds:
            for rest in matrix.cases[number - 1:]:
                result.outcomes.append(Outcome(rest, Status.NOT_RUN, message="budget"))
            break
        path = Path(root) / gpu_key / f"{case.key}.json" if gpu_key else None
        if path is not None and path.exists() and not force:
            outcome = Outcome(case, Status.STORED, path, message="--force measures it again")
            result.outcomes.append(outcome)
            report(number, total, outcome)
            continue
        report(number, total, case)
        case_started = time.monotonic()
        timeout = CASE_TIMEOUT_SECONDS
        if budget_seconds is not None:
            timeout = max(min(timeout, budget_seconds - elapsed), 10.0)
        outcome = _run_case(case, device, steps, timeout)
        outcome.seconds = time.monotonic() - case_started
        longest = max(longest, outcome.seconds)
        if outcome.profile is not None:
            try:
                outcome.path = save_profile(outcome.profile, root, force=force)
            except ProfileExists as error:   # the card was not known before measuring
                outcome = Outcome(case, Status.STORED, profile_path(root, outcome.profile),
                                  message=str(error), seconds=outcome.seconds)
        result.outcomes.append(outcome)
        report(number, total, outcome)
        first = sum(o.status is not Status.STORED for o in result.outcomes) == 1
        if check_first and first and outcome.status is Status.FAILED:
            result.outcomes.extend(Outcome(rest, Status.NOT_RUN, message="the first case failed")
                                   for rest in matrix.cases[number:])
            break
    result.seconds = time.monotonic() - started
    return result


def _import_ahead(matrix: Matrix) -> None:
    """Import the model classes and peft once here, so that forked cases do not each pay it."""
    import importlib

    import peft  # noqa: F401
    import torch  # noqa: F401

    import vramplan.step.build  # noqa: F401

    for case in matrix.cases:
        for component in case.spec.model.components:
            library = importlib.import_module(component.library)
            getattr(library, component.cls, None)


def _run_case(case: Case, device: str, steps: int, timeout: float) -> Outcome:
    if device == "cpu":
        from vramplan.profile.measure import profile

        try:
            measured = profile(case.spec, "cpu", steps)
        except UsageError as error:
            return Outcome(case, Status.FAILED, message=str(error))
        except Exception as error:  # noqa: BLE001 - one broken case must not end the campaign
            return Outcome(case, Status.FAILED, message=f"{type(error).__name__}: {error}")
        return _measured(case, measured)
    global _start_method
    outcome = _run_isolated(case, steps, timeout, _start_method)
    if _start_method == "fork" and "forked subprocess" in outcome.message:
        # Something in this process initialised CUDA before the fork (torch then refuses CUDA in
        # the child): start each case as a new interpreter from now on, slower but clean.
        _start_method = "spawn"
        outcome = _run_isolated(case, steps, timeout, _start_method)
    return outcome


_start_method = "fork"


def _measured(case: Case, measured: Profile) -> Outcome:
    if measured.fits:
        return Outcome(case, Status.MEASURED, profile=measured)
    return Outcome(case, Status.OUT_OF_MEMORY, profile=measured,
                   message=f"in {measured.oom_phase}: {measured.oom_message or ''}".strip())


def _run_isolated(case: Case, steps: int, timeout: float, method: str = "fork") -> Outcome:
    """`measure_cuda` for one case in a child process ("fork": this one's imports, no CUDA;
    "spawn": a new interpreter); its profile comes back through a pipe."""
    import multiprocessing

    context = multiprocessing.get_context(method)
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_case_child, args=(case.spec.to_json(), steps, sender), daemon=True)
    child.start()
    sender.close()
    try:
        if not receiver.poll(timeout):
            child.kill()
            child.join(JOIN_SECONDS)
            return Outcome(case, Status.FAILED, message=f"no result after {timeout:.0f} s: stopped")
        kind, payload = receiver.recv()
    except EOFError:
        child.join(JOIN_SECONDS)
        return Outcome(case, Status.FAILED, message=f"the case's process died (exit code {child.exitcode})")
    finally:
        receiver.close()
    child.join(JOIN_SECONDS)
    if child.is_alive():
        child.kill()
        child.join(JOIN_SECONDS)
    if kind == "profile":
        return _measured(case, Profile.from_json(payload))
    return Outcome(case, Status.FAILED, message=payload)


def _case_child(spec_json: dict, steps: int, sender) -> None:
    try:
        from vramplan.profile import measure
        from vramplan.spec import spec_from_json

        sender.send(("profile", measure.measure_cuda(spec_from_json(spec_json), steps).to_json()))
    except UsageError as error:
        sender.send(("error", str(error)))
    except BaseException as error:  # noqa: BLE001 - reported to the parent, which goes on
        traceback.print_exc()   # the whole traceback to the campaign's log; the parent gets one line
        last = traceback.extract_tb(error.__traceback__)[-1:] if error.__traceback__ else []
        where = f" at {last[0].filename}:{last[0].lineno}" if last else ""
        sender.send(("error", f"{type(error).__name__}: {error}{where}"[:2000]))
    finally:
        sender.close()

"""What `vramplan train` is given, checked before anything heavy is imported.

Every bad input ends as one `UsageError` line (exit 2): a missing or empty data folder, a model
folder that is not a diffusers pipeline or not the plan's architecture, an output folder that
already holds a run (or other files), DreamBooth without class images, a textual-inversion
prompt without its token.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from vramplan.errors import UsageError
from vramplan.spec import Method, TrainingSpec

RUN_FILE = "vramplan-run.json"
SAVE_FORMATS = ("diffusers", "kohya")


@dataclass(frozen=True)
class TrainOptions:
    model_path: Path
    data: Path
    output: Path
    steps: int = 500
    instance_prompt: str | None = None
    class_data: Path | None = None
    class_prompt: str | None = None
    placeholder_token: str = "<sks>"
    initializer_token: str | None = None
    learning_rate: float | None = None
    seed: int = 0
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    resume: bool = False
    overwrite: bool = False
    save_format: str = "diffusers"
    device: str = "auto"
    progress: bool = True
    checkpoint_config: Path | None = None   # a single-file --model's configs and tokenizers

    def check(self) -> None:
        if self.steps < 1:
            raise UsageError(f"--steps: {self.steps} is too small (at least 1)")
        if self.checkpoint_every < 0:
            raise UsageError(f"--checkpoint-every: {self.checkpoint_every} must be 0 (never) or more")
        if self.keep_checkpoints < 0:
            raise UsageError(f"--keep-checkpoints: {self.keep_checkpoints} must be 0 (all) or more")
        if self.save_format not in SAVE_FORMATS:
            raise UsageError(f"--save-format: {self.save_format!r} is not one of {', '.join(SAVE_FORMATS)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"--device: {self.device!r} is not auto, cpu or cuda")
        if self.resume and self.overwrite:
            raise UsageError("--resume continues the run in the output folder, --overwrite starts it "
                             "again: give one of them")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise UsageError(f"--learning-rate: {self.learning_rate:g} must be > 0")


def local_model(path: Path):
    """The folder's ModelInfo (a diffusers pipeline with model_index.json)."""
    from vramplan.models.resolve import resolve_model

    path = Path(path)
    if not path.exists():
        raise UsageError(f"--model: {str(path)!r} does not exist")
    if path.is_file():   # train converts single files first (vramplan/train/single_file.py)
        raise UsageError(f"--model: {str(path)!r} is a file, not a diffusers pipeline folder")
    if not (path / "model_index.json").is_file():
        raise UsageError(f"--model: {str(path)!r} is not a diffusers pipeline folder (no model_index.json)")
    return resolve_model(str(path))


def check_model(spec: TrainingSpec, path: Path):
    """The folder must have the plan's architecture: same family, same parameter counts."""
    from vramplan.models.inventory import load_model_inventories

    folder = local_model(path)
    plan = spec.model
    if getattr(plan, "local_path", None) and Path(plan.local_path).resolve() == Path(path).resolve():
        return folder
    if folder.family != plan.family:
        raise UsageError(f"the plan is for {plan.name} ({plan.family}) but --model {str(path)!r} is a "
                         f"{folder.family} pipeline: make the plan with --model {path}")
    ours, theirs = load_model_inventories(folder), load_model_inventories(plan)
    for component in plan.components:
        if component.name not in ours:
            raise UsageError(f"--model {str(path)!r} has no {component.name}, which the plan's "
                             f"{plan.name} has")
        a, b = ours[component.name].total_params, theirs[component.name].total_params
        if a != b:
            raise UsageError(f"the plan is for {plan.name}, whose {component.name} has {b:,} parameters, "
                             f"but the one in {str(path)!r} has {a:,}: make the plan with --model {path}")
    return folder


def check_data(spec: TrainingSpec, options: TrainOptions) -> None:
    from vramplan.train.data import image_files

    image_files(options.data, "--data")
    if spec.prior_preservation:
        if options.class_data is None:
            raise UsageError("the plan trains with prior preservation: give --class-data (a folder of class "
                             "images) and --class-prompt")
        image_files(options.class_data, "--class-data")
        if not options.class_prompt:
            raise UsageError("--class-data needs --class-prompt (e.g. 'a photo of a dog')")
    elif options.class_data is not None:
        raise UsageError("--class-data is for plans with prior preservation (dreambooth, or "
                         "--prior-preservation)")
    if spec.method is Method.TEXTUAL_INVERSION:
        token = options.placeholder_token
        if not token or any(c.isspace() for c in token):
            raise UsageError(f"--placeholder-token {token!r} must be one word without spaces, e.g. '<sks>'")
        if options.instance_prompt is not None and token not in options.instance_prompt:
            raise UsageError(f"--instance-prompt {options.instance_prompt!r} must contain the placeholder "
                             f"token {token!r}")


def read_run(output: Path) -> dict | None:
    path = Path(output) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UsageError(f"{path} is not readable JSON ({error}); remove it or choose another --output") from None


def check_output(spec: TrainingSpec, options: TrainOptions) -> dict | None:
    """The existing run to resume, or None for a new one (raising where the folder is taken)."""
    output = Path(options.output)
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output: {str(output)!r} is a file, not a folder")
    entries = [e for e in output.iterdir()] if output.is_dir() else []
    run = read_run(output) if entries else None
    if options.resume:
        if run is None:
            raise UsageError(f"--resume: {str(output)!r} holds no vramplan run to continue")
        if run.get("plan") != spec.to_json():
            raise UsageError(f"--resume: the run in {str(output)!r} was started with a different plan; "
                             f"give the same --plan, or --overwrite to start again")
        return run
    if not entries:
        return None
    if run is None:
        raise UsageError(f"--output: {str(output)!r} is not empty and holds no vramplan run: choose an "
                         f"empty or new folder")
    if not options.overwrite:
        raise UsageError(f"--output: {str(output)!r} already holds a run: --resume to continue it or "
                         f"--overwrite to start again")
    return None


def write_run(output: Path, data: dict) -> None:
    output.mkdir(parents=True, exist_ok=True)
    tmp = output / f".tmp-{RUN_FILE}"
    tmp.write_text(json.dumps(data, indent=2))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, output / RUN_FILE)

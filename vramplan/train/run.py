"""A real fine-tune of a plan: the shared training step (`build_step`) on real weights and images.

    train(spec, TrainOptions(model_path=..., data=..., output=...))

1. Check every input (vramplan.train.inputs) before importing torch.
2. Seed torch, Python and NumPy (`--seed`); with cached latents / text embeddings, encode them
   first with the VAE / text encoders alone, which then leave the device.
3. Build the step from the plan with the folder's weights: `build_step(spec, device,
   weights=folder)`, the same step `simulate` traces and `profile` measures. Device: CUDA when
   there is one (the GPU of `LOCAL_RANK` under `accelerate launch`), else the CPU.
4. Each optimizer step runs `gradient_accumulation_steps` micro-steps of real batches; every
   `--checkpoint-every` steps a checkpoint is written atomically; `--resume` restores the last.
5. Save the result (vramplan.train.save), print the predicted peak (the analytic estimate of the
   plan) beside the measured one, and hand the measurement to the profile store if it exists.

A plan for several GPUs runs as N processes: `train()` in the process the user started launches
them (vramplan.train.launch), and in each of them runs as one rank (vramplan.train.ranks), which
prepares the step with accelerate's Accelerator and shards the data; rank 0 alone writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vramplan.errors import UsageError
from vramplan.spec import Method, TrainingSpec
from vramplan.train.inputs import TrainOptions, check_data, check_model, check_output, read_run, write_run
from vramplan.units import format_bytes


@dataclass
class TrainResult:
    steps: int
    files: list = field(default_factory=list)
    final_loss: float | None = None
    predicted_peak_bytes: int | None = None
    measured_peak_bytes: int | None = None      # the steps' (what the estimate predicts)
    load_peak_bytes: int | None = None          # reading the models, encoding caches, resuming
    predicted_for: str | None = None            # the card the prediction was made for (CUDA)
    measured_kind: str = "GPU"
    device: str = "cpu"
    seconds: float = 0.0
    skipped_images: int = 0
    profile: object | None = None


def choose_device(requested: str) -> str:
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        raise UsageError(f"the plan is for one GPU but {world} processes were started (WORLD_SIZE={world}): "
                         f"make a plan for them with 'vramplan fit --gpus {world}xCARD'")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: this machine has no CUDA device")
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        torch.cuda.set_device(local_rank)
        return "cuda"
    return "cpu"


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Run:
    """One training run; `train()` below drives it."""

    def __init__(self, spec: TrainingSpec, train_spec: TrainingSpec, options: TrainOptions, console: Console,
                 rank=None):
        self.spec, self.options, self.console = spec, options, console
        self.train_spec = train_spec   # the plan on the folder's own configs and inventories
        self.output = Path(options.output)
        self.rank = rank               # vramplan.train.ranks.Rank: one process of several, else None
        self.seen: list[int] = []      # instance examples this rank trained on (several processes)

    @property
    def is_main(self) -> bool:
        return self.rank is None or self.rank.is_main

    def _indices(self, sampler, micro_step: int) -> list[int]:
        """Rank r of W takes micro-batch m*W + r of the one step-determined order."""
        if self.rank is None:
            return sampler.indices(micro_step)
        indices = sampler.indices(micro_step * self.rank.world + self.rank.index)
        if sampler is self.sampler:
            self.seen.extend(indices)
        return indices

    # -- setup ---------------------------------------------------------------------------------
    def prepare(self) -> None:
        from vramplan.train import data

        spec, options = self.spec, self.options
        token = options.placeholder_token
        ti = spec.method is Method.TEXTUAL_INVERSION
        self.instance = data.scan_folder(options.data, "--data", options.instance_prompt)
        if ti:
            for i, example in enumerate(self.instance.examples):
                self.instance.examples[i] = data.Example(
                    example.path, data.with_placeholder(example.prompt, token, options.instance_prompt))
        self.classes = None
        if spec.prior_preservation:
            self.classes = data.scan_folder(options.class_data, "--class-data", fixed_prompt=options.class_prompt)
        for folder in (self.instance, self.classes):
            if folder is None:
                continue
            for path, why in folder.skipped:
                self.console.print(f"[yellow]warning:[/] skipped unreadable image {path}: {why}")
            if folder.skipped:
                self.console.print(f"[yellow]warning:[/] {len(folder.skipped)} of "
                                   f"{len(folder.skipped) + len(folder)} images in {folder.root} could not be "
                                   f"read and are skipped")
        if self.instance.uncaptioned and not ti:
            self.console.print(f"[yellow]note:[/] {self.instance.uncaptioned} image(s) have no .txt caption and "
                               f"no --instance-prompt was given: they train with an empty prompt")
        self.tokenizers = data.load_tokenizers(options.model_path, self.train_spec.model)

    def encode_caches(self, device: str) -> None:
        """Latents / text conditioning computed once, with only the VAE / text encoders loaded."""
        import torch

        from vramplan.precision import frozen_dtype, vae_dtype
        from vramplan.simulate.variants import DTYPES
        from vramplan.step.families import family_of
        from vramplan.step.loading import load_component
        from vramplan.train import data

        spec, model = self.train_spec, self.train_spec.model
        family = family_of(model)
        self.latents, self.text = {}, {}
        width, height = spec.resolution
        paths = [e.path for e in self.instance.examples] + ([e.path for e in self.classes.examples]
                                                             if self.classes else [])
        if spec.cache_latents:
            dtype = DTYPES[vae_dtype(spec)]    # read in it, and all of it (kept-in-fp32 modules too)
            vae = load_component(self.options.model_path, model.component("vae"), dtype=dtype).to(device, dtype)
            vae.eval()
            with torch.no_grad():
                for path in dict.fromkeys(paths):
                    pixels = data.load_pixels(path, width, height)[None].to(device, DTYPES[vae_dtype(spec)])
                    latents = family.latents_from_pixels(vae, pixels)
                    self.latents[path] = latents.to("cpu", DTYPES[frozen_dtype(spec)])
            del vae
        if spec.cache_text_embeddings:
            dtype = DTYPES[frozen_dtype(spec)]
            encoders = {te.name: load_component(self.options.model_path, te, dtype=dtype).to(device, dtype).eval()
                        for te in model.text_encoders}
            prompts = [e.prompt for e in self.instance.examples] + ([e.prompt for e in self.classes.examples]
                                                                    if self.classes else [])
            with torch.no_grad():
                for prompt in dict.fromkeys(prompts):
                    ids = data.tokenize(self.tokenizers, model.text_lengths, [prompt], {})
                    ids = {k: v.to(device) for k, v in ids.items()}
                    cond = family.encode_text(model, encoders, ids)
                    self.text[prompt] = {k: v.to("cpu") for k, v in cond.tensors.items()}
            del encoders
        if device == "cuda":
            torch.cuda.empty_cache()

    def setup_textual_inversion(self) -> None:
        import torch

        from vramplan.step.modules import EmbeddingWithNewTokens
        from vramplan.train import data

        self.placeholders = {}
        if self.spec.method is not Method.TEXTUAL_INVERSION:
            return
        vectors = self.spec.num_vectors or 1
        for name in self.train_spec.model.trainable_text_encoders:
            module = self.built.models.get(name)
            if module is None:
                continue
            embedding = next(m for m in module.modules() if isinstance(m, EmbeddingWithNewTokens))
            tokenizer = self.tokenizers[name]
            init_ids = None
            if self.options.initializer_token:
                init_ids = tokenizer.encode(self.options.initializer_token, add_special_tokens=False)
                if len(init_ids) != 1:
                    raise UsageError(f"--initializer-token {self.options.initializer_token!r} is "
                                     f"{len(init_ids)} tokens for {name}'s tokenizer; give a single word")
            self.placeholders[name] = data.add_placeholder(tokenizer, self.options.placeholder_token, vectors,
                                                           embedding.vocab)
            # diffusers' textual_inversion.py starts the new rows from the initializer token's
            # embedding; without one, from the mean embedding (transformers' mean_resizing).
            with torch.no_grad():
                base = embedding.base.weight
                start = base[init_ids[0]] if init_ids else base.float().mean(0)
                embedding.new_rows.copy_(start.to(embedding.new_rows.dtype).expand_as(embedding.new_rows))

    # -- batches -------------------------------------------------------------------------------
    def batch(self, micro_step: int):
        import torch

        from vramplan.precision import frozen_dtype, vae_dtype
        from vramplan.simulate.variants import DTYPES
        from vramplan.step.build import Batch
        from vramplan.train import data

        spec = self.train_spec
        examples = [self.instance.examples[i] for i in self._indices(self.sampler, micro_step)]
        if self.classes is not None:
            examples += [self.classes.examples[i] for i in self._indices(self.class_sampler, micro_step)]
        device = self.built.torch_device
        batch = Batch()
        if spec.cache_latents:
            batch.latents = torch.cat([self.latents[e.path] for e in examples]).to(device, DTYPES[frozen_dtype(spec)])
        else:
            width, height = spec.resolution
            batch.pixel_values = torch.stack([data.load_pixels(e.path, width, height) for e in examples]).to(
                device, DTYPES[vae_dtype(spec)])
        prompts = [e.prompt for e in examples]
        if spec.cache_text_embeddings:
            keys = self.text[prompts[0]].keys()
            batch.cached_text = {k: torch.cat([self.text[p][k] for p in prompts]).to(device) for k in keys}
        else:
            ids = data.tokenize(self.tokenizers, spec.model.text_lengths, prompts, self.placeholders)
            batch.input_ids = {k: v.to(device) for k, v in ids.items()}
        return batch

    # -- the run -------------------------------------------------------------------------------
    def execute(self) -> TrainResult:
        from vramplan.step.build import build_step
        from vramplan.train import checkpoint, data
        from vramplan.train.progress import MemoryMeter, progress_bar

        spec, options, output = self.spec, self.options, self.output
        rank = self.rank
        started = time.perf_counter()
        device = rank.device if rank is not None else choose_device(options.device)
        import diffusers  # noqa: F401  (imported before the baseline: their memory is not the run's)
        import peft  # noqa: F401
        import transformers  # noqa: F401

        from vramplan.step.loading import quiet_libraries

        quiet_libraries()

        meter = MemoryMeter(device)
        seed_everything(options.seed)
        self.prepare()
        self.encode_caches(device)
        build_spec = self.train_spec if rank is None else rank.build_spec(self.train_spec)
        self.built = build_step(build_spec, device, weights=Path(options.model_path))
        self.setup_textual_inversion()
        if rank is not None:
            rank.prepare(self.built, build_spec)
        if options.learning_rate is not None:
            for group in self.built.optimizer.param_groups:
                if group.get("relative_step"):
                    self.console.print("[yellow]note:[/] Adafactor with relative steps sets its own "
                                       "learning rate; --learning-rate is ignored")
                    break
                group["lr"] = options.learning_rate
        step = 0
        saving = self.built if rank is None else rank.unwrapped(self.built)   # what files hold
        checkpoint_every = options.checkpoint_every
        if rank is not None and rank.sharded and checkpoint_every:
            checkpoint_every = 0
            self.console.print(f"[yellow]note:[/] no checkpoints under {spec.strategy.value}: its optimizer "
                               f"states are sharded over the ranks, which vramplan does not checkpoint yet "
                               f"(ddp runs checkpoint and resume)")
        if self.is_main:
            checkpoint.remove_leftovers(output)
        if rank is not None:
            rank.wait()
        if options.resume:
            found = checkpoint.checkpoints(output)
            if found:
                step = checkpoint.load_checkpoint(found[-1][1], saving)
                self.console.print(f"resumed from {found[-1][1].name} (step {step})")
            else:
                self.console.print("no checkpoint yet: starting again from step 0")
        run_info = read_run(output) if options.resume else None
        run_info = run_info or {"format": 1, "plan": spec.to_json(), "started": _now()}
        run_info.update(model=str(options.model_path), data=str(options.data), steps=options.steps,
                        status="running")
        if rank is not None:
            run_info.update(processes=rank.world, strategy=(spec.strategy.value if spec.strategy else "ddp"))
        if self.is_main:
            write_run(output, run_info)

        self.sampler = data.Sampler(len(self.instance), spec.batch_size, options.seed)
        if self.classes is not None:
            self.class_sampler = data.Sampler(len(self.classes), spec.batch_size, options.seed + 1)
        accumulation = spec.gradient_accumulation_steps
        loss_value = None
        meter.start_steps()
        with progress_bar(enabled=options.progress and self.is_main) as progress:
            task = progress.add_task("train", total=options.steps, completed=step, loss="-",
                                     memory=meter.label(), started=time.perf_counter(), first=step)
            while step < options.steps:
                losses = []
                if rank is not None:
                    rank.seed_step(options.seed, step)
                for micro in range(accumulation):
                    batch = self.batch(step * accumulation + micro)
                    if rank is None:
                        loss = self.built.run_step(batch, update=micro == accumulation - 1,
                                                   accumulation=accumulation)
                    else:
                        with rank.accumulate(self.built):
                            loss = self.built.run_step(batch, update=False, accumulation=rank.step_accumulation)
                    losses.append(float(loss))
                    del batch, loss
                if rank is not None:
                    rank.update(self.built)
                step += 1
                loss_value = sum(losses) / len(losses)
                if rank is not None:
                    loss_value = rank.mean(loss_value)
                if loss_value != loss_value:
                    raise UsageError(f"the loss became NaN at step {step}: lower --learning-rate, or use bf16 "
                                     f"or fp32 precision")
                progress.update(task, completed=step, loss=f"{loss_value:.4f}", memory=meter.label())
                if checkpoint_every and step % checkpoint_every == 0 and step < options.steps:
                    if self.is_main:
                        checkpoint.write_checkpoint(output, step, saving, spec.to_json())
                        checkpoint.prune(output, options.keep_checkpoints)
                    if rank is not None:
                        rank.wait()

        meter.end_steps()
        from vramplan.train.save import save_result

        ranks = rank.gather(rank.summary(self.built, self.seen)) if rank is not None else None
        files = []
        with (rank.full_parameters() if rank is not None else _nothing()):
            if self.is_main:
                files = save_result(self.train_spec, saving, output, Path(options.model_path), options.save_format,
                                    getattr(self, "placeholders", {}))
        if not self.is_main:
            rank.finish()
            return TrainResult(steps=step, final_loss=loss_value, device=device,
                               seconds=time.perf_counter() - started)
        run_info.update(status="done", finished=_now(), steps_done=step,
                        files=[str(f.relative_to(output)) for f in files])
        if ranks is not None:
            run_info["ranks"] = ranks
            sums = {r.get("weights_checksum") for r in ranks}
            if len(sums) > 1 and None not in sums:
                self.console.print("[yellow]warning:[/] the ranks' trained weights differ at the end; "
                                   "the result is rank 0's")
        result = TrainResult(steps=step, files=files, final_loss=loss_value, measured_peak_bytes=meter.peak(),
                             load_peak_bytes=meter.load_peak, measured_kind=meter.kind, device=device,
                             seconds=time.perf_counter() - started,
                             skipped_images=len(self.instance.skipped) + (len(self.classes.skipped)
                                                                          if self.classes else 0))
        card = running_gpu() if device == "cuda" else None
        result.predicted_peak_bytes = self.predicted_peak(card)
        result.predicted_for = card.name if card is not None else None
        run_info["memory"] = {"device": device, "kind": meter.kind, "peak_bytes": result.measured_peak_bytes,
                              "peak_reserved_bytes": meter.peak_reserved(), "load_peak_bytes": result.load_peak_bytes,
                              "steps_only": meter.split, "predicted_peak_bytes": result.predicted_peak_bytes,
                              "predicted_for": result.predicted_for}
        write_run(output, run_info)
        result.profile = store_profile(spec, result, meter, card) if rank is None else None
        self.report(result, meter)
        if rank is not None:
            rank.finish()
        return result

    def predicted_peak(self, card=None) -> int | None:
        """The analytic estimate's peak allocated for the plan (catalog model when the folder
        matches one: same architecture, same bytes; else the folder's own graphs), on `card`
        (a MeasuredGpu) when the run is on CUDA: cuBLAS' and cuDNN's workspaces depend on the
        card, and a plan made for "8GB" names none (H200, SD 1.5 LoRA: 3.18 GiB for "8GB",
        3.23 GiB for the H200, 3.22 GiB measured)."""
        try:
            from vramplan.estimate import estimate

            spec = self.spec
            if card is not None:
                from vramplan.profile.validate import gpu_for

                spec = spec.replace(gpu=gpu_for(card, source="reported by torch"))
            return estimate(spec).footprint.peak_allocated_bytes
        except Exception as error:  # a prediction is a courtesy here: never fail a finished run
            self.console.print(f"[yellow]note:[/] no prediction: {error}")
            return None

    def report(self, result: TrainResult, meter) -> None:
        table = Table(box=None, show_header=False, padding=(0, 2), pad_edge=False)
        table.add_column(style="bold", no_wrap=True)
        table.add_column(justify="right", overflow="fold")
        table.add_column(style="dim")
        table.add_row("steps", str(result.steps), f"{result.seconds:.1f} s on {result.device}")
        if result.final_loss is not None:
            table.add_row("last loss", f"{result.final_loss:.4f}", "")
        what = "torch.cuda.max_memory_allocated()" if result.device == "cuda" else \
            "peak RSS above the process before loading (CPU)"
        if result.predicted_peak_bytes is not None:
            table.add_row("predicted peak", format_bytes(result.predicted_peak_bytes),
                          "estimate: peak allocated"
                          + (f", for this {result.predicted_for}" if result.predicted_for else ""))
        table.add_row("measured peak", format_bytes(result.measured_peak_bytes),
                      what + (", steps only" if meter.split
                              else ", loading included (the kernel keeps its high-water mark)"))
        if result.load_peak_bytes is not None:
            table.add_row("loading peak", format_bytes(result.load_peak_bytes),
                          "before the first step: models read, caches encoded")
        if result.predicted_peak_bytes and result.measured_peak_bytes:
            error = result.predicted_peak_bytes / result.measured_peak_bytes - 1
            table.add_row("difference", f"{100 * error:+.1f}%", "predicted vs measured")
        for path in result.files:
            table.add_row("saved", str(path), "")
        self.console.print(table)
        if result.device != "cuda":
            from vramplan.train.progress import cpu_note

            note = cpu_note()
            if note:
                self.console.print(f"[dim]{note}[/]")
        if result.profile is not None:
            self.console.print(f"[dim]profile stored: {result.profile}[/]")


@contextlib.contextmanager
def _nothing():
    yield


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def running_gpu():
    """The CUDA card this process runs on, as a profile records it."""
    import torch

    from vramplan.profile.measure import _measured_gpu

    return _measured_gpu(torch.cuda.get_device_properties(torch.cuda.current_device()), None)


def store_profile(spec: TrainingSpec, result: TrainResult, meter, gpu=None, root: Path = Path("profiles")):
    """A CUDA run's measured peaks as a profile in the store (vramplan.profile.store), closing
    the loop with `vramplan validate`: only where that module exists and its folder (`profiles/`
    in the working folder) does too, and never over a profile measured by `vramplan profile`."""
    if result.device != "cuda" or not root.is_dir():
        return None
    try:
        from vramplan.profile.measure import collect_environment
        from vramplan.profile.result import PhaseMeasure, Profile
        from vramplan.profile.store import ProfileExists, save_profile
    except ImportError:
        return None
    import torch

    gpu = gpu or running_gpu()
    phases = [PhaseMeasure("steps", result.measured_peak_bytes, meter.peak_reserved())]
    if meter.load_peak is not None:
        phases.insert(0, PhaseMeasure("load", meter.load_peak, meter.load_peak_reserved))
    profile = Profile(spec=spec.to_json(), device="cuda", fits=True,
                      peak_allocated_bytes=result.measured_peak_bytes,
                      peak_reserved_bytes=meter.peak_reserved(), gpu=gpu, steps=result.steps,
                      capacity_bytes=gpu.memory_bytes, environment=collect_environment(torch),
                      measured_at=_now(), phases=tuple(phases),
                      notes=("measured by vramplan train over a whole run (real images; no NVML sample); "
                             "the totals are the steps', the load phase is kept apart",))
    try:
        return save_profile(profile, root)
    except ProfileExists:
        return None


def train(spec: TrainingSpec, options: TrainOptions, console: Console | None = None,
          launched: bool = False) -> TrainResult | int:
    """Check the inputs, then run (see the module docstring).

    A plan for several GPUs in a process nobody launched starts the job (`launch`, whose exit
    status is returned); in a process `accelerate launch` started (`launched`, or its
    environment), this is one rank of it."""
    from vramplan.train import launch

    console = console or Console(stderr=True)
    if Path(options.model_path).is_file():     # before any launch: every rank reads the folder
        from vramplan.train.single_file import converted_folder

        folder = converted_folder(Path(options.model_path), options.checkpoint_config,
                                  say=lambda message: console.print(f"[dim]{message}[/]"))
        options = dataclasses.replace(options, model_path=folder)
    if launch.needs_launch(spec, launched):
        return launch.launch(spec, options, console)
    options.check()
    folder_model = check_model(spec, Path(options.model_path))
    check_data(spec, options)
    rank = None
    if launch.is_rank(spec, launched):
        from vramplan.train.ranks import start_rank

        launch.refuse_resume(spec, options)
        requested = options.device
        if requested == "auto":
            import torch

            requested = "cuda" if torch.cuda.is_available() else "cpu"
        rank = start_rank(spec, requested)
        if not rank.is_main:
            console = Console(stderr=True, quiet=True)
    output = Path(options.output)
    if rank is None or rank.is_main:
        check_output(spec, options)
        if options.overwrite and output.exists():
            import shutil

            shutil.rmtree(output)
        output.mkdir(parents=True, exist_ok=True)
    if rank is not None:
        rank.wait()
    return Run(spec, spec.replace(model=folder_model), options, console, rank=rank).execute()

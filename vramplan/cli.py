"""The `vramplan` command: parse, call the library, render. Nothing here computes memory.

Each subcommand is one `run` function registered with `@command(...)`, which names it, gives its
one-line summary and examples, and points at the function that adds its flags; `build_parser()`
builds argparse from the registry, so adding `simulate` later is one function and one decorator.

The spec flags are described once (`SPEC_FLAGS`) and added to `estimate` (one value each) and to
`compare` (comma lists). Only the flags the user gave reach `build_spec`, so the spec knows what
was fixed and what was a default. Every bad input ends as one line on stderr and exit code 2.

Imports are paid where they are used: the `estimate` path never imports torch, and matplotlib or
pandas only with `--chart` or `--csv`.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from vramplan import __version__
from vramplan.errors import UsageError
from vramplan.gpus import ALIASES, CATALOG
from vramplan.models.catalog import MODELS
from vramplan.models.resolve import resolve_model
from vramplan.spec import (
    METHOD_KNOBS, BaseQuant, FsdpSharding, LoraTargets, Method, Offload, Optimizer, Strategy,
    TrainingSpec, build_spec, spec_from_json,
)

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


# -- the subcommand registry ---------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    name: str
    summary: str                                         # one line, shown in `vramplan --help`
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None]
    description: str = ""
    examples: tuple[str, ...] = ()


COMMANDS: dict[str, Command] = {}


def command(name: str, summary: str, *, arguments: Callable[[argparse.ArgumentParser], None],
            examples: tuple[str, ...] = ()):
    """Register the decorated `run(args) -> exit code` as subcommand `name`."""
    def register(run: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = Command(name, summary, run, arguments,
                                 description=inspect.cleandoc(run.__doc__ or summary),
                                 examples=examples)
        return run
    return register


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors become a `UsageError`: one line, exit 2, like every other."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # argparse takes "-1" as a value but "-1,4" (compare --lokr-factor) as an unknown flag.
        self._negative_number_matcher = re.compile(r"^-\d[\d.,]*$")

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vramplan", allow_abbrev=False,
        description="Will this diffusion fine-tune fit on my GPU, and with which settings?",
        epilog="Run 'vramplan COMMAND --help' for a command's flags and examples.")
    parser.add_argument("--version", action="version", version=f"vramplan {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for cmd in COMMANDS.values():
        epilog = None
        if cmd.examples:
            epilog = "examples:\n" + "\n".join(f"  {line}" for line in cmd.examples)
        sub = subparsers.add_parser(
            cmd.name, help=cmd.summary, description=cmd.description, epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
        cmd.arguments(sub)
        sub.set_defaults(run=cmd.run)
    return parser


# Commands that count and print, in a short process: Python's cyclic garbage collector only
# rescans the ~10^5 acyclic objects of the decoded graphs and timelines there (reference counting
# frees them); a collection when the estimate ends cost 0.03 s of a 0.42 s SDXL estimate, measured.
COUNTING_COMMANDS = {"estimate", "compare", "fit", "models", "gpus"}


def console() -> int:
    """The `vramplan` command: `main`, with the cyclic garbage collector off for the counting
    commands (not for `fit --train`, `train`, `simulate`, `profile`: long runs with torch), and
    without the interpreter's last collection over what the run left (about 0.1 s of a 0.5 s SDXL
    estimate, measured). Output is flushed and files closed by then; only objects in reference
    cycles lose their finalizers, and the process ends anyway. Tests call `main`, which leaves the
    collector be.

    A counting command then ends the process at once (`os._exit`, output flushed first): the
    interpreter's teardown would free every object the run left one by one, some 0.06 s after an
    SDXL fit (measured: `main` returning at 0.95 s, the process ending at 1.04 s). Counting
    commands register no exit handlers and leave no file open: what they write is written
    atomically before `main` returns."""
    import gc

    argv = sys.argv[1:]
    counting = bool(argv) and argv[0] in COUNTING_COMMANDS and "--train" not in argv
    if counting:
        gc.disable()
    code = main(argv)
    gc.freeze()
    if counting:
        import os

        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (BrokenPipeError, ValueError):   # the reader left (`vramplan gpus | head`)
            pass
        os._exit(code)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if args.command is None:
            if extra:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            parser.print_help()
            return 0
        if extra:
            # argparse reports these from the top parser; point at the subcommand's help instead.
            raise UsageError(f"unrecognized arguments: {' '.join(extra)} "
                             f"(see 'vramplan {args.command} --help')")
        return args.run(args) or 0
    except UsageError as error:
        print(f"vramplan: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as stop:  # --help and --version
        return stop.code if isinstance(stop.code, int) else 0
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `vramplan gpus | head`: the reader left. Point stdout at devnull so the interpreter's
        # final flush does not complain on the way out.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as error:  # a bug of ours, not the user's input: say so in one line
        import os

        if os.environ.get("VRAMPLAN_DEBUG"):
            raise
        print(f"vramplan: internal error: {type(error).__name__}: {error} "
              f"(set VRAMPLAN_DEBUG=1 for the traceback, and please report it)", file=sys.stderr)
        return 1


# -- the spec flags, described once --------------------------------------------------------------

def _choices(enum) -> str:
    return " | ".join(member.value for member in enum)


@dataclass(frozen=True)
class SpecFlag:
    name: str               # the TrainingSpec field (and build_spec option) it sets
    help: str               # what it does, its choices and its default
    metavar: str = "VALUE"
    switch: bool = False    # on/off: --flag / --no-flag
    listable: bool = True   # compare: "a,b" is two values (not for a value that holds commas)

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


SPEC_FLAGS: tuple[SpecFlag, ...] = (
    SpecFlag("model", f"model to train: {' | '.join(MODELS)}, or the path of a diffusers folder "
                      f"or a single .safetensors checkpoint (default: sd15; 'vramplan models' "
                      f"lists them)", "MODEL"),
    SpecFlag("method", f"training method: {_choices(Method)} (default: lora). dreambooth is a "
                       f"full fine-tune with prior preservation", "METHOD"),
    SpecFlag("rank", "rank of the lora / loha / lokr update, a whole number >= 1 (default: 16)",
             "R"),
    SpecFlag("alpha", "lora / loha / lokr alpha, > 0; scales the update, costs no memory "
                      "(default: the rank)", "A"),
    SpecFlag("lora_targets", f"layers the adapter wraps: {_choices(LoraTargets)} (default: attn "
                             f"= to_q, to_k, to_v, to_out.0, as the diffusers scripts; "
                             f"all-linear+conv is LoCon)", "SET"),
    SpecFlag("lokr_factor", "lokr decompose factor: -1 splits each dimension as evenly as it "
                            "can, or a whole number >= 2 (default: -1)", "F"),
    SpecFlag("num_vectors", "textual-inversion: new token vectors to learn, >= 1 (default: 1)",
             "N"),
    SpecFlag("hypernetwork_layers", "hypernetwork layer widths as multiples of the context "
                                    "width, starting and ending with 1 (default: 1,2,1, "
                                    "NovelAI's)", "W,W,W", listable=False),
    SpecFlag("prior_preservation", "train on as many class images as instance images each step, "
                                   "doubling the images per step (default: off; always on for "
                                   "dreambooth)", switch=True),
    SpecFlag("precision", "fp16 = mixed: autocast to fp16, fp32 trainable weights, frozen "
                          "weights in fp16 (default) | bf16 = the same in bfloat16 | fp32 | "
                          "fp16-pure | bf16-pure = every weight, gradient and state in 16 bits",
             "P"),
    SpecFlag("base_quant", f"bitsandbytes quantisation of the frozen base, for --method lora: "
                           f"{_choices(BaseQuant)} (default: none)", "Q"),
    SpecFlag("optimizer", f"optimizer: {_choices(Optimizer)} (default: adamw)", "OPT"),
    SpecFlag("momentum", "sgd momentum, 0 <= m < 1; 0 keeps no state (default: 0; "
                         "--optimizer sgd only)", "M"),
    SpecFlag("batch_size", "images per step per GPU, >= 1 (default: 1)", "N"),
    SpecFlag("gradient_accumulation_steps", "steps whose gradients are summed before each "
                                            "optimizer step, >= 1 (default: 1)", "N"),
    SpecFlag("resolution", "training size in pixels, N or WxH (e.g. 1024 or 832x1216), a "
                           "multiple of what the model needs: 64 for sd15/sd21/sdxl, 16 for "
                           "sd35/flux (default: the model's native size)", "N|WxH"),
    SpecFlag("gradient_checkpointing", "recompute activations during backward instead of "
                                       "keeping them (default: off)", switch=True),
    SpecFlag("attention", "attention kernel: sdpa (default) | xformers = keep no sequence x "
                          "sequence matrix | eager = keeps it", "KIND"),
    SpecFlag("train_text_encoder", "also train the text encoder(s) the diffusers scripts train "
                                   "(default: off)", switch=True),
    SpecFlag("cache_latents", "encode the images once beforehand: no VAE on the GPU during "
                              "training (default: off)", switch=True),
    SpecFlag("cache_text_embeddings", "encode the captions once beforehand: no text encoders on "
                                      "the GPU; needs a frozen text encoder (default: off)",
             switch=True),
    SpecFlag("ema", "keep an exponential moving average of the trained weights, for full and "
                    "dreambooth (default: off)", switch=True),
    SpecFlag("gpu", f"the card to check: a size (16GB = 16*10^9 bytes, 16GiB = 16*2^30, "
                    f"24G = 24GB) or one of {', '.join(CATALOG)} ('vramplan gpus' lists them; "
                    f"default: none, report only what it needs)", "GPU"),
    SpecFlag("strategy", f"how several GPUs share the work: {_choices(Strategy)} (default: ddp "
                         f"with --gpus N>1, else one plain process); estimates one GPU of it",
             "S"),
    SpecFlag("fsdp_sharding", f"--strategy fsdp: {_choices(FsdpSharding)} (torch's FULL_SHARD / "
                              f"SHARD_GRAD_OP / HYBRID_SHARD; default: full-shard)", "MODE"),
    SpecFlag("offload", f"move to host RAM: {_choices(Offload)} (default: none). optimizer = "
                        f"DeepSpeed offload_optimizer (zero1/2/3); params = parameters, gradients "
                        f"and optimizer (fsdp CPUOffload, zero3 offload_param)", "WHAT"),
)
# Flags that set several spec fields at once (not one field each, so not in SPEC_FLAGS).
EXTRA_SPEC_FLAGS: tuple[SpecFlag, ...] = (
    SpecFlag("gpus", "several cards of one kind: COUNTxCARD, e.g. 8xh100 or 2x24GB (sets --gpu "
                     "and the GPU count; --batch-size stays per GPU, as in accelerate)", "NxGPU",
             listable=False),
)


def add_spec_flags(parser: argparse.ArgumentParser, *, lists: bool = False) -> None:
    """The spec flags, unset unless given. With `lists`, each may be a comma list, or repeated."""
    group = parser.add_argument_group(
        "training spec" + (" (each a comma list, or repeated: all combinations are compared)"
                           if lists else ""))
    for flag in SPEC_FLAGS + EXTRA_SPEC_FLAGS:
        if flag.switch and lists:
            group.add_argument(flag.option, dest=flag.name, action="append", nargs="?",
                               const="yes", metavar="no,yes",
                               help=flag.help + "; 'no,yes' compares both")
        elif flag.switch:
            # --flag / --no-flag: the --no- form switches off what a --plan turned on.
            group.add_argument(flag.option, dest=flag.name, action=argparse.BooleanOptionalAction,
                               default=None, help=flag.help)
        else:
            group.add_argument(flag.option, dest=flag.name, metavar=flag.metavar,
                               action="append" if lists else "store", help=flag.help)
    group.add_argument("--plan", metavar="FILE", type=Path,
                       help="start from a saved spec: the JSON of TrainingSpec.to_json(), or "
                            "of 'vramplan estimate --json'; flags given here override its values")


def given_options(args: argparse.Namespace) -> dict:
    """Only what the user typed: field name -> raw value, for `build_spec` to validate."""
    return {f.name: getattr(args, f.name) for f in SPEC_FLAGS + EXTRA_SPEC_FLAGS
            if getattr(args, f.name) is not None}


# -- plans ---------------------------------------------------------------------------------------

def read_plan(path: Path) -> dict:
    """A plan file's spec object: `TrainingSpec.to_json()`, or an estimate's JSON holding one."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise UsageError(f"--plan: {str(path)!r} does not exist") from None
    except OSError as error:
        raise UsageError(f"--plan: cannot read {str(path)!r}: {error.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"--plan: {str(path)!r} is not valid JSON: {error.msg} at line "
                         f"{error.lineno}, column {error.colno}") from None
    if isinstance(data, dict) and isinstance(data.get("spec"), dict):
        data = data["spec"]
    if not isinstance(data, dict):
        raise UsageError(f"--plan: {str(path)!r} must hold one JSON object (a spec), "
                         f"not a {type(data).__name__}")
    return data


_METHOD_KNOB_NAMES = frozenset().union(*METHOD_KNOBS.values())


def override_plan(plan: dict, overrides: dict) -> dict:
    """The plan's values with `overrides` on top, minus plan values that followed an overridden one.

    A plan stores resolved values, including those that only followed from another setting: a
    lora plan's rank means nothing to `--method full`, its alpha = rank default should follow a
    new `--rank`, its native resolution a new `--model`, its sgd momentum a new `--optimizer`.
    Those are dropped so that build_spec derives them again; values the user gives always stay.
    """
    merged = {k: v for k, v in plan.items() if v is not None}
    if "method" in overrides:
        method = Method.parse(overrides["method"], "--method")
        for name in _METHOD_KNOB_NAMES - METHOD_KNOBS[method]:
            merged.pop(name, None)
        if Method.DREAMBOOTH in (method, _plan_method(plan)):
            merged.pop("prior_preservation", None)   # dreambooth implies it
    if "rank" in overrides and plan.get("alpha") is not None and plan.get("rank") is not None \
            and float(plan["alpha"]) == float(plan["rank"]):
        merged.pop("alpha", None)
    if "optimizer" in overrides:
        merged.pop("momentum", None)
    if "model" in overrides and "resolution" in plan:
        try:
            native = resolve_model(plan["model"]).native_resolution
        except UsageError:
            native = None
        if plan["resolution"] in ([native, native], native):
            merged.pop("resolution", None)
    if "gpus" in overrides:
        merged.pop("gpu", None)          # --gpus names the card and the count anew
        merged.pop("num_gpus", None)
    if "strategy" in overrides:
        merged.pop("fsdp_sharding", None)   # followed the plan's strategy
    merged.update(overrides)
    return merged


def _plan_method(plan: dict) -> Method | None:
    try:
        return Method.parse(plan.get("method", "lora"), "--method")
    except UsageError:
        return None


def resolve_spec(options: dict, plan: dict | None, plan_path: Path | None = None) -> TrainingSpec:
    """The validated TrainingSpec: the flags given, on top of the plan if there is one."""
    if plan is None:
        return build_spec(options)
    try:
        base = spec_from_json(plan)
    except UsageError as error:
        raise UsageError(f"--plan {plan_path}: {error}") from None
    if not options:
        return base
    merged = override_plan(plan, options)
    if isinstance(merged.get("hypernetwork_layers"), str):
        # spec_from_json reads the layers as a list, as to_json writes them.
        merged["hypernetwork_layers"] = merged["hypernetwork_layers"].split(",")
    return spec_from_json(merged)


# -- estimate ------------------------------------------------------------------------------------

def _output_flags(parser: argparse.ArgumentParser, *, many: bool = False) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--json", action="store_true",
                       help="print one JSON " + ("list, an object per estimate, " if many else
                                                 "object ") + "to stdout and nothing else")
    group.add_argument("--chart", metavar="PATH", type=Path,
                       help="also draw the grid" + ("s side by side" if many else "")
                       + " to PATH, a .png or .svg file")
    if many:
        group.add_argument("--csv", metavar="PATH", type=Path,
                           help="also write the table to PATH as CSV: one row per estimate, "
                                "sizes in bytes")


def _estimate_arguments(parser: argparse.ArgumentParser) -> None:
    add_spec_flags(parser)
    _output_flags(parser)
    parser.add_argument("--emit-launch", metavar="FOLDER", type=Path,
                        help="also write the plan's launch files to FOLDER: accelerate.yaml (for "
                             "`accelerate launch --config_file`) and, for zero1/2/3, deepspeed.json")


def _check_chart_path(path: Path | None) -> None:
    """Fail before any work rather than after the answer is printed."""
    if path is not None and path.suffix.lower() not in (".png", ".svg"):
        raise UsageError(f"--chart: {str(path)!r} must end in .png or .svg")


def _say_written(args: argparse.Namespace, lines: list[str]) -> None:
    """Which files were written: on stderr under --json, which keeps stdout pure JSON."""
    for line in lines:
        print(line, file=sys.stderr if args.json else sys.stdout)


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


@command("estimate", "how much memory one fine-tune needs, and whether it fits a card",
         arguments=_estimate_arguments,
         examples=(
             "vramplan estimate --method lora --rank 128 --gpu 16GB",
             "vramplan estimate --model sdxl --method full --precision bf16 --optimizer adamw8bit "
             "--gradient-checkpointing --gpu a100-80g",
             "vramplan estimate --model flux-dev --base-quant nf4 --cache-latents "
             "--cache-text-embeddings --gpu rtx4090 --chart flux.png",
             "vramplan estimate --gpu 24GB --json > plan.json; "
             "vramplan estimate --plan plan.json --batch-size 4",
         ))
def estimate_command(args: argparse.Namespace) -> int:
    """Count the memory of one training step from the spec, without a GPU and without torch:
    weights, gradients, optimizer states, activations and overheads, drawn as the card's grid
    of 1 GB squares, with the verdict against --gpu."""
    _check_chart_path(args.chart)
    plan = read_plan(args.plan) if args.plan is not None else None
    spec = resolve_spec(given_options(args), plan, args.plan)

    from vramplan.estimate import estimate

    result = estimate(spec)
    # Files first, so that a file that cannot be written fails before anything is printed.
    written = []
    if args.chart is not None:
        from vramplan.render import write_grid_chart

        written.append(f"chart written to {write_grid_chart(result, args.chart)}")
    if args.emit_launch is not None:
        from vramplan.distributed.configs import write_launch_files

        written += [f"launch file written to {path}" for path in write_launch_files(spec, args.emit_launch)]
    if args.json:
        _print_json(result.to_json())
    else:
        from rich.console import Console

        from vramplan.render import render_estimate

        render_estimate(result, Console())
        if result.distributed is not None:
            from vramplan.distributed.view import distributed_view
            from vramplan.render.grid import display_unit

            Console().print(distributed_view(result, display_unit(result.gpu)))
    _say_written(args, written)
    return 0


# -- compare -------------------------------------------------------------------------------------

def _compare_arguments(parser: argparse.ArgumentParser) -> None:
    add_spec_flags(parser, lists=True)
    _output_flags(parser, many=True)


def spec_grid(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """Every combination of the listed values: (a label naming its varied flags, options)."""
    axes = []
    for flag in SPEC_FLAGS + EXTRA_SPEC_FLAGS:
        occurrences = getattr(args, flag.name)
        if not occurrences:
            continue
        values = []
        for text in occurrences:
            values += text.split(",") if flag.listable else [text]
        axes.append((flag, [v.strip() for v in values]))
    combos = []
    for chosen in itertools.product(*(values for _, values in axes)):
        label = " ".join(f"{flag.option} {value}" for (flag, values), value in zip(axes, chosen)
                         if len(values) > 1)
        combos.append((label, {flag.name: value for (flag, _), value in zip(axes, chosen)}))
    return combos


@command("compare", "several fine-tunes side by side: every combination of the values given",
         arguments=_compare_arguments,
         examples=(
             "vramplan compare --method full,lora --precision fp32,fp16 --gpu 16GB",
             "vramplan compare --rank 4,16,64,128 --gpu 16GB --csv ranks.csv",
             "vramplan compare --model sdxl --gradient-checkpointing no,yes --batch-size 1,4 "
             "--gpu rtx4090 --chart sdxl.svg",
             "vramplan compare --method hypernetwork --hypernetwork-layers 1,2,1 "
             "--hypernetwork-layers 1,4,1",
         ))
def compare_command(args: argparse.Namespace) -> int:
    """Estimate every combination of the values given (--method full,lora --rank 4,64 is four
    fine-tunes; a flag holding commas itself, like --hypernetwork-layers, is repeated instead)
    and show their grids side by side and one table of the numbers."""
    _check_chart_path(args.chart)
    plan = read_plan(args.plan) if args.plan is not None else None
    specs = []
    # Validate every combination before estimating any: a bad one is named, nothing is printed.
    for label, options in spec_grid(args):
        try:
            specs.append(resolve_spec(options, plan, args.plan))
        except UsageError as error:
            raise UsageError(f"{label}: {error}" if label else str(error)) from None

    from vramplan.estimate import estimate

    results = [estimate(spec) for spec in specs]
    written = []
    if args.csv is not None:
        from vramplan.render import estimates_frame, write_csv

        written.append(f"table written to {write_csv(estimates_frame(results), args.csv)}")
    if args.chart is not None:
        from vramplan.render import write_grid_chart
        from vramplan.render.compare import titled

        written.append(f"chart written to {write_grid_chart(titled(results), args.chart)}")
    if args.json:
        _print_json([result.to_json() for result in results])
    else:
        from rich.console import Console

        from vramplan.render import CompareView

        Console().print(CompareView(results))
    _say_written(args, written)
    return 0


# -- simulate ------------------------------------------------------------------------------------

def _simulate_arguments(parser: argparse.ArgumentParser) -> None:
    add_spec_flags(parser)
    _output_flags(parser)
    group = parser.add_argument_group("simulation")
    group.add_argument("--timeline", metavar="PATH", type=Path,
                       help="also draw the live bytes over the two steps, stacked by category, "
                            "phases shaded, to PATH, a .png or .svg file")
    group.add_argument("--compare-estimate", action="store_true",
                       help="also run the analytic estimate and show it beside the simulation, "
                            "per category and per total, with the relative error")


def _check_timeline_path(path: Path | None) -> None:
    if path is not None and path.suffix.lower() not in (".png", ".svg"):
        raise UsageError(f"--timeline: {str(path)!r} must end in .png or .svg")


def _simulate_showing_progress(spec: TrainingSpec, show: bool):
    """Run the simulation, each stage it reports a spinner line on stderr with `show`. torch is
    imported inside, never before."""
    def work(report):
        from vramplan.simulate.run import simulate

        return simulate(spec, progress=report)

    return _showing_progress(show, "importing torch, diffusers and peft", work)


@command("simulate", "trace the real training step on fake tensors: measured, still no GPU",
         arguments=_simulate_arguments,
         examples=(
             "vramplan simulate --method lora --rank 32 --gpu 16GB",
             "vramplan simulate --model sdxl --method lora --gradient-checkpointing --json",
             "vramplan simulate --method full --precision fp16 --timeline timeline.png",
             "vramplan simulate --method lora --rank 128 --compare-estimate",
         ))
def simulate_command(args: argparse.Namespace) -> int:
    """Build the spec's real training step (the diffusers model, the peft adapter, the loss,
    backward and the optimizer) on fake tensors, which allocate nothing, run it twice and
    measure every tensor: the same categories and totals as estimate, plus the peak of each
    phase and the layers that save the most for backward. Needs torch; takes seconds."""
    _check_chart_path(args.chart)
    _check_timeline_path(args.timeline)
    plan = read_plan(args.plan) if args.plan is not None else None
    spec = resolve_spec(given_options(args), plan, args.plan)

    simulation = _simulate_showing_progress(spec, show=not args.json)
    estimate = None
    if args.compare_estimate:
        from vramplan.estimate import estimate as run_estimate

        estimate = run_estimate(spec)

    from vramplan.render.simulation import as_estimate

    written = []
    if args.timeline is not None:
        from vramplan.render.timeline_chart import write_timeline_chart

        written.append(f"timeline written to {write_timeline_chart(simulation, args.timeline)}")
    if args.chart is not None:
        from vramplan.render import write_grid_chart

        written.append(f"chart written to {write_grid_chart(as_estimate(simulation), args.chart)}")
    if args.json:
        from vramplan.render.simulation import comparison_json, phase_peaks_json

        data = simulation.to_json()
        data.setdefault("phase_peaks", phase_peaks_json(simulation))
        if estimate is not None:
            data["compare_estimate"] = comparison_json(estimate, simulation)
        _print_json(data)
    else:
        from rich.console import Console

        from vramplan.render.simulation import render_simulation

        render_simulation(simulation, Console(), estimate)
    _say_written(args, written)
    return 0


# -- the catalogs --------------------------------------------------------------------------------

def _json_only(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true",
                        help="print one JSON list to stdout and nothing else")


def model_rows() -> list[dict]:
    from vramplan.models.inventory import load_inventory

    rows = []
    for model in MODELS.values():
        components = {}
        for component in model.components:
            inventory = load_inventory(model.key, component.name)
            components[component.name] = {"class": component.cls, "role": component.role,
                                          "params": inventory.total_params}
        rows.append({"key": model.key, "name": model.name, "family": model.family,
                     "repo": model.repo, "components": components,
                     "total_params": sum(c["params"] for c in components.values()),
                     "native_resolution": model.native_resolution,
                     "resolution_multiple": model.resolution_multiple,
                     "aliases": list(model.aliases)})
    return rows


@command("models", "the model catalog: components, exact parameter counts, native sizes",
         arguments=_json_only, examples=("vramplan models", "vramplan models --json"))
def models_command(args: argparse.Namespace) -> int:
    """The models --model knows, with each component's parameters counted from its real
    config. --model also takes a diffusers folder or a single .safetensors checkpoint."""
    rows = model_rows()
    if args.json:
        _print_json(rows)
        return 0
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title="vramplan models", title_justify="left", header_style="bold",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("model")
    table.add_column("component", no_wrap=True)
    table.add_column("parameters", justify="right", no_wrap=True)
    table.add_column("resolution", justify="right")
    for row in rows:
        components = row["components"]
        model = Text.assemble((row["key"], "bold"), "\n", row["name"], "\n",
                              (f"family {row['family']}", "dim"))
        names = "\n".join(components) + "\ntotal"
        counts = "\n".join(f"{c['params']:,}" for c in components.values()) \
            + f"\n{row['total_params']:,}"
        resolution = Text.assemble(f"{row['native_resolution']} px", "\n",
                                   (f"multiple of {row['resolution_multiple']}", "dim"))
        table.add_row(model, names, counts, resolution, end_section=True)
    Console().print(table)
    return 0


def gpu_rows() -> list[dict]:
    from vramplan.units import GB, GIB

    rows = []
    for gpu in CATALOG.values():
        row = gpu.to_json()
        row.update(memory_gib=round(gpu.memory_bytes / GIB, 2),
                   memory_gb=round(gpu.memory_bytes / GB, 2),
                   aliases=[alias for alias, key in ALIASES.items() if key == gpu.key],
                   source=gpu.source)
        rows.append(row)
    return rows


@command("gpus", "the GPU catalog: each card's real capacity as nvidia-smi reports it",
         arguments=_json_only, examples=("vramplan gpus", "vramplan gpus --json"))
def gpus_command(args: argparse.Namespace) -> int:
    """The cards --gpu knows by name, with the total memory nvidia-smi reports and where that
    figure was read. --gpu also takes a bare size: 16GB (10^9 bytes), 16GiB (2^30), 24G."""
    rows = gpu_rows()
    if args.json:
        _print_json(rows)
        return 0
    from rich import box
    from rich.console import Console, Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title="vramplan gpus", title_justify="left", header_style="bold",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("key", no_wrap=True)
    table.add_column("name")
    table.add_column("GiB", justify="right", no_wrap=True)
    table.add_column("GB", justify="right", no_wrap=True)
    table.add_column("bf16", justify="center", no_wrap=True)
    table.add_column("cc", justify="right", no_wrap=True)
    table.add_column("src", justify="right", no_wrap=True)
    # Sources are paragraphs: footnotes under the table keep it readable at 80 columns.
    sources = Table.grid(padding=(0, 1))
    sources.add_column(justify="right", style="dim", no_wrap=True)
    sources.add_column(style="dim")
    for number, row in enumerate(rows, 1):
        key = Text(row["key"], "bold")
        for alias in row["aliases"]:
            key.append(f"\n{alias}", "dim")
        table.add_row(key, row["name"], f"{row['memory_gib']:.2f}", f"{row['memory_gb']:.2f}",
                      "yes" if row["bf16"] else "no", row["compute_capability"] or "-",
                      f"[{number}]")
        sources.add_row(f"[{number}]", row["source"])
    note = Text("memory: the total nvidia-smi reports; --gpu also takes a size: 16GB (10^9 "
                "bytes), 16GiB (2^30), 24G", "dim")
    Console().print(Group(table, note, Text(""), Text("sources", "bold"), sources))
    return 0


# -- profile -------------------------------------------------------------------------------------

def _profile_arguments(parser: argparse.ArgumentParser) -> None:
    add_spec_flags(parser)
    group = parser.add_argument_group("measurement")
    group.add_argument("--device", metavar="cuda|cpu", default="cuda",
                       help="cuda (default): real steps on the GPU, with the allocator's peaks and "
                            "NVML | cpu: the same real step on the CPU, measured by the simulate "
                            "tracker and the process's peak RSS (no GPU needed)")
    group.add_argument("--steps", metavar="N",
                       help="training steps to run, >= 2: the second is the first with optimizer "
                            "state (default: 3, or the --matrix file's steps)")
    group.add_argument("--out", metavar="DIR", type=Path, default=Path("profiles"),
                       help="the profile store: each result goes to DIR/<gpu>/<spec key>.json "
                            "(default: profiles)")
    group.add_argument("--force", action="store_true",
                       help="measure again and replace a profile stored already")
    group.add_argument("--matrix", metavar="FILE.toml", type=Path,
                       help="a campaign: every spec of the TOML matrix (see "
                            "examples/matrix-quick.toml), one after another; an out-of-memory "
                            "is stored and the next case runs; stored cases are skipped")
    group.add_argument("--budget", metavar="SECONDS",
                       help="--matrix: start no case that would end after this many seconds "
                            "(default: the file's budget_seconds, else none)")
    group.add_argument("--check-first", action="store_true",
                       help="--matrix: the first case run checks the environment: if it fails "
                            "(an out-of-memory is a measurement, not a failure) the campaign "
                            "stops there instead of failing every case; later failures do not "
                            "stop it")
    group.add_argument("--json", action="store_true",
                       help="print the profile (with --matrix: the list of outcomes) as JSON to "
                            "stdout and nothing else")


def _whole_number(text, flag: str, minimum: int) -> int:
    from vramplan.spec import parse_int

    return parse_int(text, flag, minimum)


def _showing_progress(show: bool, first: str, work):
    """Run `work(report)`; with `show`, each stage reported is a spinner line on stderr, then a
    tick and its time (as simulate shows its stages)."""
    if not show:
        return work(lambda message: None)
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(finished_text="[green]✓[/]"), TextColumn("{task.description}"),
               TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        stage = None

        def report(message: str) -> None:
            nonlocal stage
            if stage is not None:
                progress.update(stage, total=1, completed=1)
            stage = progress.add_task(message, total=None)

        report(first)
        result = work(report)
        progress.update(stage, total=1, completed=1)
    return result


@command("profile", "measure the real training step: on the GPU, or on the CPU with --device cpu",
         arguments=_profile_arguments,
         examples=(
             "vramplan profile --model sdxl --method lora --rank 32 --gradient-checkpointing",
             "vramplan profile --matrix examples/matrix-quick.toml --budget 420",
             "vramplan profile --device cpu --model OUT/model --method lora --rank 4 "
             "--resolution 64",
         ))
def profile_command(args: argparse.Namespace) -> int:
    """Run the spec's real training step (the step simulate traces, random weights: memory does
    not depend on their values) for a few steps and record what it used: peak allocated, peak
    reserved, the device's used memory from NVML, the CUDA context, the peak of each phase, the
    step time and the environment. The result is stored as JSON under --out for `vramplan
    validate`; an out-of-memory is stored too, as a measured "does not fit"."""
    device = str(args.device).strip().lower()
    if device not in ("cuda", "cpu"):
        raise UsageError(f"--device: {args.device!r} is not cuda or cpu")
    steps = None if args.steps is None else _whole_number(args.steps, "--steps", 2)
    if args.matrix is not None:
        if given_options(args) or args.plan is not None:
            raise UsageError("--matrix takes every spec from its file: give no spec flags or "
                             "--plan with it")
        return _profile_matrix(args, device, steps)
    if args.budget is not None or args.check_first:
        raise UsageError(f"{'--budget' if args.budget is not None else '--check-first'} applies to "
                         f"--matrix campaigns")
    plan = read_plan(args.plan) if args.plan is not None else None
    spec = resolve_spec(given_options(args), plan, args.plan)

    from vramplan.profile.measure import DEFAULT_STEPS, profile, require_cuda, store_folder
    from vramplan.profile.store import ProfileExists, save_profile, spec_key

    steps = steps or DEFAULT_STEPS

    if device == "cuda":
        require_cuda()
    folder = store_folder(device)
    if folder is not None and not args.force:
        path = args.out / folder / f"{spec_key(spec.to_json())}.json"
        if path.exists():
            raise ProfileExists(f"{path} exists: --force measures again and replaces it")
    result = _showing_progress(not args.json, "importing torch, diffusers and peft",
                               lambda report: profile(spec, device, steps, report))
    path = save_profile(result, args.out, force=args.force)
    if args.json:
        _print_json(result.to_json())
        print(f"profile written to {path}", file=sys.stderr)
        return 0
    from rich.console import Console

    from vramplan.render.validation import profile_view

    Console().print(profile_view(result, path))
    return 0


def _profile_matrix(args: argparse.Namespace, device: str, steps: int | None) -> int:
    from vramplan.profile.campaign import Outcome, Status, read_matrix, run_campaign
    from vramplan.profile.measure import DEFAULT_STEPS

    matrix = read_matrix(args.matrix)
    steps = steps or matrix.steps or DEFAULT_STEPS
    budget = matrix.budget_seconds
    if args.budget is not None:
        try:
            budget = float(args.budget)
        except ValueError:
            raise UsageError(f"--budget: {args.budget!r} is not a number of seconds") from None
        if budget <= 0:
            raise UsageError("--budget must be a positive number of seconds")
    if device == "cuda":
        from vramplan.profile.measure import store_folder

        store_folder("cuda")   # no CUDA device: the one-line error, before anything runs
    from rich.console import Console
    from rich.text import Text

    from vramplan.render.simulation import human_bytes

    console = Console(stderr=args.json)
    console.print(Text(f"{matrix.name}: {len(matrix.cases)} cases on {device}, {steps} steps each"
                       + (f", budget {budget:.0f} s" if budget else ""), "bold"))
    width = len(str(len(matrix.cases)))

    def report(number: int, total: int, item) -> None:
        if not isinstance(item, Outcome):
            return
        line = Text(f"[{number:>{width}}/{total}] ")
        line.append(item.case.key, "bold")
        colour = {Status.MEASURED: "green", Status.OUT_OF_MEMORY: "yellow",
                  Status.FAILED: "red"}.get(item.status, "dim")
        line.append(f"  {item.status.value}", colour)
        measured = item.profile
        if measured is not None and measured.fits:
            line.append(f"  {human_bytes(measured.peak_allocated_bytes)} allocated")
            if measured.device_used_bytes is not None:
                line.append(f", {human_bytes(measured.device_used_bytes)} used")
        if item.message:
            line.append(f"  {item.message}", "dim")
        if item.seconds:
            line.append(f"  ({item.seconds:.1f} s)", "dim")
        console.print(line)

    result = run_campaign(matrix, device, args.out, steps=steps, force=args.force,
                          budget_seconds=budget, report=report, check_first=args.check_first)
    counts = ", ".join(f"{result.count(s)} {s.value}" for s in Status if result.count(s))
    console.print(Text(f"{counts} in {result.seconds:.0f} s; profiles under {args.out}", "bold"))
    if args.json:
        _print_json([{"case": o.case.key, "block": o.case.block, "label": o.case.label,
                      "status": o.status.value, "path": None if o.path is None else str(o.path),
                      "message": o.message, "seconds": round(o.seconds, 2)}
                     for o in result.outcomes])
    return 1 if result.count(Status.FAILED) else 0


# -- validate ------------------------------------------------------------------------------------

def _validate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profiles", metavar="DIR", type=Path, default=Path("profiles"),
                        help="the profile store to validate (default: profiles)")
    parser.add_argument("--no-simulate", action="store_true",
                        help="predict with estimate only (simulate takes seconds per profile)")
    group = parser.add_argument_group("output")
    group.add_argument("--chart", metavar="PATH", type=Path,
                       help="also draw predicted vs measured, with the y = x line and the "
                            "+-5%% band, to PATH, a .png or .svg file")
    group.add_argument("--csv", metavar="PATH", type=Path,
                       help="also write one row per profile to PATH as CSV: sizes in bytes, "
                            "errors as fractions")
    group.add_argument("--json", metavar="PATH", nargs="?", const="-",
                       help="write the cases, the summary and the problems as JSON to PATH, or "
                            "to stdout (and nothing else there) without PATH")


@command("validate", "every stored profile against estimate and simulate: the accuracy report",
         arguments=_validate_arguments,
         examples=(
             "vramplan validate",
             "vramplan validate --chart accuracy.png --csv accuracy.csv",
             "vramplan validate --profiles profiles --no-simulate --json accuracy.json",
         ))
def validate_command(args: argparse.Namespace) -> int:
    """Predict every profile under --profiles again, with estimate and simulate, for the card it
    ran on, and show measured against predicted for the three totals with the relative errors,
    then a summary per device and tier (median, max, share within 2% and 5%). CPU profiles are
    summarised apart from CUDA ones. A file that is not a profile is named and skipped."""
    _check_chart_path(args.chart)
    if not args.profiles.is_dir():
        raise UsageError(f"--profiles: {str(args.profiles)!r} is not a folder "
                         f"(vramplan profile --out writes one)")
    to_stdout = args.json == "-"

    from vramplan.profile.validate import validate

    validation = _showing_progress(
        not to_stdout, "reading the profiles",
        lambda report: validate(args.profiles, simulate=not args.no_simulate, progress=report))
    written = []
    if args.csv is not None:
        from vramplan.render.validation import write_validation_csv

        written.append(f"table written to {write_validation_csv(validation, args.csv)}")
    if args.json is not None and not to_stdout:
        from vramplan.render.validation import write_validation_json

        written.append(f"JSON written to {write_validation_json(validation, Path(args.json))}")
    if args.chart is not None and validation.cases:
        from vramplan.render.validation import write_accuracy_chart

        written.append(f"chart written to {write_accuracy_chart(validation, args.chart)}")
    if to_stdout:
        from vramplan.render.validation import validation_json

        _print_json(validation_json(validation))
    else:
        from rich.console import Console

        from vramplan.render.validation import validation_view

        Console().print(validation_view(validation))
    for line in written:
        print(line, file=sys.stderr if to_stdout else sys.stdout)
    return 0


# -- fit -----------------------------------------------------------------------------------------

def _train_run_flags(parser: argparse.ArgumentParser, *, model_flag: str, required: bool) -> None:
    """What a real run needs beyond the plan: weights, images, where to write, how long."""
    group = parser.add_argument_group("training run" if required else "training run (with --train)")
    group.add_argument(model_flag, dest="model_path", metavar="PATH", type=Path, required=required,
                       help="the diffusers pipeline folder whose weights train (model_index.json, "
                            "unet/, vae/, text_encoder/, tokenizer/ ...), or an original single-file "
                            ".safetensors of SD 1.x / 2.x / XL, converted once into the cache; no hub access")
    group.add_argument("--checkpoint-config", metavar="FOLDER", type=Path,
                       help="for a single-file checkpoint: a diffusers folder of the same model whose "
                            "configs and tokenizers describe it (its weights are not read); default: "
                            "the catalog's configs and the tokenizers from the Hugging Face cache")
    group.add_argument("--data", metavar="FOLDER", type=Path, required=required,
                       help="the training images (png, jpg, webp ...; subfolders too), each with an "
                            "optional same-name .txt caption")
    group.add_argument("--output", metavar="FOLDER", type=Path, required=required,
                       help="where the run goes: checkpoints, vramplan-run.json, the result")
    group.add_argument("--instance-prompt", metavar="TEXT",
                       help="the prompt of images without a .txt caption (DreamBooth's instance prompt)")
    group.add_argument("--class-data", metavar="FOLDER", type=Path,
                       help="class images for prior preservation (dreambooth)")
    group.add_argument("--class-prompt", metavar="TEXT", help="the prompt of the class images")
    group.add_argument("--placeholder-token", metavar="TOKEN", default="<sks>",
                       help="textual inversion: the new token (default: <sks>)")
    group.add_argument("--initializer-token", metavar="WORD",
                       help="textual inversion: start the new embedding from this word's (default: "
                            "the mean embedding)")
    group.add_argument("--steps", metavar="N", type=int, default=500,
                       help="optimizer steps (default: 500)")
    group.add_argument("--learning-rate", metavar="LR", type=float,
                       help="learning rate (default: the step's, 1e-4 as the diffusers scripts)")
    group.add_argument("--seed", metavar="N", type=int, default=0, help="random seed (default: 0)")
    group.add_argument("--checkpoint-every", metavar="N", type=int, default=250,
                       help="write a checkpoint every N steps, 0 for never (default: 250)")
    group.add_argument("--keep-checkpoints", metavar="N", type=int, default=2,
                       help="keep the newest N checkpoints, 0 for all (default: 2)")
    group.add_argument("--resume", action="store_true",
                       help="continue the run in --output from its last checkpoint")
    group.add_argument("--overwrite", action="store_true",
                       help="start again where --output already holds a run (deletes it)")
    group.add_argument("--save-format", choices=("diffusers", "kohya"), default="diffusers",
                       help="adapter file format: diffusers (default; load_lora_weights) or kohya "
                            "(lora_unet_... keys, AUTOMATIC1111 / ComfyUI)")
    group.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto (default): CUDA when there is one, else the CPU")
    group.add_argument("--quiet", action="store_true", help="no progress bar")


def _train_options(args: argparse.Namespace):
    from vramplan.train import TrainOptions

    missing = [flag for flag, value in (("--model-path", args.model_path), ("--data", args.data),
                                        ("--output", args.output)) if value is None]
    if missing:
        raise UsageError(f"--train needs {', '.join(missing)}")
    return TrainOptions(model_path=args.model_path, data=args.data, output=args.output, steps=args.steps,
                        instance_prompt=args.instance_prompt, class_data=args.class_data,
                        class_prompt=args.class_prompt, placeholder_token=args.placeholder_token,
                        initializer_token=args.initializer_token, learning_rate=args.learning_rate,
                        seed=args.seed, checkpoint_every=args.checkpoint_every,
                        keep_checkpoints=args.keep_checkpoints, resume=args.resume, overwrite=args.overwrite,
                        save_format=args.save_format, device=args.device, progress=not args.quiet,
                        checkpoint_config=args.checkpoint_config)


def _fraction(text: str, flag: str) -> float:
    """"5%" or "0.05" -> 0.05."""
    raw = str(text).strip()
    try:
        value = float(raw.rstrip("%")) / (100 if raw.endswith("%") else 1)
    except ValueError:
        raise UsageError(f"{flag}: {text!r} is not a fraction (0.05) or a percentage (5%)") from None
    return value


PLAN_FIXED = frozenset({"model", "method", "lora_targets", "lokr_factor", "num_vectors", "hypernetwork_layers",
                        "prior_preservation", "train_text_encoder", "ema", "alpha", "gpu", "num_gpus"})


def _fit_arguments(parser: argparse.ArgumentParser) -> None:
    add_spec_flags(parser)
    group = parser.add_argument_group("search")
    group.add_argument("--effective-batch", metavar="N", type=int,
                       help="images per optimizer step to keep; fit splits them into per-step batch "
                            "x gradient accumulation (default: --batch-size x "
                            "--gradient-accumulation-steps, i.e. 1)")
    group.add_argument("--min-rank", metavar="R", type=int,
                       help="lowest rank fit may choose (default: 4, or --rank when it is given)")
    group.add_argument("--min-resolution", metavar="N", type=int,
                       help="allow lowering the resolution down to N pixels (default: never)")
    group.add_argument("--prefer", metavar="ORDER",
                       help="the objective: quality (default: no quantization, higher rank, larger "
                            "per-step batch, then with several GPUs the strategy with the least "
                            "communication -- ddp, zero1, zero2, fsdp shard-grad-op, fsdp full-shard, "
                            "zero3, then offloading the optimizer, then the parameters -- then no "
                            "checkpointing, in that order: fit turns checkpointing on before it shards "
                            "or offloads), speed (batch, strategy and checkpointing first), or a comma "
                            "list of resolution, precision, quant, rank, optimizer, batch, strategy, "
                            "checkpointing, cache-latents, cache-text, attention to put first")
    group.add_argument("--top", metavar="N", type=int, default=5,
                       help="list at most N plans (default: 5)")
    group.add_argument("--margin", metavar="PCT",
                       help="safety margin below the card, e.g. 5%% (default: the estimator's "
                            "measured error band, 3%% until GPU profiles exist)")
    group.add_argument("--host-ram", metavar="SIZE",
                       help="several GPUs: the host RAM per node a plan may use for what it offloads "
                            "(e.g. 128GB); plans that need more are not listed (default: not checked, "
                            "but shown for every plan)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true",
                     help="print the chosen plan as TrainingSpec JSON (what --plan takes) and nothing "
                          "else; for several GPUs the estimate's JSON of the plan, its spec under "
                          "\"spec\" with the \"per_gpu\" and \"host\" sections and the search's "
                          "\"fit\" (every --plan reads either form)")
    out.add_argument("--emit", choices=("diffusers", "kohya", "accelerate"),
                     help="print the chosen plan as the diffusers example script's command line, "
                          "kohya sd-scripts' command line, or an accelerate config YAML (with several "
                          "GPUs its distributed section; for zero1/2/3 the DeepSpeed JSON follows "
                          "as a second YAML document, after '---', to save as deepspeed.json)")
    out.add_argument("--emit-dir", metavar="FOLDER", type=Path,
                     help="with --emit accelerate: write accelerate.yaml (and deepspeed.json for "
                          "zero1/2/3) into FOLDER instead of printing them")
    out.add_argument("--train", action="store_true", help="then train with the chosen plan")
    _train_run_flags(parser, model_flag="--model-path", required=False)


def _searching(search, request):
    """The search, with a spinner on stderr when it is a terminal (an SDXL search takes seconds;
    nothing is drawn into a pipe or a file, so --json output stays clean). What the search
    leaves alive is frozen (`timeline.gc_paused(freeze=True)`): this process ends soon after,
    and the collector's first pass over it cost 0.2-0.3 s after an SDXL search."""
    from rich.console import Console

    from vramplan.timeline import gc_paused

    console = Console(stderr=True)
    with gc_paused(freeze=True):
        if not console.is_terminal:
            return search(request)
        cards = f"{request.spec.num_gpus} x {request.gpu.name}" if request.spec.num_gpus > 1 else request.gpu.name
        with console.status(f"searching the settings that fit {cards}...", spinner="dots"):
            return search(request)


@command("fit", "the best settings that fit a card, searched with the estimate",
         arguments=_fit_arguments,
         examples=(
             "vramplan fit --model sdxl --method lora --gpu 8GB",
             "vramplan fit --model sd15 --method dreambooth --gpu 12GB --json > plan.json",
             "vramplan fit --model flux-dev --method lora --gpu 24GB --min-rank 16 --resolution 1024",
             "vramplan fit --model sd15 --method lora --gpu 8GB --emit diffusers",
             "vramplan fit --model sd15 --method lora --gpu 8GB --train --model-path ./my-sd15 "
             "--data ./photos --output ./run",
             "vramplan fit --model sdxl --method full --gpus 4xrtx4090 --host-ram 128GB",
             "vramplan fit --model sdxl --method full --gpus 4xrtx4090 --emit accelerate --emit-dir ./launch",
         ))
def fit_command(args: argparse.Namespace) -> int:
    """Search batch size (keeping the effective batch), gradient checkpointing, precision,
    optimizer, latent and text-embedding caching, base quantization and rank (and resolution
    with --min-resolution) for the best plans that fit --gpu with a safety margin. With several
    GPUs (--gpus 4xrtx4090) also the strategy and offload (unless --strategy / --offload fix
    them), each plan counted per GPU, with the host RAM an offload needs. Flags you give are
    kept as they are. Exit status 1 when nothing fits, with what makes it impossible."""
    from vramplan.fit import fit_request, search
    from vramplan.fit.emit import Paths, emit, write_accelerate

    if args.json and args.emit:
        raise UsageError("--json and --emit both print the plan: give one of them")
    if args.emit_dir is not None and args.emit != "accelerate":
        raise UsageError("--emit-dir writes the files of --emit accelerate: give --emit accelerate with it")
    host_ram = None
    if args.host_ram is not None:
        from vramplan.units import parse_bytes

        try:
            host_ram = parse_bytes(args.host_ram)
        except UsageError as error:
            raise UsageError(f"--host-ram: {error}") from None
    plan = read_plan(args.plan) if args.plan is not None else None
    flags = given_options(args)
    spec = resolve_spec(flags, plan, args.plan)
    if plan is not None:
        import dataclasses

        # A plan's memory knobs are where the search starts, not constraints: only the flags
        # typed here and what defines the training (model, method, what it trains) stay fixed.
        spec = dataclasses.replace(spec, given=frozenset(flags) | (spec.given & PLAN_FIXED))
    if host_ram is not None and not spec.is_distributed:
        raise UsageError("--host-ram checks what several GPUs offload: give --gpus COUNTxCARD (or --strategy)")
    request = fit_request(spec, effective_batch=args.effective_batch, min_rank=args.min_rank,
                          min_resolution=args.min_resolution, prefer=args.prefer, top=args.top,
                          margin=None if args.margin is None else _fraction(args.margin, "--margin"),
                          host_ram=host_ram)
    options = _train_options(args) if args.train else None
    if options is not None:
        # the run's inputs are checked before the search, so a typo fails in a second
        from vramplan.train.inputs import check_data, check_model, check_output

        options.check()
        check_model(spec, options.model_path)
        check_data(spec, options)
        check_output(spec, options)
    result = _searching(search, request)
    if args.json:
        if result.fits:
            _print_json(_plan_json(result))
        else:
            _print_json(result.to_json())
    elif args.emit:
        if result.fits and args.emit_dir is not None:
            for path in write_accelerate(result.best.spec, args.emit_dir):
                print(f"launch file written to {path}")
        elif result.fits:
            paths = Paths(model=None if args.model_path is None else str(args.model_path),
                          data=str(args.data or "./data"), output=str(args.output or "./output"),
                          class_data=str(args.class_data or "./class_data"),
                          instance_prompt=args.instance_prompt or Paths.instance_prompt,
                          class_prompt=args.class_prompt or Paths.class_prompt, steps=args.steps)
            sys.stdout.write(emit(result.best.spec, args.emit, paths))
        else:
            print(f"vramplan: nothing fits {spec.gpu.name}: run without --emit to see why", file=sys.stderr)
    else:
        from rich.console import Console

        from vramplan.render.plans import render_fit

        render_fit(result, Console())
    if not result.fits:
        return 1
    if options is not None:
        from vramplan.train import train

        outcome = train(result.best.spec, options)
        if isinstance(outcome, int):      # several GPUs: accelerate launch's exit status
            return outcome
    return 0


def _plan_json(result) -> dict:
    """--json: the spec for one GPU; for several, the winner's estimate JSON (spec, per_gpu, host)
    with what the search checked."""
    best = result.best
    if not best.spec.is_distributed:
        return best.spec.to_json()
    out = best.estimate.to_json() if hasattr(best.estimate.distributed, "single_gpu_peak_allocated_bytes") \
        else {"spec": best.spec.to_json()}
    out["fit"] = {"required_bytes": best.required_bytes, "headroom_bytes": best.headroom_bytes,
                  "margin": result.margin.fraction, "host_ram_bytes_per_node": best.host_bytes or 0,
                  "host_ram_limit_bytes": result.request.host_ram, "host_fits": best.host_fits,
                  "prefer": [c.value for c in result.request.prefer]}
    return out


# -- train ---------------------------------------------------------------------------------------

def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plan", metavar="FILE", type=Path, required=True,
                        help="the plan to run: TrainingSpec JSON from 'vramplan fit --json' or "
                             "'vramplan estimate --json'")
    _train_run_flags(parser, model_flag="--model", required=True)
    parser.add_argument("--launched", action="store_true",
                        help="this process is one rank of an accelerate job already: train, do not "
                             "launch (vramplan train adds it to the processes it starts)")


@command("train", "run a plan: a real fine-tune on a local pipeline and a folder of images",
         arguments=_train_arguments,
         examples=(
             "vramplan train --plan plan.json --model ./my-sd15 --data ./photos --output ./run",
             "vramplan train --plan plan.json --model ./my-sd15 --data ./photos --output ./run --resume",
             "accelerate launch -m vramplan train --plan plan.json --model ./my-sdxl --data ./photos "
             "--output ./run",
             "vramplan train --plan plan-4xrtx4090.json --model ./my-sdxl --data ./photos --output ./run"
             "    # starts the 4 processes with accelerate launch",
         ))
def train_command(args: argparse.Namespace) -> int:
    """Fine-tune with the plan's settings and the step every tier shares, on CUDA when there is
    one: progress with loss, speed, ETA and memory; checkpoints every --checkpoint-every steps
    (--resume continues); at the end the steps' measured peak beside the estimate's (on CUDA,
    predicted for the card it ran on), loading's peak apart, and the result saved as diffusers
    loads it (LoRA / LoHa / LoKr weights, textual-inversion embeddings, or the pipeline folder
    of a full fine-tune). On CUDA, with a profiles/ folder where it runs, the peaks are stored
    as a profile for `vramplan validate`.

    A plan for several GPUs (num_gpus > 1) is run as that many processes: train writes the
    plan's accelerate config (and DeepSpeed JSON) to a temporary folder and runs
    `accelerate launch --config_file ... -m vramplan train ... --launched`; each process, and any
    process `accelerate launch` or torchrun started, trains as one rank with accelerate's
    Accelerator preparing the step as the plan's strategy says. --device cpu runs the processes
    on the CPU (gloo)."""
    spec = resolve_spec({}, read_plan(args.plan), args.plan)
    from vramplan.train import train

    outcome = train(spec, _train_options(args), launched=args.launched)
    return outcome if isinstance(outcome, int) else 0

"""Rich renderables for one estimate: the spec, the categories, the totals, the verdict, the notes.

`render_estimate(estimate, console)` composes them around the grid; each piece is also usable
alone (compare and the other commands reuse them). Nothing here computes memory: it only formats
what an `Estimate` already holds.
"""

from __future__ import annotations

from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.style import Style
from rich.table import Table
from rich.text import Text

from vramplan.estimate.result import Estimate
from vramplan.footprint import Footprint
from vramplan.render.grid import OVER_COLOR, GridView, display_unit, legend_table
from vramplan.spec import Method, TrainingSpec
from vramplan.units import format_bytes

FITS_COLOR = "#2e9e44"

# What each total is, as the tool that measures it names it.
TOTALS = (
    ("peak allocated", "peak_allocated_bytes", "torch.cuda.max_memory_allocated()"),
    ("peak reserved", "peak_reserved_bytes", "torch.cuda.max_memory_reserved()"),
    ("device used", "device_used_bytes", "what nvidia-smi shows (NVML)"),
)


def estimate_unit(estimate: Estimate) -> str:
    """GB when the user gave the card in GB, else GiB."""
    return display_unit(estimate.gpu)


# -- the spec ------------------------------------------------------------------------------------

def method_summary(spec: TrainingSpec) -> str:
    method = spec.method
    if method in (Method.LORA, Method.LOHA, Method.LOKR):
        text = f"{method.value} rank {spec.rank}, alpha {spec.alpha:g}, {spec.lora_targets.value}"
        if method is Method.LOKR and spec.lokr_factor not in (None, -1):
            text += f", factor {spec.lokr_factor}"
        return text
    if method is Method.TEXTUAL_INVERSION:
        vectors = spec.num_vectors or 1
        return f"{method.value}, {vectors} vector{'s' if vectors != 1 else ''}"
    if method is Method.HYPERNETWORK:
        layers = ",".join(f"{x:g}" for x in spec.hypernetwork_layers or ())
        return f"{method.value}, layers {layers}"
    if method is Method.DREAMBOOTH:
        return "dreambooth (full, prior preservation)"
    return method.value


def precision_summary(spec: TrainingSpec) -> str:
    text = spec.precision.value + (" mixed" if spec.precision.autocast else "")
    if spec.base_quant.value != "none":
        text += f", base {spec.base_quant.value}"
    return text


def optimizer_summary(spec: TrainingSpec) -> str:
    if spec.momentum:
        return f"{spec.optimizer.value}, momentum {spec.momentum:g}"
    return spec.optimizer.value


def batch_summary(spec: TrainingSpec) -> str:
    text = str(spec.batch_size)
    if spec.prior_preservation:
        text += f" (+{spec.batch_size} class = {spec.images_per_step} images)"
    if spec.gradient_accumulation_steps > 1:
        text += f" × {spec.gradient_accumulation_steps} accumulation"
    return text


def tricks(spec: TrainingSpec) -> list[str]:
    names = []
    if spec.gradient_checkpointing:
        names.append("gradient checkpointing")
    if spec.train_text_encoder:
        names.append("train text encoder")
    if spec.cache_latents:
        names.append("cached latents")
    if spec.cache_text_embeddings:
        names.append("cached text embeddings")
    if spec.ema:
        names.append("EMA")
    return names


def gpu_summary(spec: TrainingSpec) -> str:
    if spec.gpu is None:
        return "none given"
    unit = display_unit(spec.gpu)
    text = f"{spec.gpu.name} ({format_bytes(spec.gpu.memory_bytes, unit)})"
    return text + (f" × {spec.num_gpus}" if spec.num_gpus > 1 else "")


def spec_rows(spec: TrainingSpec) -> list[tuple[str, str]]:
    width, height = spec.resolution
    return [
        ("model", f"{spec.model.name} ({spec.model.key})"),
        ("method", method_summary(spec)),
        ("precision", precision_summary(spec)),
        ("optimizer", optimizer_summary(spec)),
        ("batch", batch_summary(spec)),
        ("resolution", f"{width}×{height}"),
        ("attention", spec.attention.value),
        ("tricks", ", ".join(tricks(spec)) or "none"),
        ("gpu", gpu_summary(spec)),
    ]


def spec_panel(spec: TrainingSpec, title: str = "training spec") -> Panel:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="dim", no_wrap=True)
    table.add_column()
    for key, value in spec_rows(spec):
        table.add_row(key, value)
    return Panel(table, title=title, title_align="left", expand=False, border_style="dim")


def estimate_title(estimate: Estimate) -> str:
    """One line naming the run: model, method, precision, GPU."""
    spec = estimate.spec
    method = spec.method.value + (f" r{spec.rank}" if spec.rank is not None else "")
    gpu = "no GPU" if spec.gpu is None else spec.gpu.name
    return f"{spec.model.name} · {method} · {spec.precision.value} · {gpu}"


def spec_values(spec: TrainingSpec) -> dict:
    """The spec's fields as plain values (resolution as "WxH"), for tables and frames."""
    values = spec.to_json()
    values["resolution"] = "x".join(str(v) for v in spec.resolution)
    if values.get("hypernetwork_layers") is not None:
        values["hypernetwork_layers"] = ",".join(f"{x:g}" for x in spec.hypernetwork_layers)
    return values


def varied_fields(specs: list[TrainingSpec]) -> list[str]:
    """The spec fields whose values differ between the specs, in field order."""
    rows = [spec_values(s) for s in specs]
    if not rows:
        return []
    return [key for key in rows[0] if any(row.get(key) != rows[0][key] for row in rows[1:])]


# Short names for titles; fields whose value names itself (lora, fp16, adamw, sd15) have none.
SHORT_NAMES = {
    "rank": "rank", "alpha": "alpha", "lokr_factor": "factor", "num_vectors": "vectors",
    "hypernetwork_layers": "layers", "prior_preservation": "prior preservation",
    "momentum": "momentum", "batch_size": "batch", "gradient_accumulation_steps": "accumulation",
    "resolution": "", "gradient_checkpointing": "checkpointing",
    "train_text_encoder": "train text encoder", "cache_latents": "cached latents",
    "cache_text_embeddings": "cached text embeddings", "ema": "EMA", "num_gpus": "GPUs",
}


def difference_title(spec: TrainingSpec, fields: list[str]) -> str:
    """"lora · rank 4 · batch 2 · checkpointing": what sets the spec apart (unset: left out)."""
    values = spec_values(spec)
    words = []
    for key in fields:
        value = values[key]
        if value is None:
            continue
        name = SHORT_NAMES.get(key, "")
        if isinstance(value, bool):
            words.append(name if value else f"no {name}")
        elif isinstance(value, float):
            words.append(f"{name} {value:g}".strip())
        else:
            words.append(f"{name} {value}".strip())
    return " · ".join(words)


def title_fields(specs: list[TrainingSpec]) -> list[str]:
    """The varied fields a user set on some spec: rank, not the alpha that follows it."""
    varied = varied_fields(specs)
    chosen = [name for name in varied if any(name in spec.given for spec in specs)]
    return chosen or varied


# -- the numbers ---------------------------------------------------------------------------------

def category_table(footprint: Footprint, unit: str = "GiB", capacity_bytes: int | None = None,
                   colour: bool = True) -> Table:
    """Category, size in `unit`, share of device used; a total; then free card or the overflow."""
    return legend_table(footprint.categories, capacity_bytes, unit, colour=colour, total_row=True)


def totals_table(footprint: Footprint, unit: str = "GiB") -> Table:
    table = Table(box=None, show_header=False, padding=(0, 1), pad_edge=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    table.add_column(style="dim")
    for label, attribute, meaning in TOTALS:
        table.add_row(label, format_bytes(getattr(footprint, attribute), unit), meaning)
    if footprint.peak_phase:
        table.add_row("peak phase", footprint.peak_phase, "", style="dim")
    return table


def verdict_text(estimate: Estimate, unit: str | None = None) -> Text:
    """"✓ fits on <gpu> with 3.2 GB headroom" or "✗ does NOT fit on <gpu>: 1.1 GB short"."""
    unit = unit or estimate_unit(estimate)
    used = estimate.footprint.device_used_bytes
    gpu = estimate.gpu
    if gpu is None:
        return Text.assemble(("? ", "bold"), "needs ", (format_bytes(used, unit), "bold"),
                             " on the device; give --gpu to check a card")
    of = f" of {format_bytes(gpu.memory_bytes, unit)} ({100 * used / gpu.memory_bytes:.0f}%), "
    if estimate.fits:
        return Text.assemble(
            ("✓ fits", Style(color=FITS_COLOR, bold=True)), f" on {gpu.name}: ",
            (format_bytes(used, unit), "bold"), of,
            (format_bytes(estimate.headroom_bytes, unit), "bold"), " headroom")
    return Text.assemble(
        ("✗ does NOT fit", Style(color=OVER_COLOR, bold=True)), f" on {gpu.name}: needs ",
        (format_bytes(used, unit), "bold"), of,
        (format_bytes(-estimate.headroom_bytes, unit), Style(color=OVER_COLOR, bold=True)),
        " short")


def notes_view(notes) -> RenderableType:
    if not notes:
        return Text("")
    table = Table.grid(padding=(0, 1))
    table.add_column(style="dim", no_wrap=True)
    table.add_column()
    for note in notes:
        table.add_row("•", str(note))
    return Group(Text("notes", "dim"), table)


# -- the whole answer ----------------------------------------------------------------------------

def grid_panel(estimate: Estimate, colour: bool = True) -> Panel:
    """The grid beside the category table (which is its legend), framed with the GPU's name."""
    unit = estimate_unit(estimate)
    gpu = estimate.gpu
    capacity = None if gpu is None else gpu.memory_bytes
    view = GridView.from_estimate(estimate, legend=False)
    body = Table.grid(padding=(0, 4))
    body.add_row(view, category_table(estimate.footprint, unit, capacity, colour))
    title = "device" if gpu is None else f"{gpu.name}, {format_bytes(gpu.memory_bytes, unit)}"
    border = "dim" if estimate.fits is not False else Style(color=OVER_COLOR)
    return Panel(body, title=title, title_align="left", expand=False, border_style=border)


def parameters_table(estimate: Estimate) -> Table:
    """Parameters per component (exact, from the inventories) and what trains."""
    table = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
    table.add_column("component")
    table.add_column("parameters", justify="right")
    table.add_column("trainable", justify="right")
    for name, p in estimate.parameters.items():
        table.add_row(name, f"{p.total:,}", f"{p.trainable:,}" if p.trainable else "-")
    if estimate.adapter_file_bytes is not None:
        table.add_row("adapter file", "", f"{estimate.adapter_file_bytes / 2**20:.1f} MiB (fp16 safetensors)")
    return table


def estimate_view(estimate: Estimate, colour: bool = True) -> Group:
    unit = estimate_unit(estimate)
    parts = [
        spec_panel(estimate.spec, title=f"vramplan {estimate.footprint.source}"),
        parameters_table(estimate),
        grid_panel(estimate, colour),
        totals_table(estimate.footprint, unit),
        Text(""),
        verdict_text(estimate, unit),
    ]
    if estimate.notes:
        parts += [Text(""), notes_view(estimate.notes)]
    return Group(*parts)


def render_estimate(estimate: Estimate, console: Console) -> None:
    colour = console.color_system is not None and not console.no_color
    console.print(estimate_view(estimate, colour))

"""Rich renderables for one simulation: what `estimate` shows, plus what only a trace can tell.

A `Simulation` has the footprint an `Estimate` has, so the spec panel, the grid, the totals and the
verdict are the estimate's own pieces (`as_estimate`). After them come the peak of each phase of
the step and what filled it (`phase_table`), the layers that save the most for backward
(`top_layers_table`) and, with an analytic estimate beside it, both per category and per total
with the relative error (`comparison_table`). Nothing here runs the simulation or imports torch:
a `Simulation` is only read, so hand-built ones render the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.measure import Measurement
from rich.style import Style
from rich.table import Table
from rich.text import Text

from vramplan.estimate.result import Estimate
from vramplan.footprint import Category
from vramplan.render.grid import OVER_COLOR, SYMBOLS, display_unit, ordered_categories
from vramplan.render.tables import (
    FITS_COLOR, TOTALS, grid_panel, notes_view, spec_panel, totals_table, verdict_text,
)
from vramplan.units import GB, GIB, KB, KIB, MB, MIB, to_unit

# The bar the issue holds the estimator to: peak allocated within 3% of the simulation.
TOLERANCE = 0.03
BAR_WIDTH, BAR_MIN = 24, 6     # characters of the widest phase bar (the overall peak)
MODULE_WIDTH = 48       # module paths longer than this are shortened
UNIT_BYTES = {"GiB": GIB, "GB": GB, "MiB": MIB, "MB": MB, "KiB": KIB, "kB": KB}

# diffusers / transformers container names, and what a shortened path calls them.
SHORT_CONTAINERS = (
    ("single_transformer_blocks.", "single."),
    ("transformer_blocks.", "block."),
    ("down_blocks.", "down."),
    ("up_blocks.", "up."),
    ("mid_block.", "mid."),
    ("attentions.", "attn."),
    ("resnets.", "resnet."),
    ("text_model.encoder.layers.", "layers."),
    ("encoder.block.", "block."),
)


def _table(title: str, caption: str | None = None) -> Table:
    """The tables below the grid: a bold title, a dim header over a rule, sections parted by a
    blank line (rich's SIMPLE_HEAD box, as `vramplan models`), an optional dim caption."""
    return Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD,
                 show_edge=False, padding=(0, 1, 0, 0), pad_edge=False, header_style="dim",
                 caption=caption, caption_justify="left", caption_style="dim")


def as_estimate(simulation) -> Estimate:
    """The simulation's footprint in an `Estimate`'s shape, for the views and charts taking one."""
    return Estimate(spec=simulation.spec, parameters=simulation.parameters,
                    footprint=simulation.footprint, notes=tuple(simulation.notes))


def small_unit(unit: str) -> str:
    """MiB beside GiB, MB beside GB: the unit for sizes well under a square."""
    return "MB" if unit == "GB" else "MiB"


def human_bytes(nbytes: int | float, unit: str = "GiB", signed: bool = False) -> str:
    """Sizes of a square and more in `unit`, smaller ones in its MiB/MB or KiB/kB: "2.29 GiB",
    "3.04 MiB", "1.00 KiB"."""
    big = GB if unit == "GB" else GIB
    shown = unit if abs(nbytes) >= big else small_unit(unit)
    if abs(nbytes) < big / 1024:
        shown = "kB" if unit == "GB" else "KiB"
    sign = "+" if signed and nbytes > 0 else ""
    return f"{sign}{nbytes / UNIT_BYTES[shown]:.2f} {shown}"


# -- the phases ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class PhaseRow:
    """The highest live bytes in one phase of the step, and what was live then."""

    phase: str
    peak_bytes: int
    composition: dict               # Category -> bytes at that peak

    def largest(self, count: int = 2) -> list[tuple[Category, int]]:
        """The `count` largest categories at the peak, largest first (ties: layout order)."""
        layout = ordered_categories(self.composition)
        return sorted(layout, key=lambda item: -item[1])[:count]

    @property
    def dominant(self) -> Category | None:
        top = self.largest(1)
        return top[0][0] if top else None


def phase_rows(simulation) -> list[PhaseRow]:
    """`analysis.phase_peaks` in step order, a phase entered twice in a row shown once (its
    higher peak): the tracker marks "encode" again when the batch is made."""
    rows: list[PhaseRow] = []
    for name, peak, composition in simulation.analysis.phase_peaks:
        row = PhaseRow(name, int(peak), dict(composition))
        if rows and rows[-1].phase == name:
            if row.peak_bytes > rows[-1].peak_bytes:
                rows[-1] = row
            continue
        rows.append(row)
    return rows


def phase_peaks_json(simulation) -> list[dict]:
    """[{phase, peak_bytes, dominant}] for `simulate --json`: dominant is a category value."""
    return [{"phase": row.phase, "peak_bytes": row.peak_bytes,
             "dominant": None if row.dominant is None else row.dominant.value}
            for row in phase_rows(simulation)]


def composition_bar(composition: dict, scale_bytes: int, width: int = BAR_WIDTH,
                    colour: bool = True) -> Text:
    """A bar `width` characters long at `scale_bytes`, split by category in layout order.

    Each character goes to the category covering most of it, so small categories may not show:
    the bar is for the eye, the numbers beside it are exact.
    """
    layout = ordered_categories(composition)
    total = sum(n for _, n in layout)
    cells = round(width * total / scale_bytes) if scale_bytes else 0
    bar = Text(no_wrap=True)
    edges, offset = [], 0
    for category, nbytes in layout:
        edges.append((category, offset, offset + nbytes))
        offset += nbytes
    for i in range(cells):
        lo, hi = total * i / cells, total * (i + 1) / cells
        best = max(edges, key=lambda e: min(hi, e[2]) - max(lo, e[1]))[0]
        if colour:
            bar.append("█", Style(color=best.color))
        else:
            bar.append(SYMBOLS[best])
    return bar


def phase_table(simulation, unit: str | None = None, colour: bool = True,
                bar_width: int = BAR_WIDTH) -> Table:
    """Phase, its peak allocated, a bar of what was live (to the scale of the step's peak), and
    the largest categories then with their shares; the step's peak is marked, and a blank line
    parts the first step from the second (whose optimizer already holds its state)."""
    unit = unit or display_unit(simulation.spec.gpu)
    rows = phase_rows(simulation)
    overall = simulation.footprint.peak_allocated_bytes or max((r.peak_bytes for r in rows),
                                                               default=0)
    table = _table("peak allocated by phase")
    table.add_column("phase", no_wrap=True)
    table.add_column(unit, justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    table.add_column("what filled it")         # the one column that wraps on a narrow terminal
    peak_marked = False
    for index, row in enumerate(rows):
        is_peak = not peak_marked and row.peak_bytes == overall
        peak_marked |= is_peak
        style = "bold" if is_peak else ""
        name = Text(row.phase, style)
        if is_peak:
            name.append(" ◀", Style(color=OVER_COLOR, bold=True) if colour else "bold")
        next_row = rows[index + 1] if index + 1 < len(rows) else None
        end_section = next_row is not None and _step_of(next_row.phase) != _step_of(row.phase)
        table.add_row(name,
                      Text(f"{to_unit(row.peak_bytes, unit):.2f}", style),
                      composition_bar(row.composition, overall, bar_width, colour),
                      largest_text(row), end_section=end_section)
    return table


class PhaseView:
    """`phase_table` with its bar as wide as the console allows (BAR_MIN to BAR_WIDTH), so the
    category names beside it keep to one line where they can."""

    def __init__(self, simulation, unit: str | None = None, colour: bool = True):
        self.simulation, self.unit, self.colour = simulation, unit, colour

    def _table(self, console: Console, options: ConsoleOptions) -> Table:
        table = phase_table(self.simulation, self.unit, self.colour)
        natural = Measurement.get(console, options.update_width(10_000), table).maximum
        excess = natural - options.max_width
        if excess > 0:
            table = phase_table(self.simulation, self.unit, self.colour,
                                max(BAR_MIN, BAR_WIDTH - excess))
        return table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self._table(console, options)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement.get(console, options, self._table(console, options))


def largest_text(row: PhaseRow) -> Text:
    """"Parameter, frozen 87% · Activation (saved) 12%": the largest category, and the next
    when it holds at least 1% (under weights that fill most of a card, it is the news)."""
    text = Text()
    for position, (category, nbytes) in enumerate(row.largest(2)):
        share = 100 * nbytes / row.peak_bytes if row.peak_bytes else 0.0
        if position and share < 1:
            break
        if position:
            text.append(" · ", "dim")
        text.append(f"{category.label} {share:.0f}%", "" if position == 0 else "dim")
    return text


def _step_of(phase: str) -> str:
    """"step 2 forward" -> "step 2"; the first step's phases carry no prefix."""
    words = phase.split()
    return " ".join(words[:2]) if len(words) > 2 and words[0] == "step" else ""


# -- the layers ----------------------------------------------------------------------------------

def short_module(path: str, width: int = MODULE_WIDTH, *, abbreviate: bool | None = None) -> str:
    """A module path that fits `width`. With `abbreviate` (default: when the path is too long)
    container names are shortened (down_blocks -> down, attentions -> attn, transformer_blocks ->
    block ...); a path still too long loses its middle, keeping the component it starts with and
    the layers it ends with."""
    if not path:
        return "(outside any module)"
    if abbreviate is None:
        abbreviate = len(path) > width
    if abbreviate:
        for long, short in SHORT_CONTAINERS:
            path = path.replace("." + long, "." + short)
    if len(path) <= width:
        return path
    head, *tail = path.split(".")
    while tail and len(head) + 3 + len(".".join(tail)) > width:
        tail = tail[1:]
    return f"{head}.….{'.'.join(tail)}" if tail else path[:width - 1] + "…"


def saved_activation_bytes(simulation) -> int:
    """Bytes autograd saved in the first step: the basis of `top_layers` (records of the second
    step are left out there too), or the activations at the peak when there are no records."""
    total = sum(r.nbytes for r in simulation.records
                if r.category is Category.ACTIVATIONS and not r.phase.startswith("step 2"))
    return total or simulation.footprint.category_bytes(Category.ACTIVATIONS)


def top_layers_table(simulation, unit: str | None = None, colour: bool = True) -> Table:
    """The layers whose outputs autograd saves the most bytes of, with their share of all saved."""
    unit = unit or display_unit(simulation.spec.gpu)
    total = saved_activation_bytes(simulation)
    table = _table("top layers by saved activation bytes",
                   f"share: of the {human_bytes(total, unit)} autograd saved in one step"
                   if total else None)
    table.add_column("#", justify="right", style="dim", no_wrap=True)
    table.add_column("module", no_wrap=True)
    table.add_column(small_unit(unit), justify="right", no_wrap=True)
    table.add_column("share", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    # Shorten every path the same way when one is too long, so the rows read alike.
    abbreviate = any(len(module) > MODULE_WIDTH for module, _ in simulation.top_layers)
    largest = max((b for _, b in simulation.top_layers), default=0)
    for rank, (module, nbytes) in enumerate(simulation.top_layers, 1):
        shown = short_module(module, abbreviate=abbreviate)
        prefix, _, leaf = shown.rpartition(".") if module else ("", "", shown)
        name = Text.assemble((prefix + "." if prefix else "", "dim"), leaf)
        share = 100 * nbytes / total if total else 0.0
        bar_len = round(10 * nbytes / largest) if largest else 0
        bar = Text("█" * bar_len, Style(color=Category.ACTIVATIONS.color) if colour else "")
        table.add_row(str(rank), name, f"{to_unit(nbytes, small_unit(unit)):.2f}",
                      f"{share:.1f}%", bar)
    if not simulation.top_layers:
        table.add_row("", Text("no saved activations", "dim"), "", "", "")
    return table


# -- the estimate held against the simulation ----------------------------------------------------

def relative_error(estimated: int, simulated: int) -> float | None:
    """(estimate - simulate) / simulate; None when the simulation has none of it."""
    return None if simulated == 0 else (estimated - simulated) / simulated


def comparison_rows(estimate: Estimate, simulation) -> list[tuple[str, str | None, int, int]]:
    """(kind, name, estimated bytes, simulated bytes): every category either has, then the totals.

    kind is "category" (name: the Category value) or "total" (name: the footprint attribute).
    """
    est, sim = estimate.footprint, simulation.footprint
    rows = []
    for category in Category:
        e, s = est.category_bytes(category), sim.category_bytes(category)
        if e or s:
            rows.append(("category", category.value, e, s))
    for _, attribute, _ in TOTALS:
        rows.append(("total", attribute, int(getattr(est, attribute)),
                     int(getattr(sim, attribute))))
    return rows


def comparison_json(estimate: Estimate, simulation) -> dict:
    """{"categories": {name: {...}}, "totals": {name: {...}}}, each entry holding
    estimate_bytes, simulate_bytes and relative_error (None where the simulation has none)."""
    out: dict = {"categories": {}, "totals": {}}
    for kind, name, e, s in comparison_rows(estimate, simulation):
        error = relative_error(e, s)
        out["categories" if kind == "category" else "totals"][name] = {
            "estimate_bytes": e, "simulate_bytes": s,
            "relative_error": None if error is None else round(error, 6)}
    out["tolerance"] = TOLERANCE
    return out


def _error_text(error: float | None, estimated: int, colour: bool, bold: bool) -> Text:
    if error is None:
        return Text("only estimated" if estimated else "", "dim")
    within = abs(error) <= TOLERANCE
    text = f"{100 * error:+.2f}%"
    if not colour:
        return Text(text + ("" if within else " !"), "bold" if bold else "")
    return Text(text, Style(color=FITS_COLOR if within else OVER_COLOR, bold=bold))


def comparison_table(estimate: Estimate, simulation, unit: str | None = None,
                     colour: bool = True) -> Table:
    """Estimate and simulation side by side: each category, then the three totals; the error is
    green within 3% and red beyond it."""
    unit = unit or display_unit(simulation.spec.gpu)
    table = _table("estimate vs simulate",
                   f"error: (estimate - simulate) / simulate, "
                   + (f"green within {100 * TOLERANCE:.0f}%" if colour
                      else f"! beyond {100 * TOLERANCE:.0f}%"))
    table.add_column("", no_wrap=True)
    table.add_column("estimate", justify="right", no_wrap=True)
    table.add_column("simulate", justify="right", no_wrap=True)
    table.add_column("difference", justify="right", no_wrap=True)
    table.add_column("error", justify="right", no_wrap=True)
    rows = comparison_rows(estimate, simulation)
    labels = {attribute: label for label, attribute, _ in TOTALS}
    for index, (kind, name, e, s) in enumerate(rows):
        total = kind == "total"
        label = labels[name] if total else Category(name).label
        style = "bold" if total else ""
        first_total = total and (index == 0 or rows[index - 1][0] != "total")
        if first_total and index:
            table.rows[-1].end_section = True
        table.add_row(Text(label, style), Text(human_bytes(e, unit), style),
                      Text(human_bytes(s, unit), style),
                      Text(human_bytes(e - s, unit, signed=True) if e != s else "0", "dim"),
                      _error_text(relative_error(e, s), e, colour, total))
    return table


# -- the whole answer ----------------------------------------------------------------------------

def run_summary(simulation) -> Text:
    """"traced 2 training steps on fake tensors in 10.4 s: 12,941 allocations"."""
    steps = len({_step_of(name) for name, _ in simulation.phases}) or 1
    plural = "s" if steps != 1 else ""
    return Text(f"traced {steps} training step{plural} on fake tensors in "
                f"{simulation.seconds:.1f} s: {len(simulation.records):,} allocations", "dim")


def simulation_view(simulation, estimate: Estimate | None = None, colour: bool = True) -> Group:
    """The estimate's view of the simulated footprint, the phases, the top layers and, with
    `estimate`, the estimate held against the simulation."""
    as_est = as_estimate(simulation)
    unit = display_unit(simulation.spec.gpu)
    parts: list[RenderableType] = [
        spec_panel(simulation.spec, title="vramplan simulate"),
        grid_panel(as_est, colour),
        totals_table(simulation.footprint, unit),
        Text(""),
        verdict_text(as_est, unit),
        Text(""),
        PhaseView(simulation, unit, colour),
        Text(""),
        top_layers_table(simulation, unit, colour),
    ]
    if estimate is not None:
        parts += [Text(""), comparison_table(estimate, simulation, unit, colour)]
    if simulation.notes:
        parts += [Text(""), notes_view(simulation.notes)]
    parts += [Text(""), run_summary(simulation)]
    return Group(*parts)


def render_simulation(simulation, console: Console, estimate: Estimate | None = None) -> None:
    colour = console.color_system is not None and not console.no_color
    console.print(simulation_view(simulation, estimate, colour))


__all__ = [
    "PhaseRow", "as_estimate", "comparison_json", "comparison_rows", "comparison_table",
    "human_bytes", "phase_peaks_json", "phase_rows", "phase_table", "relative_error",
    "render_simulation", "short_module", "simulation_view", "top_layers_table",
]

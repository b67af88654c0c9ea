"""Several estimates at once: their grids side by side, one shared legend, one table of numbers.

Every grid uses the first estimate's unit and square size, so squares compare one to one.
"""

from __future__ import annotations

from rich.columns import Columns
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.measure import Measurement
from rich.panel import Panel
from rich.style import Style
from rich.table import Table
from rich.text import Text

from vramplan.estimate.result import Estimate
from vramplan.footprint import Category
from vramplan.render.grid import OVER_COLOR, GridView, display_unit, ordered_categories, swatch
from vramplan.render.tables import (
    FITS_COLOR, TOTALS, difference_title, estimate_title, spec_values, title_fields,
    varied_fields,
)
from vramplan.units import format_bytes, to_unit


def titled(estimates) -> list[tuple[str, Estimate]]:
    """(title, estimate) pairs; an estimate given alone is titled by what sets it apart."""
    items = [(None, e) if isinstance(e, Estimate) else tuple(e) for e in estimates]
    fields = title_fields([e.spec for _, e in items])
    out = []
    for title, estimate in items:
        if title is None:
            title = (difference_title(estimate.spec, fields) if fields else "") \
                or estimate_title(estimate)
        out.append((title, estimate))
    return out


def short_verdict(estimate: Estimate, unit: str) -> Text:
    if estimate.gpu is None:
        return Text(f"needs {format_bytes(estimate.footprint.device_used_bytes, unit)}", "bold")
    if estimate.fits:
        return Text.assemble(("✓ fits", Style(color=FITS_COLOR, bold=True)),
                             f", {format_bytes(estimate.headroom_bytes, unit)} free")
    return Text.assemble(("✗ does NOT fit", Style(color=OVER_COLOR, bold=True)),
                         f", {format_bytes(-estimate.headroom_bytes, unit)} short")


def comparison_table(items: list[tuple[str, Estimate]], unit: str, colour: bool = True) -> Table:
    """Rows: the varied spec fields, each category, the three totals, headroom, the verdict."""
    table = Table(box=None, padding=(0, 2), pad_edge=False, header_style="bold")
    table.add_column("", no_wrap=True)
    table.add_column("", no_wrap=True)
    for title, _ in items:
        table.add_column(title, justify="right", overflow="fold")
    estimates = [e for _, e in items]

    fields = varied_fields([e.spec for e in estimates])
    for name in fields:
        table.add_row("", Text(name, "dim"),
                      *[_value(spec_values(e.spec)[name]) for e in estimates])
    if fields:
        table.rows[-1].end_section = True
    present = set()
    for estimate in estimates:
        present |= {c for c, _ in ordered_categories(estimate.footprint.categories)}
    for category in Category:
        if category in present:
            table.add_row(swatch(category, colour), category.label,
                          *[f"{to_unit(e.footprint.category_bytes(category), unit):.2f}"
                            for e in estimates])
    if table.rows:
        table.rows[-1].end_section = True
    for label, attribute, _ in TOTALS:
        table.add_row("", Text(label, "bold"),
                      *[Text(f"{to_unit(getattr(e.footprint, attribute), unit):.2f}", "bold")
                        for e in estimates])
    table.add_row("", f"headroom ({unit})",
                  *[Text("-") if e.gpu is None else
                    Text(f"{to_unit(e.headroom_bytes, unit):+.2f}",
                         Style(color=FITS_COLOR if e.fits else OVER_COLOR))
                    for e in estimates])
    table.add_row("", "verdict",
                  *[Text("no GPU") if e.gpu is None else
                    Text("fits", Style(color=FITS_COLOR, bold=True)) if e.fits else
                    Text("does NOT fit", Style(color=OVER_COLOR, bold=True)) for e in estimates])
    return table


def _value(value) -> str:
    return "-" if value is None else str(value)


class CompareView:
    """Grids side by side (rich Columns), a legend, then one table comparing the numbers."""

    def __init__(self, estimates, *, per_row: int | None = None):
        self.items = titled(estimates)
        self.unit = display_unit(self.items[0][1].gpu) if self.items else "GiB"
        self.per_row = per_row

    def grids(self) -> list[GridView]:
        views = [GridView.from_estimate(e, unit=self.unit, legend=False, caption=False)
                 for _, e in self.items]
        per_row = self.per_row or max((v.per_row for v in views), default=8)
        for view in views:
            view.per_row = per_row
        return views

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if not self.items:
            yield Text("nothing to compare", "dim")
            return
        colour = console.color_system is not None and not console.no_color
        panels = []
        for (title, estimate), view in zip(self.items, self.grids()):
            gpu = estimate.gpu
            verdict = short_verdict(estimate, self.unit)
            heading = Text(title, "bold", overflow="fold")
            subtitle = Text("no GPU" if gpu is None else gpu.name, "dim", overflow="fold")
            # As wide as the grid (or the verdict): long titles wrap instead of widening it.
            width = max(Measurement.get(console, options, view).maximum, verdict.cell_len) + 4
            border = Style(color=OVER_COLOR) if estimate.fits is False else "dim"
            panels.append(Panel(Group(heading, subtitle, view, verdict), width=width,
                                border_style=border))
        yield Columns(panels, padding=(0, 2))
        yield self.legend(colour)
        yield Text("")
        yield comparison_table(self.items, self.unit, colour)

    def legend(self, colour: bool = True) -> Columns:
        present = set()
        for _, estimate in self.items:
            present |= {c for c, _ in ordered_categories(estimate.footprint.categories)}
        keys = [Text.assemble(swatch(c, colour), " ", c.label) for c in Category if c in present]
        if any(e.gpu is not None for _, e in self.items):
            keys.append(Text.assemble(swatch(None, colour), " free"))
        if any(e.fits is False for _, e in self.items):
            keys.append(Text.assemble(swatch(None, colour, over=True), " over capacity"))
        square = "1 GB" if self.unit == "GB" else "1 GiB"
        return Columns([Text(f"1 square = {square}:", "dim")] + keys, padding=(0, 2))

"""The card as a grid of squares, each square coloured by what fills it.

Layout. Categories are laid end to end in `Category` order (frozen weights first, allocator reserve
last) from byte 0, and the line of bytes is cut into squares of `square_bytes` (1 GB = 10^9 bytes
when the user wrote GB, 1 GiB = 2^30 otherwise). Squares run up to the card's capacity, or further
when the footprint is larger: bytes beyond the capacity are *over*, drawn so that "does not fit"
shows at a glance.

Rules, so that the picture is honest:
- a square's `category` is the category with the most bytes in it (ties: the earlier category);
  its `parts` keep every category's bytes, so a drawing can split a shared square exactly;
- a square's `fill` is its used bytes over `square_bytes`: the last used square is drawn partial;
- summed over all squares, `parts` give back every category's bytes exactly.

The terminal drawing (`GridView`) splits each square, two characters wide, into four quarters and
colours each quarter by whatever fills most of it (a category, free card, or nothing), so shares are
drawn to a quarter of a square ("▌" holds two colours: foreground left, background right); bytes
beyond the capacity are drawn to half a square, the category's colour under a red band ("▄" on
red). The matplotlib chart (`chart.py`) draws `parts` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.segment import Segment
from rich.style import Style
from rich.table import Table
from rich.text import Text

from vramplan.footprint import Category
from vramplan.gpus import Gpu
from vramplan.units import GB, GIB, format_bytes, to_unit

FREE_COLOR = "#8a8a8a"      # the light-shade glyph of a free square, dim on any background
OVER_COLOR = "#e0201b"      # behind squares beyond the card's capacity

# One letter per category, for terminals without colour (and the legend's key there).
SYMBOLS = {
    Category.FROZEN_WEIGHTS: "W",
    Category.TRAINABLE_WEIGHTS: "T",
    Category.MASTER_WEIGHTS: "M",
    Category.BUFFERS: "B",
    Category.GRADIENTS: "G",
    Category.OPTIMIZER_STATES: "O",
    Category.EMA: "E",
    Category.AUTOCAST_CACHE: "C",
    Category.WORKSPACES: "w",
    Category.INPUTS: "I",
    Category.ACTIVATIONS: "A",
    Category.TEMPORARIES: "t",
    Category.BLOCK_SLACK: "s",
    Category.CUDA_CONTEXT: "X",
    Category.ALLOCATOR_RESERVE: "R",
}
FREE_SYMBOL, OVER_SYMBOL = ".", "!"


@dataclass(frozen=True)
class Cell:
    """One square of the grid: bytes `start` to `start + size`."""

    index: int
    start: int
    size: int                               # square_bytes
    parts: tuple[tuple[Category, int], ...]  # (category, bytes in this square), layout order
    card_bytes: int                         # bytes of this square inside the card's capacity

    @property
    def used_bytes(self) -> int:
        return sum(n for _, n in self.parts)

    @property
    def category(self) -> Category | None:
        """The category with the most bytes here (ties: the earlier one); None when unused."""
        best = None
        for category, nbytes in self.parts:
            if nbytes > 0 and (best is None or nbytes > best[1]):
                best = (category, nbytes)
        return None if best is None else best[0]

    @property
    def fill(self) -> float:
        return self.used_bytes / self.size

    @property
    def free_bytes(self) -> int:
        """Card bytes here that nothing uses."""
        return max(self.card_bytes - self.used_bytes, 0)

    @property
    def over_bytes(self) -> int:
        """Used bytes here that lie beyond the card's capacity."""
        return max(self.used_bytes - self.card_bytes, 0)

    @property
    def is_free(self) -> bool:
        return self.used_bytes == 0 and self.card_bytes > 0

    @property
    def is_over(self) -> bool:
        return self.over_bytes > 0


def square_bytes_for(gpu: Gpu | None) -> int:
    """1 GB squares when the user wrote the card's size in GB, else 1 GiB squares."""
    return GB if display_unit(gpu) == "GB" else GIB


def display_unit(gpu: Gpu | None) -> str:
    return gpu.unit if gpu is not None and gpu.unit in ("GB", "GiB") else "GiB"


def ordered_categories(categories: dict) -> list[tuple[Category, int]]:
    """(category, bytes) in the fixed layout order, zero entries left out."""
    by_category = {Category(k): int(v) for k, v in categories.items()}
    for category, nbytes in by_category.items():
        if nbytes < 0:
            raise ValueError(f"{category.value}: negative size {nbytes}")
    return [(c, by_category[c]) for c in Category if by_category.get(c, 0) > 0]


def grid_cells(categories: dict, capacity_bytes: int | None, square_bytes: int) -> list[Cell]:
    """Lay `categories` (Category -> bytes) into squares of `square_bytes`; see the module rules.

    There are enough squares for the larger of the capacity and the bytes used; with no capacity
    (no GPU given) every byte is inside the card and no square is free or over.
    """
    if square_bytes <= 0:
        raise ValueError("square_bytes must be positive")
    layout = ordered_categories(categories)
    used = sum(n for _, n in layout)
    span = used if capacity_bytes is None else max(used, capacity_bytes)
    count = -(-span // square_bytes)
    card_end = used if capacity_bytes is None else capacity_bytes

    cells = []
    boundaries = []   # (category, first byte, end byte) of each category's run
    offset = 0
    for category, nbytes in layout:
        boundaries.append((category, offset, offset + nbytes))
        offset += nbytes
    run = 0
    for index in range(count):
        start, end = index * square_bytes, (index + 1) * square_bytes
        parts = []
        while run < len(boundaries) and boundaries[run][2] <= start:
            run += 1
        k = run
        while k < len(boundaries) and boundaries[k][1] < end:
            category, lo, hi = boundaries[k]
            parts.append((category, min(hi, end) - max(lo, start)))
            k += 1
        card = min(max(card_end - start, 0), square_bytes)
        cells.append(Cell(index=index, start=start, size=square_bytes, parts=tuple(parts),
                          card_bytes=card))
    return cells


@dataclass(frozen=True)
class Slice:
    """What fills most of one n-th of a square: a category (maybe over the capacity), free card,
    or nothing (past both the card and the bytes used)."""

    category: Category | None
    over: bool = False
    free: bool = False


def slices(cell: Cell, n: int) -> list[Slice]:
    """Cut `cell` into `n` equal slices and say what fills most of each (ties: categories first)."""
    out = []
    used, card = cell.used_bytes, cell.card_bytes
    for i in range(n):
        lo, hi = cell.size * i / n, cell.size * (i + 1) / n
        best: tuple[float, Category | None, float] = (0.0, None, 0.0)  # bytes, category, over
        offset = 0
        for category, nbytes in cell.parts:
            inside = _overlap(lo, hi, offset, offset + nbytes)
            if inside > best[0]:
                best = (inside, category, _overlap(lo, hi, max(offset, card), offset + nbytes))
            offset += nbytes
        free = _overlap(lo, hi, used, card)
        nothing = _overlap(lo, hi, max(used, card), cell.size)
        if best[1] is not None and best[0] >= max(free, nothing):
            out.append(Slice(best[1], over=best[2] * 2 > best[0]))
        elif free >= nothing and free > 0:
            out.append(Slice(None, free=True))
        else:
            out.append(Slice(None))
    return out


def _overlap(lo: float, hi: float, a: float, b: float) -> float:
    return max(0.0, min(hi, b) - max(lo, a))


def auto_per_row(count: int) -> int:
    """8 squares a row for cards up to 64 GB (16 GB = two rows), 16 for the big ones."""
    return 8 if count <= 64 else 16


class GridView:
    """A rich renderable: the squares, N per row, and (optionally) a legend beside or under them.

    Each square is two characters wide ("██"), so it looks square in a terminal; rows of squares
    are labelled with the size they start at. Free squares are "░░"; squares beyond the capacity
    carry a red band on top ("▄▄" on red). Without colour, squares show the category letters of
    the legend.
    """

    def __init__(self, categories: dict, capacity_bytes: int | None, unit: str = "GiB", *,
                 per_row: int | None = None, title: str | None = None, legend: bool = True,
                 caption: bool = True, square_bytes: int | None = None):
        self.unit = unit
        self.square_bytes = square_bytes or (GB if unit == "GB" else GIB)
        self.categories = ordered_categories(categories)
        self.capacity_bytes = capacity_bytes
        self.cells = grid_cells(dict(self.categories), capacity_bytes, self.square_bytes)
        self.per_row = per_row or auto_per_row(len(self.cells))
        self.title = title
        self.legend = legend
        self.show_caption = caption

    @classmethod
    def from_estimate(cls, estimate, **options) -> "GridView":
        gpu = estimate.gpu
        options.setdefault("unit", display_unit(gpu))
        return cls(estimate.footprint.categories, None if gpu is None else gpu.memory_bytes,
                   **options)

    @property
    def used_bytes(self) -> int:
        return sum(n for _, n in self.categories)

    @property
    def over_bytes(self) -> int:
        return 0 if self.capacity_bytes is None else max(self.used_bytes - self.capacity_bytes, 0)

    def caption(self) -> str:
        square = "1 GB" if self.square_bytes == GB else (
            "1 GiB" if self.square_bytes == GIB else format_bytes(self.square_bytes, self.unit))
        return f"1 square = {square}"

    # -- drawing ---------------------------------------------------------------------------

    def grid_lines(self, colour: bool = True) -> list[Text]:
        width = len(f"{to_unit(len(self.cells) * self.square_bytes, self.unit):.0f}")
        lines = []
        for row_start in range(0, len(self.cells), self.per_row):
            row = self.cells[row_start:row_start + self.per_row]
            beyond = row[0].card_bytes == 0 and self.capacity_bytes is not None
            label = f"{to_unit(row[0].start, self.unit):>{width}.0f} "
            line = Text()
            line.append(label, Style(color=OVER_COLOR, bold=True) if beyond else "dim")
            for position, cell in enumerate(row):
                if position:
                    line.append(" ")
                quarters = slices(cell, 4)
                for half in (quarters[:2], quarters[2:]):
                    glyph, style = _half_glyph(*half) if colour else _half_symbol(*half)
                    line.append(glyph, style)
            lines.append(line)
        return lines

    def legend_table(self, colour: bool = True) -> Table:
        return legend_table(dict(self.categories), self.capacity_bytes, self.unit, colour=colour)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        colour = console.color_system is not None and not console.no_color
        grid = Text("\n").join(self.grid_lines(colour))
        heading = Text(no_wrap=True, overflow="ellipsis")
        if self.title:
            heading.append(self.title, "bold")
        if self.show_caption:
            heading.append("  " if self.title else "")
            heading.append(self.caption(), "dim")
        picture = Table.grid()
        if heading:
            picture.add_row(heading)
        picture.add_row(grid)
        if not self.legend:
            yield picture
            return
        legend = self.legend_table(colour)
        picture_width = max([heading.cell_len] + [line.cell_len for line in grid.split("\n")])
        legend_width = Measurement.get(console, options, legend).maximum
        if picture_width + 4 + legend_width <= options.max_width:
            both = Table.grid(padding=(0, 4))
            both.add_row(picture, legend)
            yield both
        else:
            yield picture
            yield legend

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        # Measure what __rich_console__ draws, legend included when it goes beside the grid.
        lines = console.render_lines(self, options.update(height=None), pad=False)
        width = max((Segment.get_line_length(line) for line in lines), default=0)
        return Measurement(min(width, options.max_width), min(width, options.max_width))


def _style(category: Category | None, over: bool = False, background: str | None = None) -> Style:
    color = FREE_COLOR if category is None else category.color
    return Style(color=color, bgcolor=OVER_COLOR if over else background)


def _half_glyph(left: Slice, right: Slice) -> tuple[str, Style]:
    """One character showing two quarters: "▌" draws the left in the foreground colour and the
    right in the background colour, so one character can hold two categories."""
    if left.category is None and right.category is None:
        if left.free or right.free:
            return "░", Style(color=FREE_COLOR)
        return " ", Style()
    if left.over or (left.category is None and right.over):
        # Beyond the card: the category's colour under a red band (to half a square).
        category = left.category if left.category is not None else right.category
        return "▄", _style(category, over=True)
    if right.category is None:
        return "▌", _style(left.category)   # partial square: the rest stays empty
    if right.over:
        return "▌", _style(left.category, over=True)
    if right.category is left.category:
        return "█", _style(left.category)
    return "▌", _style(left.category, background=right.category.color)


def _half_symbol(left: Slice, right: Slice) -> tuple[str, str]:
    for part in (left, right):
        if part.over:
            return OVER_SYMBOL, "bold"
    for part in (left, right):
        if part.category is not None:
            return SYMBOLS[part.category], ""
    return (FREE_SYMBOL, "dim") if left.free or right.free else (" ", "")


def swatch(category: Category | None, colour: bool = True, over: bool = False) -> Text:
    if not colour:
        if over:
            return Text(OVER_SYMBOL * 2)
        return Text((FREE_SYMBOL if category is None else SYMBOLS[category]) * 2)
    if over:
        return Text("▄▄", _style(None, over=True))
    if category is None:
        return Text("░░", Style(color=FREE_COLOR))
    return Text("██", _style(category))


def legend_table(categories: dict, capacity_bytes: int | None, unit: str, *,
                 colour: bool = True, total_row: bool = False) -> Table:
    """Swatch, label, size and share of what the device uses; then free card or the overflow.

    Shares are of the device used; the card's share shows in the verdict."""
    layout = ordered_categories(categories)
    used = sum(n for _, n in layout)
    table = Table(box=None, show_header=total_row, padding=(0, 1), pad_edge=False)
    table.add_column("", no_wrap=True)
    table.add_column("category" if total_row else "")
    table.add_column(unit, justify="right", no_wrap=True)
    table.add_column("share", justify="right", no_wrap=True)
    for category, nbytes in layout:
        table.add_row(swatch(category, colour), category.label, f"{to_unit(nbytes, unit):.2f}",
                      f"{100 * nbytes / used:.1f}%" if used else "")
    if total_row:
        table.add_row("", Text("device used", "bold"), Text(f"{to_unit(used, unit):.2f}", "bold"),
                      "100.0%" if used else "", end_section=True)
    if capacity_bytes is not None:
        free = capacity_bytes - used
        if free >= 0:
            table.add_row(swatch(None, colour), Text("free", "dim"),
                          Text(f"{to_unit(free, unit):.2f}", "dim"), "")
        else:
            over_style = Style(color=OVER_COLOR, bold=True)
            table.add_row(swatch(None, colour, over=True), Text("over capacity", over_style),
                          Text(f"{to_unit(-free, unit):.2f}", over_style), "")
    return table

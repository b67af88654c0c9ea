"""The grid as a picture (PNG or SVG) for a README or a blog post, with matplotlib.

Each square is drawn exactly: a square shared by several categories is split into vertical
stripes in proportion to their bytes, the last used square is filled only as far as its bytes
go, free card is white, and bytes beyond the card's capacity are hatched red behind a red line
where the card ends. Several estimates are drawn side by side with one legend, for compare.

matplotlib is imported inside the function (the CLI's estimate path must start fast) and only
its Agg canvas is used, never pyplot, so no GUI backend or global figure state is touched.
"""

from __future__ import annotations

from pathlib import Path

from vramplan.errors import UsageError
from vramplan.estimate.result import Estimate
from vramplan.footprint import Category
from vramplan.render.frames import atomic_output
from vramplan.render.grid import (
    OVER_COLOR, auto_per_row, display_unit, grid_cells, ordered_categories,
)
from vramplan.render.tables import FITS_COLOR, estimate_title
from vramplan.units import GB, GIB, format_bytes, to_unit

FORMATS = {".png": "png", ".svg": "svg"}
SQUARE_IN = 0.36          # inches per square, gap included
LABEL_SQUARES = 0.9       # room left of the grid for the row labels, in squares
PANEL_GAP_IN = 0.6
GAP = 0.12                # share of a square left blank between squares
FREE_FACE, FREE_EDGE = "#ffffff", "#c9c9c9"
TEXT, MUTED = "#222222", "#6b6b6b"


def write_grid_chart(estimates, path, *, per_row: int | None = None, dpi: int = 160) -> Path:
    """Draw one estimate, or several `(title, estimate)` side by side, to `path` (.png or .svg).

    `estimates` is an `Estimate`, or a list of estimates or of `(title, Estimate)` pairs. The file
    is written to a temporary file in the same folder and moved into place, so a reader never
    sees half a picture. Returns the path written.
    """
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(f"cannot write a chart to {str(path)!r}: the file must end in "
                         f".png or .svg")
    panels = _panels(estimates)
    if not panels:
        raise UsageError("nothing to draw: no estimates given")

    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Every panel uses the first estimate's unit, so squares compare one to one.
    unit = display_unit(panels[0][1].gpu)
    square_bytes = GB if unit == "GB" else GIB
    grids = []
    for title, estimate in panels:
        gpu = estimate.gpu
        cells = grid_cells(estimate.footprint.categories,
                           None if gpu is None else gpu.memory_bytes, square_bytes)
        grids.append(cells)
    per_row = per_row or auto_per_row(max(len(c) for c in grids))
    rows = max(1, max(-(-len(c) // per_row) for c in grids))

    axes_w, grid_h = (per_row + LABEL_SQUARES) * SQUARE_IN, rows * SQUARE_IN
    style = {"font.family": "DejaVu Sans", "svg.hashsalt": "vramplan", "hatch.linewidth": 1.2,
             "hatch.color": OVER_COLOR}
    with matplotlib.rc_context(style):
        fig = Figure(figsize=(axes_w * len(panels), grid_h + 1.5), facecolor="white")
        canvas = FigureCanvasAgg(fig)
        axes = []
        for (title, estimate), cells in zip(panels, grids):
            ax = fig.add_axes((0, 0, 1, 1))
            _draw_panel(ax, estimate, cells, title, per_row, rows, unit, square_bytes)
            axes.append(ax)
        # Titles and verdicts are often wider than the grid: measure them, then lay the panels
        # out side by side, each as wide as the widest of its grid and its texts.
        renderer = canvas.get_renderer()
        widths = [max([axes_w] + [t.get_window_extent(renderer).width / fig.dpi for t in ax.texts
                                  if t.get_ha() == "left"]) for ax in axes]
        fig_w = sum(widths) + PANEL_GAP_IN * (len(panels) - 1)
        fig_h = grid_h + 1.5
        fig.set_size_inches(fig_w, fig_h)
        left = 0.0
        for ax, width in zip(axes, widths):
            ax.set_position((left / fig_w, 0.6 / fig_h, axes_w / fig_w, grid_h / fig_h))
            left += width + PANEL_GAP_IN
        _legend(fig, panels, unit, square_bytes, anchor_x=(widths[0] + 0.35) / fig_w)

        metadata = {"Date": None} if fmt == "svg" else {"Software": None}
        with atomic_output(path) as temp:
            fig.savefig(temp, format=fmt, dpi=dpi, bbox_inches="tight", pad_inches=0.25,
                        metadata=metadata)
    return path


def _panels(estimates) -> list[tuple[str | None, Estimate]]:
    if isinstance(estimates, Estimate):
        return [(None, estimates)]
    panels = []
    for item in estimates:
        if isinstance(item, Estimate):
            panels.append((None, item))
        else:
            title, estimate = item
            panels.append((title, estimate))
    return panels


def _draw_panel(ax, estimate, cells, title, per_row, rows, unit, square_bytes):
    from matplotlib.patches import Rectangle

    ax.set_xlim(-LABEL_SQUARES, per_row)
    ax.set_ylim(rows, 0)
    ax.set_aspect("equal")
    ax.axis("off")
    side = 1 - GAP
    capacity = None if estimate.gpu is None else estimate.gpu.memory_bytes

    for cell in cells:
        row, col = divmod(cell.index, per_row)
        x, y = col, row
        card = cell.card_bytes / cell.size
        used = cell.used_bytes / cell.size
        if card > 0:
            ax.add_patch(Rectangle((x, y), side * card, side, facecolor=FREE_FACE,
                                   edgecolor="none"))
        offset = 0.0
        for category, nbytes in cell.parts:
            width = side * nbytes / cell.size
            ax.add_patch(Rectangle((x + offset, y), width, side, facecolor=category.color,
                                   edgecolor="none"))
            offset += width
        if cell.is_over:
            start = side * card
            ax.add_patch(Rectangle((x + start, y), side * (used - card), side, fill=False,
                                   hatch="////", edgecolor=OVER_COLOR, linewidth=0))
        if capacity is None and used < 1:
            # No card to fill: outline the whole last square so its part reads as a part.
            ax.add_patch(Rectangle((x, y), side, side, fill=False, edgecolor=FREE_EDGE,
                                   linewidth=0.8, linestyle=(0, (2, 2))))
        elif card >= used:
            ax.add_patch(Rectangle((x, y), side * card, side, fill=False, edgecolor=FREE_EDGE,
                                   linewidth=0.8))
        else:
            ax.add_patch(Rectangle((x, y), side * used, side, fill=False, edgecolor=OVER_COLOR,
                                   linewidth=1.4))
        if cell.is_over and cell.start <= capacity < cell.start + cell.size:
            # Where the card ends: one heavy red bar, inside the square the capacity falls in.
            ax.plot([x + side * card] * 2, [y - 0.08, y + side + 0.08], color=OVER_COLOR,
                    linewidth=2.6, solid_capstyle="butt")

    for row in range(-(-len(cells) // per_row)):
        start = row * per_row * square_bytes
        beyond = capacity is not None and start >= capacity
        ax.text(-0.25, row + side / 2, f"{to_unit(start, unit):.0f}", ha="right", va="center",
                fontsize=7.5, color=OVER_COLOR if beyond else MUTED)

    spec = estimate.spec
    heading = estimate_title(estimate)          # model · method · precision · gpu
    model_method, gpu_name = heading.rsplit(" · ", 1)
    detail = f"{gpu_name}  ·  {spec.resolution[0]}×{spec.resolution[1]}, batch {spec.batch_size}"
    if title:
        heading, detail = title, f"{model_method}  ·  {detail}"
    else:
        heading = model_method
    ax.text(-LABEL_SQUARES, -0.95, heading, ha="left", va="bottom", fontsize=11,
            fontweight="bold", color=TEXT)
    ax.text(-LABEL_SQUARES, -0.45, detail, ha="left", va="bottom", fontsize=8, color=MUTED)
    verdict, colour = _verdict(estimate, unit)
    ax.text(-LABEL_SQUARES, rows + 0.3, verdict, ha="left", va="top", fontsize=9.5,
            fontweight="bold", color=colour)


def _verdict(estimate: Estimate, unit: str) -> tuple[str, str]:
    used = estimate.footprint.device_used_bytes
    gpu = estimate.gpu
    if gpu is None:
        return f"needs {format_bytes(used, unit)} on the device (no GPU given)", TEXT
    of = f"{format_bytes(used, unit)} of {format_bytes(gpu.memory_bytes, unit)}"
    if estimate.fits:
        return f"✓ fits: {of}, {format_bytes(estimate.headroom_bytes, unit)} headroom", FITS_COLOR
    short = format_bytes(-estimate.headroom_bytes, unit)
    return f"✗ does NOT fit: {of}, {short} short", OVER_COLOR


def _legend(fig, panels, unit, square_bytes, anchor_x: float) -> None:
    from matplotlib.patches import Patch

    single = len(panels) == 1
    title = f"1 square = {'1 GB' if square_bytes == GB else '1 GiB'}"
    handles = []
    if single:
        estimate = panels[0][1]
        layout = ordered_categories(estimate.footprint.categories)
        total = sum(n for _, n in layout)
        for category, nbytes in layout:
            share = 100 * nbytes / total if total else 0.0
            handles.append(Patch(facecolor=category.color, edgecolor="none",
                                 label=f"{category.label}   {to_unit(nbytes, unit):.2f} {unit} "
                                       f"({share:.1f}%)"))
    else:
        present = set()
        for _, estimate in panels:
            present |= {c for c, _ in ordered_categories(estimate.footprint.categories)}
        handles = [Patch(facecolor=c.color, edgecolor="none", label=c.label)
                   for c in Category if c in present]
    if any(e.gpu is not None and (e.headroom_bytes or 0) > 0 for _, e in panels):
        free = " ".join(f"{to_unit(e.headroom_bytes, unit):.2f} {unit}" for _, e in panels
                        if e.gpu is not None and e.headroom_bytes > 0) if single else ""
        handles.append(Patch(facecolor=FREE_FACE, edgecolor=FREE_EDGE,
                             label=f"free   {free}".rstrip()))
    if any(e.fits is False for _, e in panels):
        short = " ".join(f"{to_unit(-e.headroom_bytes, unit):.2f} {unit}" for _, e in panels
                         if e.fits is False) if single else ""
        handles.append(Patch(facecolor="white", edgecolor=OVER_COLOR, hatch="////",
                             label=f"over capacity   {short}".rstrip()))
    if single:
        legend = fig.legend(handles=handles, loc="center left", bbox_to_anchor=(anchor_x, 0.5),
                            frameon=False, fontsize=8.5, handlelength=1.4, handleheight=1.4,
                            labelcolor=TEXT, title=title, title_fontsize=8.5, alignment="left")
    else:
        legend = fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                            frameon=False, fontsize=8.5, ncol=min(len(handles), 4),
                            handlelength=1.4, handleheight=1.4, labelcolor=TEXT, title=title,
                            title_fontsize=8.5)
    legend.get_title().set_color(MUTED)

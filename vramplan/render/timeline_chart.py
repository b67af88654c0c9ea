"""Live bytes over the simulated step, stacked by category: the picture `simulate --timeline` draws.

In the spirit of PyTorch's memory_viz "active memory timeline": x is the order of events (every
allocation and every free is one), y the bytes live after each, stacked by category in the
footprint's layout order and colours (weights at the bottom, temporaries on top), the phases of
the step shaded in turn and named above the plot, the two steps bracketed, the peak marked, and
the card's capacity drawn as a line when a GPU is given.

The live bytes per category come from one sweep over the records (`live_by_category`: a
histogram of allocations minus frees per event, then a running sum, in numpy), fast for the
tens of thousands of records an SDXL step makes. A step has more events than a chart has pixels,
so each bucket of events keeps its lowest and its highest point (`envelope_indices`): spikes and
the peak survive downsampling. matplotlib is imported inside the functions and only its Agg
canvas is used, never pyplot.
"""

from __future__ import annotations

from pathlib import Path

from vramplan.errors import UsageError
from vramplan.footprint import Category
from vramplan.render.frames import atomic_output
from vramplan.render.grid import OVER_COLOR, display_unit
from vramplan.render.simulation import as_estimate, human_bytes
from vramplan.render.tables import FITS_COLOR, estimate_title
from vramplan.units import format_bytes, to_unit

FORMATS = {".png": "png", ".svg": "svg"}
MAX_POINTS = 2400                 # points per series after downsampling (two per bucket):
                                  # a bucket per pixel of the plot at 160 dpi
Y_STEPS = 2000                    # edges are drawn to 1/2000 of a panel's height
SHADE = "#eef0f3"                 # every other phase
STEP_LINE = "#9aa0a6"
TEXT, MUTED = "#222222", "#6b6b6b"
FIGSIZE = (11.5, 5.6)             # inches
STYLE = {"font.family": "DejaVu Sans", "svg.hashsalt": "vramplan", "axes.edgecolor": MUTED,
         "axes.labelcolor": TEXT, "xtick.color": MUTED, "ytick.color": MUTED}


def live_by_category(records):
    """(categories, live): `live[i, e]` is the bytes of `categories[i]` live after event `e`.

    An allocation at event a and a free at event f count at events a .. f-1, as
    `timeline.composition_at` counts them; a record never freed counts to the end.
    """
    import numpy as np

    if not records:
        return [], np.zeros((0, 1), dtype=np.int64)
    last = max(max(r.alloc_at, r.free_at or 0) for r in records)
    n = last + 1
    by_category: dict[Category, list] = {}
    for r in records:
        by_category.setdefault(r.category or Category.TEMPORARIES, []).append(r)
    categories = [c for c in Category if c in by_category]
    live = np.zeros((len(categories), n), dtype=np.int64)
    for i, category in enumerate(categories):
        rows = by_category[category]
        nbytes = np.fromiter((r.nbytes for r in rows), dtype=np.int64, count=len(rows))
        alloc = np.fromiter((r.alloc_at for r in rows), dtype=np.int64, count=len(rows))
        free = np.fromiter((-1 if r.free_at is None else r.free_at for r in rows),
                           dtype=np.int64, count=len(rows))
        delta = np.zeros(n + 1, dtype=np.int64)
        np.add.at(delta, alloc, nbytes)
        freed = free >= 0
        np.add.at(delta, free[freed], -nbytes[freed])
        live[i] = np.cumsum(delta[:n])
    return categories, live


def envelope_indices(total, max_points: int = MAX_POINTS):
    """Indices into `total` to draw: every one when few, else the lowest and the highest of each
    of `max_points / 2` buckets (and the first and last), in order, so no spike is lost."""
    import numpy as np

    n = len(total)
    if n <= max_points:
        return np.arange(n)
    buckets = max(max_points // 2, 1)
    size = -(-n // buckets)
    # The last bucket is padded with the last value: it adds no new high or low.
    padded = np.full(buckets * size, total[-1], dtype=total.dtype)
    padded[:n] = total
    grid = padded.reshape(buckets, size)
    starts = np.arange(buckets) * size
    highs = starts + grid.argmax(axis=1)
    lows = starts + grid.argmin(axis=1)
    picked = np.concatenate([[0, n - 1], highs, lows])
    return np.unique(picked[picked < n])


def phase_spans(phases, end: int) -> list[tuple[str, int, int]]:
    """(name, first event, end event) per phase, a phase entered twice in a row merged."""
    spans: list[list] = []
    for name, start in sorted(phases, key=lambda p: p[1]):
        if spans and spans[-1][0] == name:
            continue
        if spans:
            spans[-1][2] = start
        spans.append([name, start, end])
    return [(name, start, stop) for name, start, stop in spans if stop > start]


def _step_group(phase: str) -> str:
    """"step 2 forward" -> "step 2"; the first step's phases -> "step 1"; load stands alone."""
    words = phase.split()
    if len(words) > 2 and words[0] == "step":
        return " ".join(words[:2])
    return "" if phase == "load" else "step 1"


def _phase_label(phase: str) -> str:
    words = phase.split()
    if len(words) > 2 and words[0] == "step":
        return " ".join(words[2:])
    return {"load": "model load"}.get(phase, phase)


def _nice_floor(value: float, span: float) -> float:
    """`value` rounded down to a round step for an axis `span` long (0.3 -> steps of 0.05)."""
    import math

    if value <= 0 or span <= 0:
        return 0.0
    step = 10 ** math.floor(math.log10(span)) / 2
    return math.floor(value / step + 1e-9) * step


def write_timeline_chart(simulation, path, *, dpi: int = 160) -> Path:
    """Draw `simulation`'s live bytes over the step to `path` (.png or .svg), atomically: a
    temporary file beside it is moved into place. Returns the path written."""
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(f"cannot write a timeline to {str(path)!r}: the file must end in "
                         f".png or .svg")

    import matplotlib

    with matplotlib.rc_context(STYLE):
        fig = timeline_figure(simulation)
        metadata = {"Date": None} if fmt == "svg" else {"Software": None}
        with atomic_output(path) as temp:
            fig.savefig(temp, format=fmt, dpi=dpi, facecolor="white", metadata=metadata)
    return path


def timeline_figure(simulation):
    """The chart as a matplotlib `Figure` on an Agg canvas (nothing global touched).

    When memory that stays (the weights, mostly) fills most of the peak, the y axis is broken:
    a short lower panel shows it from zero, the main panel what rises and falls above it.
    """
    import matplotlib
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    spec = simulation.spec
    unit = display_unit(spec.gpu)
    scale = to_unit(1, unit)
    categories, live = live_by_category(simulation.records)
    total = live.sum(axis=0) if len(categories) else np.zeros(1, dtype=np.int64)
    n_events = len(total)
    picked = envelope_indices(total)
    peak_event = int(total.argmax())
    peak_bytes = int(total[peak_event])
    capacity = None if spec.gpu is None else spec.gpu.memory_bytes
    spans = phase_spans(simulation.phases, n_events - 1)

    # What the y axis must show: the peak, and the card when it is not far above.
    capacity_in_view = capacity is not None and capacity <= max(peak_bytes, 1) * 2.5
    upper = max(peak_bytes, capacity if capacity_in_view else 0, 1)
    # The break: below the lowest point after the model is loaded, when what stays there fills
    # most of the peak (a tall slab of weights would squash what rises and falls above it).
    after_load = next((start for name, start, _ in spans if name != "load"), 0)
    floor = int(total[after_load:].min()) if after_load < n_events else 0
    if capacity_in_view:
        floor = min(floor, capacity)
    swing = upper - floor
    cut = _nice_floor((floor - 0.25 * swing) * scale, swing * scale) / scale \
        if floor > 0.5 * upper else 0.0
    top_bytes = upper + 0.2 * swing if cut else upper * 1.15

    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=FIGSIZE, facecolor="white")
        FigureCanvasAgg(fig)
        left, width, bottom, height = 0.07, 0.69, 0.12, 0.64
        if cut:
            low_h, gap = 0.1, 0.025
            ax = fig.add_axes((left, bottom + low_h + gap, width, height - low_h - gap))
            low = fig.add_axes((left, bottom, width, low_h), sharex=ax)
            panels = [ax, low]
        else:
            ax = low = fig.add_axes((left, bottom, width, height))
            panels = [ax]

        views = [(cut, top_bytes), (0, cut)] if cut else [(0, top_bytes)]
        for panel, (lo, hi) in zip(panels, views):
            _draw_stack(panel, categories, live, picked, spans, scale, lo * scale, hi * scale)
            panel.set_xlim(0, max(n_events - 1, 1))
            panel.tick_params(labelsize=8, length=3)
            panel.grid(axis="y", color="#d9d9d9", linewidth=0.6)
            panel.set_axisbelow(True)
            for side in ("top", "right"):
                panel.spines[side].set_visible(False)
        ax.set_ylim(cut * scale, top_bytes * scale)
        if cut:
            low.set_ylim(0, cut * scale)
            low.set_yticks([0, cut * scale])
            ax.spines["bottom"].set_visible(False)
            ax.tick_params(axis="x", bottom=False, labelbottom=False)
            _break_marks(ax, low)

        # The peak, marked where it happens.
        peak_y = peak_bytes * scale
        ax.plot([peak_event], [peak_y], marker="o", markersize=4.5, color=TEXT, zorder=5)
        peak_phase = simulation.footprint.peak_phase or ""
        right = peak_event > 0.6 * n_events
        ax.annotate(f"peak {format_bytes(peak_bytes, unit)}"
                    + (f"  ·  {peak_phase}" if peak_phase else ""),
                    (peak_event, peak_y), xytext=(-8 if right else 8, 6),
                    textcoords="offset points", ha="right" if right else "left", va="bottom",
                    fontsize=8.5, fontweight="bold", color=TEXT, zorder=6,
                    bbox={"boxstyle": "round,pad=0.25", "facecolor": "white",
                          "edgecolor": "none", "alpha": 0.85})

        # The card, when one is given: a line if it is in view, else a note of how far above.
        if capacity is not None:
            name = f"{spec.gpu.name}: {format_bytes(capacity, unit)}"
            colour = OVER_COLOR if peak_bytes > capacity else FITS_COLOR
            if capacity_in_view:
                ax.axhline(capacity * scale, color=colour, linewidth=1.3, linestyle=(0, (5, 3)),
                           zorder=4)
                ax.text(0.01, capacity * scale, name, transform=ax.get_yaxis_transform(),
                        ha="left", va="bottom", fontsize=8, color=colour, zorder=6,
                        bbox={"boxstyle": "square,pad=0.15", "facecolor": "white",
                              "edgecolor": "none", "alpha": 0.85})
            else:
                fig.text(left, 0.895, f"{name}, far above the chart: the peak uses "
                                      f"{100 * peak_bytes / capacity:.0f}% of it",
                         ha="left", va="bottom", fontsize=8.5, color=colour)

        # Axes: y in the card's unit, x in events.
        ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        low.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        fig.text(0.025, bottom + height / 2, f"allocated ({unit})", rotation=90, ha="center",
                 va="center", fontsize=9, color=TEXT)
        low.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
        low.xaxis.set_major_formatter(FuncFormatter(
            lambda v, _: f"{v / 1000:g}k" if v >= 1000 else f"{v:g}"))
        low.set_xlabel(f"events in order: {len(simulation.records):,} allocations and their "
                       f"frees", fontsize=8.5, color=MUTED)

        _label_phases(fig, ax, spans)

        # Title, and what the picture is.
        heading = estimate_title(as_estimate(simulation)).rsplit(" · ", 1)[0]
        res_w, res_h = spec.resolution
        detail = (f"live tensor bytes (torch.cuda.memory_allocated) over two training steps "
                  f"traced on fake tensors  ·  {res_w}×{res_h}, batch {spec.batch_size}, "
                  f"{spec.attention.value} attention"
                  + (", gradient checkpointing" if spec.gradient_checkpointing else ""))
        fig.text(left, 0.955, heading, ha="left", va="bottom", fontsize=13, fontweight="bold",
                 color=TEXT)
        fig.text(left, 0.925, detail, ha="left", va="bottom", fontsize=8.5, color=MUTED)

        _legend(fig, categories, live, peak_event, unit, anchor=(left + width + 0.015,
                                                                 bottom + height))

    return fig


def _draw_stack(ax, categories, live, picked, spans, scale: float, lo: float, hi: float) -> None:
    """Every other phase shaded, then the stack between `lo` and `hi` (in the chart's unit).

    Each category is drawn as one area from `lo` up to its running total, highest first, so the
    next one down paints over all but its own band: a polygon has one moving edge, not two.
    Values outside the panel are clipped, edges rounded to 1/Y_STEPS of its height, and points
    where an edge holds still left out (steps hold their value), so an SVG stays small.
    """
    import numpy as np

    for index, (_, start, stop) in enumerate(spans):
        if index % 2:
            ax.axvspan(start, stop, facecolor=SHADE, edgecolor="none", zorder=0)
    x = picked.astype(float)
    tops = np.cumsum(live[:, picked], axis=0) * scale if len(categories) else np.zeros((0, 1))
    # Far under a pixel: rounding lets an edge that barely moves hold still, and drop points.
    quantum = (hi - lo) / Y_STEPS
    tops = np.round(tops / quantum) * quantum
    for index in reversed(range(len(categories))):
        top = np.clip(tops[index], lo, hi)
        below = np.clip(tops[index - 1], lo, hi) if index else np.full_like(top, lo)
        if not (top > below).any():
            continue                # no band of this category in this panel
        xs, ys = _step_outline(x, top, lo)
        ax.fill(xs, ys, facecolor=categories[index].color, edgecolor="none", linewidth=0,
                zorder=2)
    if len(categories):
        edge = np.clip(tops[-1], lo, hi)
        keep = _moves(edge)
        ax.plot(x[keep], edge[keep], drawstyle="steps-post", color=TEXT, linewidth=0.5,
                alpha=0.6, zorder=3)
    # Where each training step starts.
    for _, start in _step_starts(spans):
        ax.axvline(start, color=STEP_LINE, linewidth=0.9, linestyle=(0, (2, 2)), zorder=4)


def _step_outline(x, top, floor: float):
    """The outline of the area under `top` drawn as steps (each value held until the next x),
    down to `floor`: two corners per change, and none where the value holds still."""
    import numpy as np

    keep = _moves(top)
    x, top = x[keep], top[keep]
    xs = np.empty(2 * len(x) + 1)
    ys = np.empty(2 * len(x) + 1)
    xs[0:-1:2], ys[0:-1:2] = x, top                              # rise (or fall) at each x
    xs[1:-1:2], ys[1:-1:2] = np.append(x[1:], x[-1]), top       # hold until the next x
    xs[-1], ys[-1] = x[0], floor
    return np.append(xs[:-1], [x[-1], x[0]]), np.append(ys[:-1], [floor, floor])


def _moves(values):
    """Indices where `values` changes from the point before, plus the first and the last."""
    import numpy as np

    keep = np.zeros(len(values), dtype=bool)
    keep[0] = keep[-1] = True
    keep[1:] |= values[1:] != values[:-1]
    return np.flatnonzero(keep)


def _break_marks(ax, low) -> None:
    """The two short diagonals on the y axis that say part of it is left out."""
    size = 5
    marks = {"marker": [(-1, -0.5), (1, 0.5)], "markersize": size, "linestyle": "none",
             "color": MUTED, "mec": MUTED, "mew": 1, "clip_on": False}
    ax.plot([0], [0], transform=ax.transAxes, **marks)
    low.plot([0], [1], transform=low.transAxes, **marks)


def _legend(fig, categories, live, peak_event, unit, anchor) -> None:
    """Top of the stack first, each with its bytes at the peak ("-" for none then)."""
    from matplotlib.patches import Patch

    handles = []
    for category, series in reversed(list(zip(categories, live))):
        if not series.any():
            continue
        at_peak = int(series[peak_event])
        size = human_bytes(at_peak, unit) if at_peak else "–"
        handles.append(Patch(facecolor=category.color, edgecolor="none",
                             label=f"{category.label}  {size}"))
    legend = fig.legend(handles=handles, loc="upper left", bbox_to_anchor=anchor,
                        frameon=False, fontsize=8, handlelength=1.3, handleheight=1.3,
                        labelcolor=TEXT, title="at the peak", title_fontsize=8.5,
                        alignment="left")
    legend.get_title().set_color(MUTED)


def _step_starts(spans) -> list[tuple[str, int]]:
    seen, out = set(), []
    for name, start, _ in spans:
        group = _step_group(name)
        if group and group not in seen:
            seen.add(group)
            out.append((group, start))
    return out


def _label_phases(fig, ax, spans) -> None:
    """Phase names above the plot, centred on their spans (a second row when a name would run
    into its neighbour), and a bracket over each training step."""
    from matplotlib.transforms import blended_transform_factory

    above = blended_transform_factory(ax.transData, ax.transAxes)
    renderer = fig.canvas.get_renderer()
    rows_end = [float("-inf"), float("-inf")]   # right edge, in pixels, of each row's last label
    for name, start, stop in spans:
        centre = (start + stop) / 2
        text = ax.text(centre, 1.015, _phase_label(name), transform=above, ha="center",
                       va="bottom", fontsize=7.5, color=TEXT, clip_on=False)
        box = text.get_window_extent(renderer)
        row = 0 if box.x0 > rows_end[0] + 10 else 1
        if row == 1:
            text.set_y(1.055)
            text.set_color(MUTED)
            box = text.get_window_extent(renderer)
        rows_end[row] = box.x1

    # The steps: a thin bracket above the phase names, and a line where each step starts.
    groups: dict[str, list[int]] = {}
    for name, start, stop in spans:
        group = _step_group(name)
        if group:
            groups.setdefault(group, [start, stop])[1] = stop
    for group, (start, stop) in groups.items():
        ax.plot([start, start, stop, stop], [1.10, 1.115, 1.115, 1.10], transform=above,
                color=STEP_LINE, linewidth=0.9, clip_on=False)
        ax.text((start + stop) / 2, 1.125, group, transform=above, ha="center", va="bottom",
                fontsize=8.5, fontweight="bold", color=TEXT, clip_on=False)

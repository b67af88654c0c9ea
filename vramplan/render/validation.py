"""`vramplan validate` and `vramplan profile`, drawn: cases, accuracy summary, chart, exports.

Nothing here predicts or measures; a `Validation` (vramplan/profile/validate.py) is only read.
- `validation_view`: one row per stored profile -- measured, then each prediction with its
  relative error, for the three totals -- then the summary per device and tier
- `cases_frame` / `summary_frame` (pandas, imported when called), `write_validation_csv`,
  `write_validation_json`: sizes in bytes, errors as fractions
- `write_accuracy_chart`: predicted against measured, log-log, the y = x line and the +-5% band
- `profile_view`: one measured profile (totals, overheads, phases), as `vramplan profile` prints it
"""

from __future__ import annotations

import json
from pathlib import Path

from rich import box
from rich.console import Group, RenderableType
from rich.style import Style
from rich.table import Table
from rich.text import Text

from vramplan.errors import UsageError
from vramplan.render.frames import atomic_output, write_csv
from vramplan.render.grid import OVER_COLOR
from vramplan.render.simulation import human_bytes
from vramplan.render.tables import FITS_COLOR

WARN_COLOR = "#c98b00"
SOURCE_SHORT = {"estimate": "est", "simulate": "sim"}
CHART_FORMATS = {".png": "png", ".svg": "svg"}


def _metrics():
    from vramplan.profile.validate import METRICS, Metric

    return METRICS, Metric


# -- the terminal view ---------------------------------------------------------------------------

def error_text(error: float | None, colour: bool = True, signed: bool = True) -> Text:
    """"+1.23%": green within 2%, amber within 5%, red beyond (without colour: "!" beyond 5%)."""
    if error is None:
        return Text("")
    text = f"{100 * error:+.2f}%" if signed else f"{100 * error:.2f}%"
    size = abs(error)
    if not colour:
        return Text(text + (" !" if size > 0.05 else ""))
    color = FITS_COLOR if size <= 0.02 else WARN_COLOR if size <= 0.05 else OVER_COLOR
    return Text(text, Style(color=color))


def _value_cell(case, metric, source: str | None, colour: bool) -> Text:
    """The measured value (source None), or a tier's prediction and its error."""
    if source is None:
        measured = case.measured(metric)
        return Text(human_bytes(measured) if measured is not None else "-")
    predicted = case.predicted(source, metric)
    if predicted is None:
        return Text("-", "dim")
    cell = Text(human_bytes(predicted) + " ")
    cell.append_text(error_text(case.error(source, metric), colour))
    return cell


def _oom_cells(case, source: str | None, colour: bool) -> list:
    profile = case.profile
    if source is None:
        cell = Text("does not fit", Style(color=OVER_COLOR, bold=True) if colour else "bold")
        capacity = Text(f"{human_bytes(profile.capacity_bytes)} card" if profile.capacity_bytes else "",
                        "dim")
        return [cell, Text(f"OOM in {profile.oom_phase or '?'}", "dim"), capacity]
    prediction = case.predictions.get(source)
    if prediction is None or prediction.fits is None:
        return [Text("-", "dim"), Text(""), Text("")]
    agrees = prediction.fits == profile.fits
    verdict = Text("agrees" if agrees else "disagrees",
                   Style(color=FITS_COLOR if agrees else OVER_COLOR) if colour else "")
    used = prediction.values[_metrics()[1].DEVICE_USED]
    return [Text("fits" if prediction.fits else "does not fit"), Text(f"{human_bytes(used)} used"),
            verdict]


def case_title(case) -> Text:
    """"sd15-lora-r16-fp16-b1-512 · h100 · 0.41 s/step" (the median step after the first)."""
    from vramplan.profile.store import spec_slug

    profile = case.profile
    title = Text(spec_slug(profile.spec), "bold")
    title.append(" · " + (profile.gpu_key if profile.device == "cuda" else "cpu"), "dim")
    if profile.step_seconds:
        seconds = sorted(profile.step_seconds[1:] or profile.step_seconds)
        title.append(f" · {seconds[len(seconds) // 2]:.2f} s/step", "dim")
    if case.problem:
        title.append(" · " + ("no prediction" if not case.predictions else "partly predicted"), "red")
    return title


TIER_WIDTH, TOTAL_WIDTH = 9, 17


def case_table(case, sources, colour: bool = True, header: bool = True) -> Table:
    """One profile: the measured totals, then each tier's with its error, under the case's title.
    Fixed column widths, so that the tables of several cases line up."""
    _, Metric = _metrics()
    table = Table(title=case_title(case), title_justify="left", box=box.SIMPLE_HEAD,
                  show_header=header, show_edge=False, pad_edge=False, header_style="dim",
                  padding=(0, 0, 0, 1))
    table.add_column("", width=TIER_WIDTH, no_wrap=True)
    for label in ("peak allocated", "peak reserved", "device used"):
        table.add_column(label, justify="right", width=TOTAL_WIDTH, no_wrap=True)
    for source in [None] + [s for s in sources if s in case.predictions]:
        first = Text("measured" if source is None else source, "" if source is None else "dim")
        if not case.profile.fits:
            cells = _oom_cells(case, source, colour)
        elif case.device == "cuda":
            cells = [_value_cell(case, m, source, colour)
                     for m in (Metric.PEAK_ALLOCATED, Metric.PEAK_RESERVED, Metric.DEVICE_USED)]
        else:
            rss = _value_cell(case, Metric.RSS_GROWTH, source, colour)
            if source is None:
                rss = Text("RSS +", "dim") + rss
            cells = [_value_cell(case, Metric.PEAK_ALLOCATED, source, colour), Text("-", "dim"), rss]
        table.add_row(first, *cells)
    return table


CASES_CAPTION = ("error: (predicted - measured) / measured{bands}. cpu: peak allocated is the "
                 "tracker's tensor peak (no cuBLAS workspace), device used the RSS growth above the "
                 "built model (compared from 256 MiB up)")


def cases_view(validation, colour: bool = True) -> Group:
    sources = _sources(validation)
    parts: list = [Text("predicted vs measured", "bold")]
    for index, case in enumerate(validation.cases):
        parts.append(case_table(case, sources, colour, header=index == 0))
    bands = "; green within 2%, amber within 5%" if colour else "; ! beyond 5%"
    parts.append(Text(CASES_CAPTION.format(bands=bands), "dim"))
    return Group(*parts)


def summary_table(validation, colour: bool = True) -> Table:
    table = Table(title="accuracy", title_justify="left", title_style="bold", box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False, header_style="dim",
                  caption="|error| over the cases that ran, and the share within 2% and 5%; "
                          "cuda and cpu apart (a CPU run says nothing of the CUDA allocator or "
                          "context)",
                  caption_justify="left", caption_style="dim")
    for name, justify in (("device", "left"), ("tier", "left"), ("total", "left"),
                          ("cases", "right"), ("median", "right"), ("max", "right"),
                          ("≤2%", "right"), ("≤5%", "right")):
        table.add_column(name, justify=justify, no_wrap=True)
    previous = None
    for row in validation.summary:
        if previous is not None and (row.device, row.source) != previous:
            table.rows[-1].end_section = True
        previous = (row.device, row.source)
        table.add_row(row.device, row.source, row.metric.label, str(row.count),
                      error_text(row.median_abs_error, colour, signed=False),
                      error_text(row.max_abs_error, colour, signed=False),
                      f"{100 * row.within_2:.0f}%", f"{100 * row.within_5:.0f}%")
    return table


def validation_view(validation, colour: bool = True) -> RenderableType:
    parts: list = []
    if validation.cases:
        parts.append(cases_view(validation, colour))
    else:
        parts.append(Text("no profiles to validate: `vramplan profile` writes them", "bold"))
    if validation.summary:
        parts += [Text(""), summary_table(validation, colour)]
    for row in validation.verdicts:
        parts.append(Text(f"{row.device} {row.source}: the fit verdict agrees with the "
                          f"measurement in {row.agree} of {row.count} cases"))
    if validation.problems:
        parts.append(Text(""))
        parts.append(Text("skipped or incomplete", "bold"))
        for line in validation.problems:
            parts.append(Text(f"  {line}", Style(color=WARN_COLOR) if colour else ""))
    return Group(*parts)


def _sources(validation) -> list:
    found = []
    for case in validation.cases:
        for source in case.predictions:
            if source not in found:
                found.append(source)
    order = list(SOURCE_SHORT)
    return sorted(found, key=order.index)


# -- one profile, as `vramplan profile` prints it ------------------------------------------------

def profile_view(profile, path=None, colour: bool = True) -> RenderableType:
    """The measured totals, the overheads around the allocator, each phase's peaks, the time."""
    from vramplan.profile.store import spec_slug

    title = Text("measured ", "bold")
    title.append(spec_slug(profile.spec), "bold")
    where = Text(f"on {profile.gpu.name} ({human_bytes(profile.gpu.memory_bytes)}, compute "
                 f"capability {profile.gpu.compute_capability})" if profile.gpu is not None
                 else "on the CPU (real tensors, CUDA's autocast policy)", "dim")
    totals = Table(box=None, show_header=False, pad_edge=False, padding=(0, 2, 0, 0))
    totals.add_column(no_wrap=True)
    totals.add_column(justify="right", no_wrap=True)
    totals.add_column(style="dim")

    def add(label, value, how):
        if value is not None:
            totals.add_row(label, human_bytes(value), how)

    if profile.device == "cuda":
        add("peak allocated", profile.peak_allocated_bytes, "torch.cuda.max_memory_allocated()")
        add("peak reserved", profile.peak_reserved_bytes, "torch.cuda.max_memory_reserved()")
        add("device used", profile.device_used_bytes, "NVML used, highest sample (nvidia-smi)")
        add("CUDA context", profile.cuda_context_bytes, "NVML used after CUDA init, before the model")
        add("outside the allocator", profile.outside_allocator_bytes,
            "NVML used minus reserved after the steps: context and libraries")
        add("steady allocated", profile.steady_allocated_bytes, "memory_allocated() after the last step")
    else:
        add("peak allocated", profile.peak_allocated_bytes, "tracker: live tensor bytes, 512-byte blocks")
        add("after the build", profile.load_allocated_bytes, "the weights")
        add("RSS after the build", profile.rss_baseline_bytes, "VmRSS")
        add("RSS growth", profile.rss_growth_bytes, "VmHWM over the steps minus VmRSS after the build")
    parts: list = [title, where, Text("")]
    if not profile.fits:
        verdict = Text("does not fit", Style(color=OVER_COLOR, bold=True) if colour else "bold")
        card = f" on a {human_bytes(profile.capacity_bytes)} card" if profile.capacity_bytes else ""
        verdict.append(f": out of memory in {profile.oom_phase}{card}")
        parts += [verdict, Text(profile.oom_message or "", "dim"), Text("")]
    parts.append(totals)
    if profile.phases:
        phases = Table(title="phases", title_justify="left", title_style="bold", box=box.SIMPLE_HEAD,
                       show_edge=False, pad_edge=False, header_style="dim")
        phases.add_column("phase", no_wrap=True)
        phases.add_column("peak allocated", justify="right", no_wrap=True)
        cuda = profile.device == "cuda"
        if cuda:
            phases.add_column("peak reserved", justify="right", no_wrap=True)
            phases.add_column("device used", justify="right", no_wrap=True)
        for p in profile.phases:
            row = [p.phase, human_bytes(p.peak_allocated_bytes)]
            if cuda:
                row += [human_bytes(p.peak_reserved_bytes) if p.peak_reserved_bytes is not None else "-",
                        human_bytes(p.device_used_bytes) if p.device_used_bytes is not None else "-"]
            phases.add_row(*row)
        parts += [Text(""), phases]
    if profile.step_seconds:
        parts.append(Text("steps: " + ", ".join(f"{s:.2f} s" for s in profile.step_seconds), "dim"))
    for note in profile.notes:
        parts.append(Text(f"note: {note}", "dim"))
    if path is not None:
        parts.append(Text(f"profile written to {path}"))
    return Group(*parts)


# -- exports -------------------------------------------------------------------------------------

def case_rows(validation) -> list[dict]:
    """One dict per case: where and what, the verdicts, then per total measured / predicted /
    relative error for each tier. Sizes in bytes, errors as fractions (0.012 = 1.2%)."""
    from vramplan.profile.store import spec_slug

    _, Metric = _metrics()
    sources = _sources(validation)
    rows = []
    for case in validation.cases:
        profile = case.profile
        row = {"case": case.stored.key, "slug": spec_slug(profile.spec), "path": str(case.stored.path),
               "device": profile.device, "gpu": profile.gpu_key,
               "gpu_name": None if profile.gpu is None else profile.gpu.name,
               "fits_measured": profile.fits, "oom_phase": profile.oom_phase,
               "capacity_bytes": profile.capacity_bytes,
               "cuda_context_bytes": profile.cuda_context_bytes,
               "outside_allocator_bytes": profile.outside_allocator_bytes}
        for source in sources:
            prediction = case.predictions.get(source)
            row[f"fits_{source}"] = None if prediction is None else prediction.fits
        for metric in Metric:
            row[f"{metric.value}_measured_bytes"] = case.measured(metric)
            for source in sources:
                row[f"{metric.value}_{source}_bytes"] = case.predicted(source, metric)
                error = case.error(source, metric)
                row[f"{metric.value}_{source}_error"] = None if error is None else round(error, 6)
        row["problem"] = case.problem
        for key, value in profile.spec.items():
            row[f"spec_{key}"] = "x".join(map(str, value)) if isinstance(value, list) else value
        rows.append(row)
    return rows


def summary_rows(validation) -> list[dict]:
    return [{"device": r.device, "source": r.source, "metric": r.metric.value, "cases": r.count,
             "median_abs_error": round(r.median_abs_error, 6), "max_abs_error": round(r.max_abs_error, 6),
             "within_2pct": round(r.within_2, 6), "within_5pct": round(r.within_5, 6)}
            for r in validation.summary]


def cases_frame(validation):
    import pandas as pd

    return pd.DataFrame(case_rows(validation))


def summary_frame(validation):
    import pandas as pd

    return pd.DataFrame(summary_rows(validation))


def validation_json(validation) -> dict:
    """{"cases": [...], "summary": [...], "verdicts": [...], "problems": [...]}, through pandas so
    that the JSON and the CSV hold the same columns."""
    cases = cases_frame(validation)
    cases = json.loads(cases.to_json(orient="records")) if len(cases) else []
    summary = summary_frame(validation)
    summary = json.loads(summary.to_json(orient="records")) if len(summary) else []
    return {"cases": cases, "summary": summary,
            "verdicts": [{"device": v.device, "source": v.source, "agree": v.agree, "cases": v.count}
                         for v in validation.verdicts],
            "problems": list(validation.problems)}


def write_validation_csv(validation, path) -> Path:
    """One row per case (see `case_rows`), atomically."""
    return write_csv(cases_frame(validation), path)


def write_validation_json(validation, path) -> Path:
    path = Path(path)
    with atomic_output(path) as temp:
        temp.write_text(json.dumps(validation_json(validation), indent=2) + "\n")
    return path


# -- the chart -----------------------------------------------------------------------------------

METRIC_COLORS = {"peak_allocated": "#4c72b0", "peak_reserved": "#dd8452", "device_used": "#55a868",
                 "rss_growth": "#8172b3"}
SOURCE_MARKERS = {"estimate": "o", "simulate": "x"}


def write_accuracy_chart(validation, path, *, dpi: int = 160) -> Path:
    """Predicted against measured, one panel per device (cuda, cpu), log-log in GiB, every total
    of every case that ran; the y = x line and the +-5% band around it."""
    path = Path(path)
    fmt = CHART_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(f"--chart: {str(path)!r} must end in .png or .svg")
    _, Metric = _metrics()
    sources = _sources(validation)
    devices = [d for d in ("cuda", "cpu") if any(c.device == d for c in validation.cases)]
    if not devices:
        raise UsageError("--chart: no profile to draw (vramplan profile writes them)")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig = Figure(figsize=(max(5.2 * len(devices), 7.0), 5.6))
    FigureCanvasAgg(fig)
    gib = 2 ** 30
    for index, device in enumerate(devices, 1):
        ax = fig.add_subplot(1, len(devices), index)
        xs_all = []
        for case in validation.cases:
            if case.device != device:
                continue
            for metric in Metric:
                measured = case.measured(metric)
                if measured is None or measured <= 0:
                    continue
                for source in sources:
                    predicted = case.predicted(source, metric)
                    if predicted is None or predicted <= 0 or case.error(source, metric) is None:
                        continue   # e.g. an RSS growth too small to compare
                    xs_all += [measured / gib, predicted / gib]
                    ax.scatter([measured / gib], [predicted / gib], s=26,
                               marker=SOURCE_MARKERS[source], color=METRIC_COLORS[metric.value],
                               linewidths=1.2, alpha=0.85,
                               facecolors="none" if source == "estimate" else None, zorder=3)
        if xs_all:
            lo, hi = min(xs_all) / 1.5, max(xs_all) * 1.5
        else:
            lo, hi = 0.1, 100.0
        line = [lo, hi]
        ax.fill_between(line, [v * 0.95 for v in line], [v * 1.05 for v in line], color="#cccccc",
                        alpha=0.6, linewidth=0, label="±5%", zorder=1)
        ax.plot(line, line, color="#444444", linewidth=1, zorder=2, label="y = x")
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            # 1-2-5 steps labelled as plain numbers: a range inside one decade still gets labels
            axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            axis.set_minor_formatter(NullFormatter())
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.set_xlabel("measured (GiB)")
        ax.set_ylabel("predicted (GiB)")
        count = sum(c.device == device for c in validation.cases)
        ax.set_title(f"{device}: {count} profile{'s' if count != 1 else ''}", fontsize=11)
        ax.grid(True, which="both", color="#eeeeee", linewidth=0.6, zorder=0)
    handles = [Line2D([], [], linestyle="", marker="s", color=METRIC_COLORS[m.value], label=m.label)
               for m in Metric if any(c.error(s, m) is not None for c in validation.cases for s in sources)]
    handles += [Line2D([], [], linestyle="", marker=SOURCE_MARKERS[s], color="#444444",
                       markerfacecolor="none", label=s) for s in sources]
    handles += [Line2D([], [], color="#444444", label="y = x"),
                Line2D([], [], color="#cccccc", linewidth=6, label="±5%")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), frameon=False,
               fontsize=9)
    fig.suptitle("vramplan validate: predicted vs measured", fontsize=12)
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    with atomic_output(path) as temp:
        fig.savefig(temp, format=fmt, dpi=dpi)
    return path

"""What `vramplan fit` found: the top plans in a table, the winner's grid, or why nothing fits.

Only formats a `FitResult` (vramplan.fit.walk); nothing here searches or estimates. On several
GPUs the sizes are one GPU's, a column gives each plan's host RAM per node (what offloading keeps
on the CPU; red when over --host-ram), and the winner's panel shows how the GPUs share the work.
"""

from __future__ import annotations

from rich.console import Console, Group, RenderableType
from rich.style import Style
from rich.table import Table
from rich.text import Text

from vramplan.render.grid import OVER_COLOR, display_unit
from vramplan.render.tables import FITS_COLOR, grid_panel, method_summary, notes_view, spec_panel
from vramplan.units import format_bytes

HEADERS = {"resolution": "resolution", "precision": "precision", "quant": "base", "rank": "rank",
           "optimizer": "optimizer", "batch": "batch", "strategy": "strategy", "checkpointing": "GC",
           "cache-latents": "latents", "cache-text": "text emb.", "attention": "attention"}


def _title(result) -> Text:
    spec = result.request.spec
    gpu = spec.gpu
    unit = display_unit(gpu)
    card = f"{gpu.name} ({format_bytes(gpu.memory_bytes, unit)})"
    if spec.num_gpus > 1:
        card = f"{spec.num_gpus} × {gpu.name} ({format_bytes(gpu.memory_bytes, unit)} each)"
    return Text.assemble(("vramplan fit", "bold"), f"  {spec.model.name} · {method_summary(spec)} · ",
                         (card, "bold"))


def plans_table(result, plans=None, *, highlight_first: bool = True) -> Table:
    """One row per plan: the settings fit chose (varied axes only), device used, the margin's
    requirement and what is left."""
    plans = list(result.plans if plans is None else plans)
    unit = display_unit(result.request.gpu)
    varied = result.varied
    table = Table(header_style="bold", box=None, padding=(0, 1), pad_edge=False)
    table.add_column("#", justify="right", style="dim", no_wrap=True)
    for i in varied:
        table.add_column(HEADERS.get(result.axes[i].criterion.value, result.axes[i].criterion.value),
                         no_wrap=True)
    several = result.request.distributed
    table.add_column("used per GPU" if several else "device used", justify="right", no_wrap=True)
    table.add_column(f"+{100 * result.margin.fraction:g}% margin", justify="right", no_wrap=True)
    table.add_column("free", justify="right", no_wrap=True)
    limit = result.request.host_ram
    if several:
        table.add_column("host RAM/node" + (f" (≤ {format_bytes(limit, unit)})" if limit else ""),
                         justify="right", no_wrap=True)
    for n, plan in enumerate(plans, 1):
        free = plan.headroom_bytes
        free_text = Text(format_bytes(free, unit),
                         Style(color=FITS_COLOR) if free >= 0 else Style(color=OVER_COLOR, bold=True))
        used = format_bytes(plan.used_bytes, unit)
        if plan.accumulation_bytes:
            used += "*"
        row = [str(n)] + [plan.labels[i] for i in varied] + [used, format_bytes(plan.required_bytes, unit),
                                                              free_text]
        if several:
            host = plan.host_bytes or 0
            row.append(Text(format_bytes(host, unit) if host else "-",
                            Style(color=OVER_COLOR, bold=True) if not plan.host_fits else ""))
        table.add_row(*row, style="bold" if n == 1 and highlight_first else None)
    return table


def distributed_panel(estimate):
    """How the GPUs share the work, host RAM, what an offload saves: the panel `estimate` draws
    for a distributed plan, when the plan has the whole distributed estimate."""
    plan = getattr(estimate, "distributed", None)
    if plan is None or not hasattr(plan, "single_gpu_peak_allocated_bytes"):
        return None
    from vramplan.distributed.view import distributed_view

    return distributed_view(estimate, display_unit(estimate.gpu))


def _footer(result) -> list[RenderableType]:
    notes = list(result.notes)
    notes.append(f"safety margin {result.margin.describe()}")
    notes.append(f"objective: {', '.join(c.value for c in result.request.prefer)} "
                 f"(earlier matters more; --prefer changes it)")
    notes.append(f"searched in {result.seconds:.2f} s: {result.estimates} estimates, "
                 f"{result.decided_free} candidates decided without one")
    if any(p.accumulation_bytes for p in (result.plans or ())) or (
            result.closest is not None and result.closest.accumulation_bytes):
        notes.append("* includes the gradients kept between accumulation micro-steps")
    return [Text(""), notes_view(notes)]


def fit_view(result) -> Group:
    if not result.fits:
        return no_fit_view(result)
    best = result.best
    parts = [_title(result), Text(""),
             Text(f"{len(result.plans)} plan{'s' if len(result.plans) != 1 else ''} fit, best first "
                  f"(each better than the ones above it somewhere):", "dim"),
             plans_table(result), Text(""),
             spec_panel(best.spec, title="the winner"),
             grid_panel(best.estimate)]
    shared = distributed_panel(best.estimate)
    if shared is not None:
        parts.append(shared)
    unit = display_unit(result.request.gpu)
    per_gpu = " per GPU" if result.request.distributed else ""
    parts.append(Text.assemble(("✓ fits", Style(color=FITS_COLOR, bold=True)), " with the margin: needs ",
                               (format_bytes(best.required_bytes, unit), "bold"), per_gpu, ", ",
                               (format_bytes(best.headroom_bytes, unit), "bold"), " left"))
    if result.request.distributed:
        host = best.host_bytes or 0
        checked = (f" (--host-ram {format_bytes(result.request.host_ram, unit)})" if result.request.host_ram
                   else " (not checked: --host-ram SIZE)")
        parts.append(Text(f"host RAM per node for offloaded tensors: {format_bytes(host, unit)}"
                          + (checked if host else ""), "dim"))
    return Group(*parts, *_footer(result))


def blockers_table(result) -> Table:
    unit = display_unit(result.request.gpu)
    table = Table(header_style="bold", box=None, padding=(0, 1), pad_edge=False)
    table.add_column("your constraint")
    table.add_column("relaxed, the leanest plan")
    table.add_column("needs", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    for b in result.blockers:
        verdict = Text("fits", Style(color=FITS_COLOR, bold=True)) if b.fits else \
            Text(f"{format_bytes(b.required_bytes - result.request.gpu.memory_bytes, unit)} short",
                 Style(color=OVER_COLOR))
        table.add_row(b.constraint, b.relaxed, format_bytes(b.required_bytes, unit), verdict)
    return table


def no_fit_view(result) -> Group:
    unit = display_unit(result.request.gpu)
    parts = [_title(result), Text(""),
             Text.assemble(("✗ nothing fits", Style(color=OVER_COLOR, bold=True)),
                           " with the settings you fixed.")]
    closest = result.closest
    if closest is not None:
        parts += [Text.assemble("The closest plan needs ", (format_bytes(closest.required_bytes, unit), "bold"),
                                " with the margin: ",
                                (format_bytes(-closest.headroom_bytes, unit), Style(color=OVER_COLOR, bold=True)),
                                " short."),
                  plans_table(result, [closest], highlight_first=False)]
    if result.blockers:
        fixing = [b for b in result.blockers if b.fits]
        parts += [Text(""), Text("What makes it impossible:" if fixing else
                                 "Relaxing your constraints one at a time is not enough:", "bold"),
                  blockers_table(result)]
    elif closest is not None:
        parts += [Text(""), Text("You fixed nothing fit could relax: even the leanest settings do not fit.",
                                 "bold")]
    if result.smallest_card is not None:
        card = result.smallest_card
        parts.append(Text(f"The closest plan fits a {card.name} ({format_bytes(card.memory_bytes, unit)}) "
                          f"or larger."))
    if closest is not None:
        parts += [Text(""), spec_panel(closest.spec, title="the closest plan"), grid_panel(closest.estimate)]
        shared = distributed_panel(closest.estimate)
        if shared is not None:
            parts.append(shared)
    return Group(*parts, *_footer(result))


def render_fit(result, console: Console) -> None:
    console.print(fit_view(result))


__all__ = ["blockers_table", "fit_view", "no_fit_view", "plans_table", "render_fit"]

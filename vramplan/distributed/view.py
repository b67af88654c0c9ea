"""The terminal panel for a distributed estimate: how the GPUs share the work, host RAM, offload.

The grid and the category table above it are the usual ones (`vramplan.render`), drawn from the
per-GPU footprint; this panel adds what only several GPUs have. Drawing only: the numbers come
from `DistributedPlan`.
"""

from __future__ import annotations

from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from vramplan.units import format_bytes

_LABELS = {
    "ddp_gradient_buckets": "DDP gradient buckets (2nd copy of the gradients)",
    "ddp_broadcast_bucket": "DDP start-up broadcast bucket (transient)",
    "sharded_parameters": "sharded parameters",
    "sharded_gradients": "sharded gradients",
    "optimizer_states": "optimizer states",
    "largest_unsharded_unit": "largest unit, unsharded (while it runs)",
    "parameters": "parameters (16-bit)",
    "gradients": "gradients",
    "fp32_master_weights": "fp32 master weights",
    "ipg_buckets": "reduce (ipg) buckets",
    "persistent_parameters": "persistent parameters (always gathered)",
}


def distributed_view(estimate, unit: str = "GiB") -> Panel:
    plan = estimate.distributed
    title = f"{plan.num_gpus} GPU(s), {plan.strategy.value}"
    if plan.fsdp_sharding is not None:
        title += f" {plan.fsdp_sharding.torch_name}"
    if plan.offload.value != "none":
        title += f", offload {plan.offload.value}"
    table = Table(box=box.SIMPLE_HEAD, show_header=True, header_style="bold", pad_edge=False)
    table.add_column("per GPU")
    table.add_column(unit, justify="right")
    for key, value in plan.model_states.items():
        if key in _LABELS:
            table.add_row(_LABELS[key], format_bytes(value, unit))
    fp = estimate.footprint
    table.add_row(Text("peak allocated, this plan", "bold"), Text(format_bytes(fp.peak_allocated_bytes, unit), "bold"))
    table.add_row("peak allocated, same spec on one GPU", format_bytes(plan.single_gpu_peak_allocated_bytes, unit))
    lines = [table]
    if plan.offload_saved_gpu_bytes is not None:
        lines.append(Text(f"offload saves {format_bytes(plan.offload_saved_gpu_bytes, unit)} of GPU memory "
                          f"per GPU and needs {format_bytes(plan.host.bytes_per_gpu, unit)} of host RAM per GPU "
                          f"({format_bytes(plan.host.pinned_bytes_per_gpu, unit)} pinned)"))
    lines.append(Text(f"host RAM per node ({plan.gpus_per_node} GPUs): "
                      f"{format_bytes(plan.host.bytes_per_node, unit)} for offloaded tensors", "dim"))
    lines.append(Text(f"batch {plan.batch_size_per_gpu} per GPU: {plan.images_per_optimizer_step} images "
                      f"per optimizer step", "dim"))
    return Panel(Group(*lines), title=title, title_align="left", box=box.ROUNDED)

"""Assemble an `Estimate`: the step timeline, its peak, the allocator's reserve, the overheads."""

from __future__ import annotations

from vramplan.estimate.result import Estimate
from vramplan.estimate.step import build_timeline, kept_for_tensors
from vramplan.footprint import ComponentParams
from vramplan.footprint_build import build_footprint
from vramplan.methods import get_method
from vramplan.models.inventory import load_model_inventories
from vramplan.spec import TrainingSpec


def component_parameters(spec: TrainingSpec, inventories: dict) -> dict:
    trained = get_method(spec.method).trainable(spec, inventories)
    parameters = {name: ComponentParams(inv.total_params, trained.get(name, 0))
                  for name, inv in inventories.items()}
    for name, count in trained.items():
        parameters.setdefault(name, ComponentParams(0, count))
    return parameters


def run_estimate(spec: TrainingSpec) -> Estimate:
    if spec.is_distributed:
        from vramplan.distributed.plan import estimate_distributed

        return estimate_distributed(spec)
    inventories = load_model_inventories(spec.model)
    method = get_method(spec.method)
    timeline = build_timeline(spec, inventories)
    footprint, _, notes = build_footprint(timeline.records, timeline.clock.phases, spec.gpu, "estimate",
                                         spec.gradient_checkpointing, prepared=timeline.prepared)
    if timeline.unknown_ops:
        notes.append("ops without an autograd rule (counted as saving all inputs): "
                     + ", ".join(sorted(timeline.unknown_ops)))
    # both depend on the trained tensors alone: fit's candidates share them
    parameters = kept_for_tensors(spec, inventories, lambda: component_parameters(spec, inventories), "parameters")
    file_bytes = kept_for_tensors(spec, inventories, lambda: method.adapter_file_bytes(spec, inventories),
                                  "adapter file")
    return Estimate(spec=spec, parameters=dict(parameters), footprint=footprint,
                    adapter_file_bytes=file_bytes, notes=tuple(notes))

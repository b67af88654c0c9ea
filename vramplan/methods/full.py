"""Full fine-tuning: every parameter of the denoiser trains, and with `--train-text-encoder` every
parameter of the text encoders the catalog marks trainable (`ModelInfo.trainable_text_encoders`:
the diffusers SD3 / Flux scripts leave T5 frozen). The tensors are the inventory's
`named_parameters()` (tied weights once), so optimizer states can be counted per tensor.
"""

from __future__ import annotations

from vramplan.methods.base import (MethodImpl, TrainableTensor, denoiser_inventory, register_method,
                                   trained_text_encoders)
from vramplan.spec import Method


class Full(MethodImpl):
    def trainable_tensors(self, spec, inventories):
        name, _ = denoiser_inventory(spec, inventories)
        return {component: [TrainableTensor(param, tuple(shape)) for param, shape in inventories[component].params]
                for component in (name, *trained_text_encoders(spec))}


    def parameter_filter(self, spec, component, inventories):
        # every named tensor of the component but its buffers (SD 3.5's position table is one:
        # no gradient, `requires_grad_` leaves buffers alone)
        if component not in self.trainable_tensors(spec, inventories):
            return lambda name: False
        prefix = component + "."
        buffers = {prefix + b.name for b in inventories[component].buffers}
        return lambda name: name.startswith(prefix) and name not in buffers

    def apply(self, spec, models, inventories):
        trained = set(self.trainable_tensors(spec, inventories))
        for component, module in models.items():
            module.requires_grad_(component in trained)


register_method(Method.FULL, Full)

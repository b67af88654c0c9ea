"""LoHa (Hadamard product of two low-rank products), as peft 0.21.2 builds it
(peft/tuners/loha/layer.py, `LoHaLayer.update_layer` and `create_adapter_parameters`).

Per wrapped module, rank r:
  * Linear(in, out): hada_w1_a (out, r), hada_w1_b (r, in), hada_w2_a (out, r), hada_w2_b (r, in)
    -> 2 r (in + out).
  * ConvNd(in, out, kernel k, groups g) is flattened to (out, in/g * prod(k)) and treated like a
    Linear -- unless `use_effective_conv2d` (off by default) and k is not 1(x1): then CP factors
    hada_t1, hada_t2 (r, r, k...) and hada_w{1,2}_a (r, out), hada_w{1,2}_b (r, in/g)
    -> 2 (r^2 prod(k) + r (out + in/g)). Conv1d's cores are (r, r, k, 1).
hada_w2_b starts at zero (`reset_adapter_parameters`). Saved keys are peft's own
("<module>.hada_w1_a"), packed under the component's name like LoRA's but not converted.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from vramplan.errors import UsageError
from vramplan.methods.base import AdapterMethod, keep_lycoris_layers_in_eval, TrainableTensor, register_method
from vramplan.models.inventory import ModuleEntry
from vramplan.spec import Method


def loha_module_tensors(entry: ModuleEntry, rank: int, use_effective_conv2d: bool = False) -> list[TrainableTensor]:
    r = rank
    if entry.is_linear:
        out_dim, in_dim = entry.out_features, entry.in_features
    elif entry.kind in ("Conv1d", "Conv2d"):
        kernel = tuple(entry.kernel_size)
        in_dim = entry.in_channels // (entry.groups or 1)
        if use_effective_conv2d and any(k != 1 for k in kernel):
            core = (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)
            return [TrainableTensor("hada_t1", core),
                    TrainableTensor("hada_w1_a", (r, entry.out_channels)),
                    TrainableTensor("hada_w1_b", (r, in_dim)),
                    TrainableTensor("hada_t2", core),
                    TrainableTensor("hada_w2_a", (r, entry.out_channels)),
                    TrainableTensor("hada_w2_b", (r, in_dim), zero_init=True)]
        out_dim, in_dim = entry.out_channels, in_dim * prod(kernel)
    else:
        raise UsageError(f"LoHa cannot wrap {entry.name}: a {entry.kind}, not a Linear, Conv1d or Conv2d")
    return [TrainableTensor("hada_w1_a", (out_dim, r)), TrainableTensor("hada_w1_b", (r, in_dim)),
            TrainableTensor("hada_w2_a", (out_dim, r)),
            TrainableTensor("hada_w2_b", (r, in_dim), zero_init=True)]


@dataclass(frozen=True)
class LoHa(AdapterMethod):
    use_effective_conv2d: bool = False  # LoHaConfig's default

    def module_tensors(self, spec, entry):
        return loha_module_tensors(entry, spec.rank, self.use_effective_conv2d)

    def peft_config(self, spec, target_modules):
        from peft import LoHaConfig

        return LoHaConfig(r=spec.rank, alpha=spec.alpha, rank_dropout=0.0, module_dropout=0.0,
                          use_effective_conv2d=self.use_effective_conv2d, target_modules=list(target_modules))


    output_keeps_input_dtype = True

    def _after_inject(self, module):
        keep_lycoris_layers_in_eval(module)


register_method(Method.LOHA, LoHa)

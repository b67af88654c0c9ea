"""LoKr (Kronecker product of a small and a low-rank factor), as peft 0.21.2 builds it
(peft/tuners/lokr/layer.py: `LoKrLayer.update_layer`, `create_adapter_parameters`, `factorization`).

Per wrapped module, rank r, factor f (`decompose_factor`, our `--lokr-factor`, -1 = balanced):
  in = in_features (Linear) or in_channels / groups (conv); out likewise.
  (in_m, in_n) = factorization(in, f); (out_l, out_k) = factorization(out, f); the delta weight is
  kron(w1, w2) with w1 of (out_l, in_m) and w2 of (out_k, in_n[, k...]).
  * w1 is one full matrix `lokr_w1` (out_l, in_m) -- unless `decompose_both` (off by default) and
    r < max(out_l, in_m) / 2: then lokr_w1_a (out_l, r) and lokr_w1_b (r, in_m).
  * w2 is one full tensor `lokr_w2` (out_k, in_n[, k...]) when r >= max(out_k, in_n) / 2; else
    lokr_w2_a (out_k, r) and lokr_w2_b (r, in_n * prod(k)); for a conv with `use_effective_conv2d`
    (off by default) and a kernel other than 1(x1), a CP core lokr_t2 (r, r, k...) with
    lokr_w2_a (r, out_k) and lokr_w2_b (r, in_n) instead (Conv1d's core is (r, r, k, 1)).
lokr_w1 (or lokr_w1_a) starts at zero (`reset_adapter_parameters`). Saved keys are peft's own
("<module>.lokr_w1"), packed under the component's name, not converted.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from vramplan.errors import UsageError
from vramplan.methods.base import AdapterMethod, keep_lycoris_layers_in_eval, TrainableTensor, register_method
from vramplan.models.inventory import ModuleEntry
from vramplan.spec import Method


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """peft's (and LyCORIS') `factorization`: two factors of `dimension`, the first one equal to
    `factor` when it divides, else the pair nearest sqrt(dimension) (and not above `factor`),
    smaller first."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        n, m = m, n
    return m, n


def lokr_module_tensors(entry: ModuleEntry, rank: int, factor: int = -1, decompose_both: bool = False,
                        use_effective_conv2d: bool = False) -> list[TrainableTensor]:
    r = rank
    if entry.is_linear:
        in_dim, out_dim, kernel = entry.in_features, entry.out_features, ()
    elif entry.kind in ("Conv1d", "Conv2d"):
        in_dim, out_dim = entry.in_channels // (entry.groups or 1), entry.out_channels
        kernel = tuple(entry.kernel_size)
    else:
        raise UsageError(f"LoKr cannot wrap {entry.name}: a {entry.kind}, not a Linear, Conv1d or Conv2d")
    in_m, in_n = factorization(in_dim, factor)
    out_l, out_k = factorization(out_dim, factor)

    if decompose_both and r < max(out_l, in_m) / 2:
        tensors = [TrainableTensor("lokr_w1_a", (out_l, r), zero_init=True),
                   TrainableTensor("lokr_w1_b", (r, in_m))]
    else:
        tensors = [TrainableTensor("lokr_w1", (out_l, in_m), zero_init=True)]

    if r >= max(out_k, in_n) / 2:
        tensors.append(TrainableTensor("lokr_w2", (out_k, in_n, *kernel)))
    elif kernel and use_effective_conv2d and any(k != 1 for k in kernel):
        core = (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)
        tensors += [TrainableTensor("lokr_t2", core), TrainableTensor("lokr_w2_a", (r, out_k)),
                    TrainableTensor("lokr_w2_b", (r, in_n))]
    else:
        tensors += [TrainableTensor("lokr_w2_a", (out_k, r)),
                    TrainableTensor("lokr_w2_b", (r, in_n * prod(kernel)))]
    return tensors


@dataclass(frozen=True)
class LoKr(AdapterMethod):
    decompose_both: bool = False        # LoKrConfig's defaults
    use_effective_conv2d: bool = False

    def module_tensors(self, spec, entry):
        factor = spec.lokr_factor if spec.lokr_factor is not None else -1
        return lokr_module_tensors(entry, spec.rank, factor, self.decompose_both, self.use_effective_conv2d)

    def template(self, spec, entry):
        factor = spec.lokr_factor if spec.lokr_factor is not None else -1
        names = {t.name for t in self.module_tensors(spec, entry)}
        in_dim = entry.fan_in // ((entry.groups or 1) if entry.is_conv else 1)
        in_m, in_n = factorization(in_dim, factor)
        out_l, out_k = factorization(entry.fan_out, factor)
        regime = "w2ab" if "lokr_w2_a" in names else "w2"
        return "lokr", regime, {"IM": in_m, "IN_N": in_n, "OL": out_l, "OK": out_k, "R": spec.rank}

    def peft_config(self, spec, target_modules):
        from peft import LoKrConfig

        factor = spec.lokr_factor if spec.lokr_factor is not None else -1
        return LoKrConfig(r=spec.rank, alpha=spec.alpha, rank_dropout=0.0, module_dropout=0.0,
                          decompose_both=self.decompose_both, decompose_factor=factor,
                          use_effective_conv2d=self.use_effective_conv2d, target_modules=list(target_modules))


    output_keeps_input_dtype = True

    def _after_inject(self, module):
        keep_lycoris_layers_in_eval(module)


register_method(Method.LOKR, LoKr)

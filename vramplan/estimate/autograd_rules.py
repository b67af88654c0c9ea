"""What autograd keeps for each op, and what its backward allocates: the per-op rules the
analytic tier replays over a recorded graph.

Source: `tools/autograd/derivatives.yaml` of PyTorch 2.13 (which inputs and outputs each
derivative formula reads) and the generated autograd code, which since PyTorch 1.10 saves a
tensor only when a formula that reads it will run, i.e. when the input whose gradient needs it
requires grad (`should_compute_output`). Formulas shared by several inputs (convolution,
group/layer norm, SDPA) save their tensors whenever any of those inputs requires grad.

`Rule.save` maps a saved slot (an argument name, or `out0`, `out1`... for outputs) to the
argument names whose `requires_grad` makes autograd keep it ("*": any differentiable input).
`Rule.grad` says how each input's gradient is produced in backward: "alloc" (a new tensor the
size of the input, in its dtype), "alias" (the output's gradient itself, or a view of it: no
new memory, unless a dtype or broadcast change forces a copy), or "none".
`Rule.temps` lists transient tensors the backward formula builds before its result, in units of
an argument's size (e.g. pow's `self.pow(exponent - 1)` then `exponent * ...`).
Each rule can be corrected on its own when the simulator disagrees: no global factor.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Rule:
    save: dict = field(default_factory=dict)
    grad: str = "alloc"              # alloc | alias | none
    temps: tuple = ()                # ((slot, count), ...) transient during backward
    differentiable: bool = True


ANY = ("*",)
VIEW = Rule(grad="alias")
PASS = Rule(grad="alias")
NONDIFF = Rule(grad="none", differentiable=False)
ALLOC = Rule()

RULES: dict[str, Rule] = {
    # -- views and reshapes: backward is a view of the incoming gradient
    **{name: VIEW for name in (
        "view.default", "_unsafe_view.default", "reshape.default", "t.default", "transpose.int",
        "permute.default", "unsqueeze.default", "squeeze.dim", "squeeze.default", "squeeze.dims",
        "alias.default", "detach.default", "view_as_real.default", "view_as_complex.default",
        "unflatten.int", "flatten.using_ints", "_reshape_alias.default", "as_strided.default",
        "expand.default", "lift_fresh.default")},
    # slices and selects: backward writes the gradient into zeros of the input's size
    "slice.Tensor": ALLOC, "select.int": ALLOC, "narrow.default": ALLOC,
    # split/chunk/unbind outputs are views; backward concatenates their gradients
    "split.Tensor": ALLOC, "split_with_sizes.default": ALLOC, "unbind.int": ALLOC,
    "chunk.default": ALLOC,
    # cat's backward hands each input a narrow view of the output's gradient
    "cat.default": PASS, "stack.default": PASS,
    "clone.default": PASS, "contiguous.default": PASS,
    "add.Tensor": PASS, "add_.Tensor": PASS, "sub.Tensor": PASS, "add.Scalar": PASS,
    "sub.Scalar": PASS,
    "rsub.Scalar": ALLOC, "rsub.Tensor": ALLOC, "neg.default": ALLOC,
    "_to_copy.default": ALLOC, "to.dtype": ALLOC,
    "constant_pad_nd.default": ALLOC,
    # -- arithmetic
    "mul.Tensor": Rule(save={"self": ("other",), "other": ("self",)}),
    "mul.Scalar": ALLOC,
    "mul_.Tensor": Rule(save={"self": ("other",), "other": ("self",)}),
    "div.Tensor": Rule(save={"other": ("self", "other"), "self": ("other",)}),
    "div.Scalar": ALLOC,
    "addcmul.default": Rule(save={"tensor1": ("tensor2",), "tensor2": ("tensor1",)}),
    "pow.Tensor_Scalar": Rule(save={"self": ANY}, temps=(("self", 2),)),
    "rsqrt.default": Rule(save={"out0": ANY}, temps=(("self", 2),)),
    "sqrt.default": Rule(save={"out0": ANY}, temps=(("self", 1),)),
    "exp.default": Rule(save={"out0": ANY}),
    "sin.default": Rule(save={"self": ANY}, temps=(("self", 1),)),
    "cos.default": Rule(save={"self": ANY}, temps=(("self", 2),)),
    "tanh.default": Rule(save={"out0": ANY}),
    "sigmoid.default": Rule(save={"out0": ANY}),
    "silu.default": Rule(save={"self": ANY}),
    "gelu.default": Rule(save={"self": ANY}),
    "relu.default": Rule(save={"out0": ANY}),
    "clamp.default": Rule(save={"self": ANY}),
    "where.self": Rule(save={"condition": ANY}),
    "masked_fill.Scalar": Rule(save={"mask": ANY}),
    "mean.dim": ALLOC, "mean.default": ALLOC, "sum.dim_IntList": ALLOC, "sum.default": ALLOC,
    "_softmax.default": Rule(save={"out0": ANY}),
    "_safe_softmax.default": Rule(save={"out0": ANY}),
    "_log_softmax.default": Rule(save={"out0": ANY}),
    "upsample_nearest2d.default": ALLOC, "upsample_nearest2d.vec": ALLOC,
    "index.Tensor": Rule(save={"indices": ANY}),
    "embedding.default": Rule(save={"indices": ANY}),
    "mse_loss.default": Rule(save={"self": ANY, "target": ANY}),
    # -- matrix products: each operand is kept only for the other's gradient
    "mm.default": Rule(save={"self": ("mat2",), "mat2": ("self",)}),
    "bmm.default": Rule(save={"self": ("mat2",), "mat2": ("self",)}),
    "addmm.default": Rule(save={"mat1": ("mat2",), "mat2": ("mat1",)}),
    "baddbmm.default": Rule(save={"batch1": ("batch2",), "batch2": ("batch1",)}),
    # -- formulas shared by all inputs: saved whenever any input needs a gradient
    "convolution.default": Rule(save={"input": ANY, "weight": ANY}),
    "native_group_norm.default": Rule(save={"input": ANY, "weight": ANY, "out1": ANY, "out2": ANY}),
    "native_layer_norm.default": Rule(save={"input": ANY, "weight": ANY, "bias": ANY,
                                            "out1": ANY, "out2": ANY}),
    "_fused_rms_norm.default": Rule(save={"input": ANY, "weight": ANY, "out1": ANY}),
    # fused attention: q, k, v, output and the log-sum-exp (no sequence x sequence matrix)
    "_scaled_dot_product_flash_attention_for_cpu.default": Rule(
        save={"query": ANY, "key": ANY, "value": ANY, "out0": ANY, "out1": ANY}),
    "_scaled_dot_product_flash_attention.default": Rule(
        save={"query": ANY, "key": ANY, "value": ANY, "out0": ANY, "out1": ANY}),
    "_scaled_dot_product_efficient_attention.default": Rule(
        save={"query": ANY, "key": ANY, "value": ANY, "attn_bias": ANY, "out0": ANY, "out1": ANY}),
    # -- no gradient flows through these
    **{name: NONDIFF for name in (
        "empty_like.default", "empty.memory_format", "zeros.default", "zeros_like.default",
        "ones.default", "ones_like.default", "full.default", "full_like.default", "arange.default",
        "arange.start", "arange.start_step", "linspace.default", "randint.default",
        "randint.low", "randn.default", "randn_like.default", "rand.default", "rand_like.default",
        "size.default", "cumprod.default", "cumsum.default", "eq.Scalar", "eq.Tensor", "ne.Scalar",
        "lt.Scalar", "gt.Scalar", "argmax.default", "scalar_tensor.default", "new_zeros.default",
        "new_ones.default", "new_empty.default", "new_full.default", "pow.Scalar", "reciprocal.default", "add_.Scalar",
        "ge.Scalar", "le.Scalar", "copy_.default", "fill_.Scalar", "zero_.default",
        "bernoulli_.float", "normal_.default", "uniform_.default", "lift_fresh_copy.default",
        "_local_scalar_dense.default", "sym_size.int", "sym_numel.default", "is_nonzero.default")},
}


# Custom autograd Functions: which of their tensor inputs (by position) they keep for backward.
FUNCTION_SAVES = {
    # peft/tuners/loha/layer.py: ctx.save_for_backward(w1a, w1b, w2a, w2b, scale)
    "HadaWeight": "all", "HadaWeightCP": "all",
    # bitsandbytes/autograd/_functions.py MatMul8bitLt: ctx.tensors = (CAt, subA, A) -- the input
    "MatMul8bitLt": (0,),
    # MatMul4Bit: ctx.tensors = (None, B) -- only the (frozen) quantized weight
    "MatMul4Bit": (1,),
}


# Functions that keep their saves as plain ctx attributes (not `save_for_backward`): checkpointing
# cannot drop them and their backward does not release them, so they stay with the graph until
# it goes (`Replayer.finish`). bitsandbytes' MatMul8bitLt's `ctx.tensors` (its input, a
# checkpointed block's activations included) is one: SD 3.5 Large LoRA on an int8 base with
# checkpointing was 1.7% under simulate without this.
HELD_BY_CTX = frozenset({"MatMul8bitLt"})


def held_by_ctx(name: str) -> bool:
    return name in HELD_BY_CTX


def function_saves(name: str):
    """Positions of the inputs a custom Function keeps, or "all" (also for unknown ones)."""
    return FUNCTION_SAVES.get(name, "all")


def rule_for(opname: str) -> Rule | None:
    rule = RULES.get(opname)
    if rule is None and opname.startswith("bitsandbytes::"):
        # bitsandbytes' kernels run inside its own autograd Functions (MatMul8bitLt,
        # MatMul4Bit), which the replay treats as one node (see replay.py)
        return NONDIFF
    return rule

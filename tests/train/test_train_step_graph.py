"""The step lets its autograd graph go at the end of backward, before the optimizer, so what an
autograd Function keeps on ctx rather than saving for backward goes with it. bitsandbytes' int8
matmul on CUDA keeps its input there (`MatMul8bitLt`, `ctx.tensors`). With the graph held
through the optimizer, FLUX LoRA on int8 at 512 px had 6.34 GiB more in its optimizer phase
(simulate: 27.20 GiB; 20.86 GiB now, as the estimate counts). On the CPU bitsandbytes takes
another Function, so a stand-in of the same kind is spliced into the tiny UNet here."""

import weakref

import torch

from vramplan.step.build import build_step


KEPT = []


class KeepOnCtx(torch.autograd.Function):
    """Identity that keeps its input on ctx, as MatMul8bitLt does."""

    @staticmethod
    def forward(ctx, x):
        ctx.kept = x
        KEPT.append(weakref.ref(x))
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad


def test_what_ctx_keeps_is_gone_before_the_optimizer(tiny, kit):
    spec = kit.spec(tiny[0], method="lora", rank=2, precision="fp32")
    built = build_step(spec, "cpu", weights=tiny[0])
    kept = KEPT
    kept.clear()

    def splice(module, args, output):
        return KeepOnCtx.apply(output)

    # a LoRA-wrapped projection: its output needs grad, so the Function joins the graph
    to_q = next(m for n, m in built.models["unet"].named_modules() if n.endswith("attn1.to_q"))
    to_q.register_forward_hook(splice)
    alive = {}

    def hook(phase):
        alive[phase] = [ref() is not None for ref in kept]

    torch.manual_seed(0)
    loss = built.run_step(hook=hook)
    assert alive["backward"] and all(alive["backward"])   # held after forward: the test can tell
    assert not any(alive["optimizer"])
    assert loss.grad_fn is None and torch.isfinite(loss)

"""The step timeline (`vramplan/estimate/step.py`): what lives when, over two training steps.

The reference is the step the other tiers run (`vramplan/step/build.py`): one batch of pixel
values in the VAE's dtype, encoded by the VAE, then the denoiser's forward and backward, then the
optimizer, with `zero_grad(set_to_none=True)`.
"""

import pytest

from vramplan.estimate import estimate
from vramplan.footprint import Category
from vramplan.spec import build_spec

PHASES = ["load", "encode", "forward", "backward", "optimizer",
          "step 2 encode", "step 2 forward", "step 2 backward", "step 2 optimizer"]


def phases(est) -> dict:
    return {p.phase: p.categories for p in est.footprint.phases}


def test_two_steps_in_order(h):
    assert [p.phase for p in h.estimate().footprint.phases] == PHASES


def test_cached_latents_skip_the_vae(h):
    at = phases(h.estimate(cache_latents=True))
    # nothing but the frozen text encoder's small forward runs in "encode"
    assert at["encode"].get(Category.INPUTS, 0) < 64 * 1024


def test_optimizer_states_appear_at_the_first_step_and_stay(h):
    at = phases(h.estimate(method="full", precision="fp32"))
    assert at["load"].get(Category.OPTIMIZER_STATES, 0) == 0
    assert at["forward"].get(Category.OPTIMIZER_STATES, 0) == 0
    states = at["optimizer"][Category.OPTIMIZER_STATES]
    for phase in PHASES[5:]:
        assert at[phase][Category.OPTIMIZER_STATES] == states


def test_gradients_are_freed_by_zero_grad(h):
    at = phases(h.estimate(method="full", precision="fp32"))
    for phase in ("load", "encode", "forward", "step 2 encode", "step 2 forward"):
        assert at[phase].get(Category.GRADIENTS, 0) == 0
    assert at["optimizer"][Category.GRADIENTS] == at["step 2 optimizer"][Category.GRADIENTS] > 0


def test_ema_is_one_fp32_copy_of_the_trained_tensors(h):
    est = h.estimate(method="full", ema=True)
    assert est.footprint.category_bytes(Category.EMA) == h.per_tensor(h.numels("sd15", "unet"), 4)


def test_gradient_accumulation_keeps_gradients_through_the_next_micro_step(h):
    # the second micro-step's forward runs with the first one's gradients alive, and each new
    # gradient is summed into param.grad in place (no second buffer kept)
    plain = phases(h.estimate(method="full", precision="fp32"))
    accumulated = phases(h.estimate(method="full", precision="fp32", gradient_accumulation_steps=4))
    grads = h.per_tensor(h.numels("sd15", "unet"), 4)
    assert plain["forward"].get(Category.GRADIENTS, 0) == 0
    assert accumulated["micro 2 forward"][Category.GRADIENTS] == grads
    assert accumulated["optimizer"][Category.GRADIENTS] == grads


@pytest.mark.parametrize("precision, itemsize", [("fp32", 4), ("fp16", 2)])
def test_the_pixel_batch_is_allocated_once(h, precision, itemsize):
    pixels = 3 * 512 * 512 * itemsize
    at = phases(h.estimate(method="full", precision=precision))
    assert at["encode"][Category.INPUTS] < 2 * pixels


def test_the_batch_lives_through_the_optimizer_step(h):
    pixels = 3 * 512 * 512 * 4
    at = phases(h.estimate(method="full", precision="fp32"))
    assert at["optimizer"].get(Category.INPUTS, 0) >= pixels


def test_every_recorded_sd15_op_has_an_autograd_rule():
    est = estimate(build_spec({}))
    assert not any(n.startswith("ops without an autograd rule") for n in est.notes)

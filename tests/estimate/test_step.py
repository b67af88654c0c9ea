"""The step timeline (`vramplan/estimate/step.py`): what lives when, over two training steps.

The reference is the step the other tiers run (`vramplan/step/build.py`): one batch of pixel
values in the VAE's dtype, encoded by the VAE, then the denoiser's forward and backward, then the
optimizer, with `zero_grad(set_to_none=True)`.
"""

import itertools

import pytest

import vramplan.estimate.step as step
from vramplan.errors import UsageError
from vramplan.estimate import estimate
from vramplan.estimate.optimizer import optimizer_state_bytes, optimizer_state_tensors
from vramplan.estimate.optimizer_step import clip_scalars, step_transients
from vramplan.estimate.replay import Clock
from vramplan.footprint import Category
from vramplan.methods import get_method, registered_methods
from vramplan.models.inventory import load_model_inventories
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


@pytest.mark.parametrize("method", [m.value for m in registered_methods()])
def test_trainable_tensors_never_read_the_fields_the_step_shares_them_across(method):
    """`step.trained_tensors` shares one method's tensors among specs that differ only in
    `NOT_TRAINED` (precision, quantization, caching, EMA, ...): no method may read those."""
    options = {"model": "sdxl", "method": method, "train_text_encoder": method in ("lora", "full")}
    reference = build_spec(options)
    inventories = load_model_inventories(reference.model)
    impl = get_method(reference.method)
    expected = impl.trainable_tensors(reference, inventories)
    varied = {"precision": ["fp32", "fp16", "bf16"], "base_quant": ["none", "int8", "nf4"],
              "cache_latents": [False, True], "ema": [False, True], "optimizer": ["adamw", "adafactor"]}
    checked = 0
    for values in itertools.product(*varied.values()):
        try:
            spec = build_spec({**options, **dict(zip(varied, values))})
        except UsageError:
            continue     # a combination the spec refuses (a quantized full fine-tune, ...)
        assert impl.trainable_tensors(spec, inventories) == expected, values
        assert step.trained_tensors(spec, inventories) == expected, values
        checked += 1
    assert checked >= 12


def test_one_optimizer_shares_its_qmaps_across_trained_components():
    """bitsandbytes keeps one pair of qmaps per optimizer, and the step has one optimizer over
    the denoiser's and the text encoder's adapters: the states are those of all their tensors
    together."""
    spec = build_spec({"model": "sdxl", "method": "lora", "train_text_encoder": True, "optimizer": "adamw8bit"})
    inventories = load_model_inventories(spec.model)
    trained = get_method(spec.method).trainable_tensors(spec, inventories)
    assert len(trained) >= 2
    tensors = [t for ts in trained.values() for t in ts]
    expected = optimizer_state_bytes(spec.optimizer, [t.shape for t in tensors], 4, device_only=True)
    states = step.device_states(spec, inventories, trained, 4)
    assert sum(s.nbytes for s in states) == expected


@pytest.mark.parametrize("options", [
    {"method": "full", "optimizer": "adamw", "ema": True},
    {"method": "lora", "optimizer": "adafactor", "train_text_encoder": True},
    {"method": "lora", "optimizer": "adamw8bit", "cache_latents": True},
])
def test_load_and_optimizer_phases_are_what_a_clock_records(options):
    """The load and optimizer phases are placed as kept rows; they must be the records a clock
    makes allocating each weight, then per step the states (first step only), clipping's
    scalars, each wave of transients and EMA's pair, every wave freed in order after it."""
    spec = build_spec({"model": "sd15", **options})
    inventories = load_model_inventories(spec.model)
    trained, weights = step.step_tensors(spec, inventories)
    timeline = step.build_timeline(spec, inventories)
    records = list(timeline.records)

    def rows(phase):
        return [(r.nbytes, r.alloc_at, r.free_at, r.category, r.module) for r in records if r.phase == phase]

    def shifted(recs, start):
        return [(r.nbytes, r.alloc_at + start, None if r.free_at is None else r.free_at + start, r.category,
                 r.module) for r in recs]

    clock = Clock()
    for t in weights:
        clock.alloc(t.nbytes, t.category, "load", module=t.name)
    assert rows("load") == shifted(clock.open, 0)
    numels = [t.numel for ts in trained.values() for t in ts]
    for phase, first in (("optimizer", True), ("step 2 optimizer", False)):
        clock = Clock()
        if first:
            tensors = [t for ts in trained.values() for t in ts]
            for s in optimizer_state_tensors(spec.optimizer, [t.shape for t in tensors], 4,
                                             zero_params=[t.zero_init for t in tensors]):
                if not s.on_host:
                    clock.alloc(s.nbytes, Category.OPTIMIZER_STATES, phase)
        waves = [clip_scalars(len(numels))] + step_transients(spec.optimizer, [(n, 4) for n in numels])
        if spec.ema:
            waves.append([max(numels) * 4] * 2)
        for wave in waves:
            recs = [clock.alloc(n, Category.TEMPORARIES, phase) for n in wave]
            for rec in recs:
                clock.free(rec)
        start = next(e for name, e in timeline.clock.phases if name == phase) - 1
        assert [r for r in rows(phase) if r[3] is not Category.GRADIENTS and r[3] is not Category.INPUTS] \
            == shifted(clock.open, start), phase

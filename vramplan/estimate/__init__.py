"""The analytic tier: count bytes from the spec and the shipped inventories, without torch.

`estimate(spec)` replays the training step the other tiers run (see `step.py`): weights from
the inventories, activations and gradients from the recorded op graphs under autograd's rules,
optimizer states from each library's own rules, the caching allocator's reserve by replaying its
algorithm, and the CUDA context as a documented per-card figure.
"""

from __future__ import annotations

from vramplan.estimate.result import Estimate


def estimate(spec) -> Estimate:
    """The estimate, with Python's cyclic garbage collector paused: the step builds ~10^5 acyclic
    objects that a collection would rescan for nothing (about a tenth of the time, measured on
    SDXL LoRA); reference counting still frees them. fit's search pauses it the same way; the
    replays and graphs below run only under one of the two."""
    from vramplan.estimate.core import run_estimate
    from vramplan.timeline import gc_paused

    with gc_paused():
        return run_estimate(spec)


__all__ = ["estimate", "Estimate"]

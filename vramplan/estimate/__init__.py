"""The analytic tier: count bytes from the spec and the shipped inventories, without torch.

`estimate(spec)` replays the training step the other tiers run (see `step.py`): weights from
the inventories, activations and gradients from the recorded op graphs under autograd's rules,
optimizer states from each library's own rules, the caching allocator's reserve by replaying its
algorithm, and the CUDA context as a documented per-card figure.
"""

from __future__ import annotations

from vramplan.estimate.result import Estimate


def estimate(spec) -> Estimate:
    from vramplan.estimate.core import run_estimate

    return run_estimate(spec)


__all__ = ["estimate", "Estimate"]

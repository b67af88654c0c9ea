"""vramplan: will this diffusion fine-tune fit on my GPU, and with which settings?

Four tiers share one validated `TrainingSpec`: `estimate` counts (no torch), `simulate` traces the
real training step on fake tensors, `profile` measures real CUDA steps, `train` runs them.
"""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes' CPU backend announces on import that an optional kernel package is missing; we
# never run its CPU 4-bit kernels (vramplan/simulate/bnb_paths.py), so keep stderr for our output.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

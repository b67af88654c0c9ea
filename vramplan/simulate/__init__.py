"""The fake-tensor tier: run the real training step on fake CPU tensors, no GPU, no weights."""

import logging as _logging

# bitsandbytes' CPU backend announces, on import, that an optional kernel package is missing; we
# never run its CPU 4-bit kernels (vramplan/simulate/bnb_paths.py), so keep stderr for our output.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

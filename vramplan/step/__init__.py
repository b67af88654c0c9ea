"""The one training step that simulate, profile and train all run (see `build.py`)."""

import logging as _logging

# bitsandbytes' CPU backend announces, on import, that an optional kernel package is missing; we
# never run its CPU 4-bit kernels (vramplan/simulate/bnb_paths.py), so keep stderr for our output.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

"""vramplan: will this diffusion fine-tune fit on my GPU, and with which settings?

Four tiers share one validated `TrainingSpec`: `estimate` counts (no torch), `simulate` traces the
real training step on fake tensors, `profile` measures real CUDA steps, `train` runs them.
"""

__version__ = "0.1.0"

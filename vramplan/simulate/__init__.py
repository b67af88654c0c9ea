"""The fake-tensor tier: run the real training step on fake CPU tensors, no GPU, no weights."""

"""`vramplan train`: run a plan as a real fine-tune on a local pipeline and a folder of images.

- `inputs`: the options and every bad-input check (no torch), the run marker file
- `data`: images, captions, center-crop, tokenization, the step-determined data order
- `run`: the loop around the shared training step (`vramplan.step.build_step`), `train()`
- `checkpoint`: atomic checkpoints and resume
- `save`: LoRA / LoHa / LoKr, textual-inversion embeddings, diffusers pipeline folders
- `progress`: the progress bar and the memory meter
- `launch`: a plan for several GPUs starts its processes with `accelerate launch`
- `ranks`: each of those processes trains as one rank, accelerate preparing the step
"""

from vramplan.train.inputs import TrainOptions


def train(spec, options, console=None, launched: bool = False):
    """A `TrainResult`, or for a several-GPU plan started here, `accelerate launch`'s exit status."""
    from vramplan.train.run import train as run_train

    return run_train(spec, options, console, launched=launched)


__all__ = ["TrainOptions", "train"]

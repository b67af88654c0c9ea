"""DreamBooth: a full fine-tune (diffusers train_dreambooth.py) whose batches also carry as many
class images as instance images (prior preservation). What trains is exactly `Full`'s; the doubled
batch is the spec's business (`TrainingSpec.images_per_step`).
"""

from __future__ import annotations

from vramplan.methods.base import register_method
from vramplan.methods.full import Full
from vramplan.spec import Method


class DreamBooth(Full):
    pass


register_method(Method.DREAMBOOTH, DreamBooth)

"""What fills the GPU: memory categories and the result every tier reports in the same shape.

Category names follow PyTorch's MemTracker (`torch/distributed/_tools/mem_tracker.py`,
`_MemRefType`: Parameter, Buffer, Gradient, Activation, Temp, Optstate) split further where
training diffusion models needs it (frozen vs trainable weights, fp32 master copies, the autocast
weight-cast cache, EMA) plus what the caching allocator adds (whole blocks counted as allocated
beyond their tensors, reserve) and what lies outside it (CUDA context).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class Category(str, Enum):
    FROZEN_WEIGHTS = "frozen_weights"
    TRAINABLE_WEIGHTS = "trainable_weights"
    MASTER_WEIGHTS = "master_weights"
    BUFFERS = "buffers"
    GRADIENTS = "gradients"
    OPTIMIZER_STATES = "optimizer_states"
    EMA = "ema"
    AUTOCAST_CACHE = "autocast_cache"
    WORKSPACES = "workspaces"
    INPUTS = "inputs"
    ACTIVATIONS = "activations"
    TEMPORARIES = "temporaries"
    BLOCK_SLACK = "block_slack"
    CUDA_CONTEXT = "cuda_context"
    ALLOCATOR_RESERVE = "allocator_reserve"

    @property
    def label(self) -> str:
        return LABELS[self]

    @property
    def color(self) -> str:
        return COLORS[self]

    @property
    def in_allocator(self) -> bool:
        """Counted by torch.cuda.memory_allocated (everything but context and reserve)."""
        return self not in (Category.CUDA_CONTEXT, Category.ALLOCATOR_RESERVE)


LABELS = {
    Category.FROZEN_WEIGHTS: "Parameter, frozen",
    Category.TRAINABLE_WEIGHTS: "Parameter, trainable",
    Category.MASTER_WEIGHTS: "Master weights (fp32)",
    Category.BUFFERS: "Buffer",
    Category.GRADIENTS: "Gradient",
    Category.OPTIMIZER_STATES: "Optstate",
    Category.EMA: "EMA copy",
    Category.AUTOCAST_CACHE: "Autocast weight casts",
    Category.WORKSPACES: "cuBLAS/cuDNN workspaces",
    Category.INPUTS: "Batch inputs",
    Category.ACTIVATIONS: "Activation (saved)",
    Category.TEMPORARIES: "Temp",
    Category.BLOCK_SLACK: "Unsplit block slack",
    Category.CUDA_CONTEXT: "CUDA context",
    Category.ALLOCATOR_RESERVE: "Allocator reserve",
}

# One colour per category, the same in the terminal grid and in matplotlib charts (hex, so that
# rich and matplotlib agree); chosen to stay distinguishable for the common colour blindnesses.
COLORS = {
    Category.FROZEN_WEIGHTS: "#4c72b0",
    Category.TRAINABLE_WEIGHTS: "#64b5f6",
    Category.MASTER_WEIGHTS: "#1a3d7c",
    Category.BUFFERS: "#8c8c8c",
    Category.GRADIENTS: "#dd8452",
    Category.OPTIMIZER_STATES: "#c44e52",
    Category.EMA: "#8172b3",
    Category.AUTOCAST_CACHE: "#b5a642",
    Category.WORKSPACES: "#6f6f6f",
    Category.INPUTS: "#937860",
    Category.ACTIVATIONS: "#55a868",
    Category.TEMPORARIES: "#a6d96a",
    Category.BLOCK_SLACK: "#dadaeb",
    Category.CUDA_CONTEXT: "#4d4d4d",
    Category.ALLOCATOR_RESERVE: "#bdbdbd",
}


@dataclass(frozen=True)
class ComponentParams:
    total: int
    trainable: int

    def to_json(self) -> dict:
        return {"total": self.total, "trainable": self.trainable}


@dataclass(frozen=True)
class PhasePeak:
    """The highest allocated bytes seen in one phase of the step, and what filled it then."""

    phase: str
    peak_bytes: int
    categories: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Footprint:
    """Memory of one training step on one GPU, as estimated, simulated or measured.

    `categories` is the composition at the moment of peak allocation plus the two figures outside
    the allocator, so that it sums to `device_used_bytes` and can be drawn as one grid.
    """

    categories: dict                    # Category -> bytes
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    device_used_bytes: int
    peak_phase: str = ""
    phases: tuple = ()                  # PhasePeak, in step order
    source: str = "estimate"            # estimate | simulate | profile

    def category_bytes(self, category: Category) -> int:
        return int(self.categories.get(category, 0))

    def categories_json(self) -> dict:
        return {c.value: int(self.categories.get(c, 0)) for c in Category if c in self.categories}

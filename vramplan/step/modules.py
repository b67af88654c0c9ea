"""Small torch modules the methods add to real diffusers/transformers models.

Kept apart from `vramplan/methods/` (which the analytic tier imports without torch); each is
the torch side of one method and is applied by that method's `apply`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingWithNewTokens(nn.Module):
    """Textual inversion: the text encoder's token embedding plus `num_vectors` new rows, of which
    only the new rows train. Token ids >= the old vocabulary size select a new row.

    diffusers' textual_inversion.py instead resizes the embedding and trains the whole matrix,
    restoring the old rows after each step; that costs a gradient and optimizer state for every
    row (NOTES.md). This step trains only the new rows, as the method intends.
    """

    def __init__(self, base: nn.Embedding, num_vectors: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.base = base
        self.vocab = base.num_embeddings
        weight = base.weight
        self.new_rows = nn.Parameter(torch.empty(num_vectors, base.embedding_dim, device=weight.device,
                                                 dtype=dtype or weight.dtype))

    @property
    def weight(self) -> torch.Tensor:  # transformers reads `token_embedding.weight` for dtype/device
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_new = input_ids >= self.vocab
        old = self.base(input_ids.masked_fill(is_new, 0))
        new_ids = (input_ids - self.vocab).clamp(0, self.new_rows.shape[0] - 1)
        new = F.embedding(new_ids, self.new_rows).to(old.dtype)
        return torch.where(is_new.unsqueeze(-1), new, old)


def token_embedding_path(encoder: nn.Module) -> str:
    """Attribute path of a text encoder's input-token embedding (CLIP: embeddings.token_embedding)."""
    best, size = None, -1
    for name, module in encoder.named_modules():
        if isinstance(module, nn.Embedding) and module.num_embeddings > size and "position" not in name:
            best, size = name, module.num_embeddings
    if best is None:
        raise ValueError(f"{type(encoder).__name__} has no token embedding")
    return best


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, attr, new)


class HypernetworkMLP(nn.Module):
    """NovelAI / AUTOMATIC1111 hypernetwork module (modules/hypernetworks/hypernetwork.py,
    `HypernetworkModule`): Linear layers of widths `dim * layer_structure[i]`, no activation
    ("linear"), no layer norm, no dropout, applied residually: x + mlp(x)."""

    def __init__(self, dim: int, layers=(1, 2, 1), device=None, dtype=None):
        super().__init__()
        widths = [int(dim * w) for w in layers]
        self.linear = nn.Sequential(*[nn.Linear(a, b, device=device, dtype=dtype)
                                      for a, b in zip(widths[:-1], widths[1:])])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.linear(x)


class HyperLinear(nn.Module):
    """A cross-attention key or value projection fed through a hypernetwork first:
    `to_k(context + mlp_k(context))`, as `apply_single_hypernetwork` does in AUTOMATIC1111."""

    def __init__(self, base: nn.Linear, hyper: HypernetworkMLP):
        super().__init__()
        self.base_layer = base
        self.hyper = hyper

    @property
    def weight(self):
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(self.hyper(x))

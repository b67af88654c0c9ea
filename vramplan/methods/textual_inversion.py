"""Textual inversion: new token embeddings, `num_vectors` rows of the input-embedding width, in
each text encoder the method trains -- `ModelInfo.trainable_text_encoders`:
  * sd1 / sd2: the one CLIP text encoder (diffusers examples/textual_inversion/textual_inversion.py);
  * sdxl: both CLIPs (textual_inversion_sdxl.py adds the tokens to text_encoder and text_encoder_2);
  * flux: CLIP-L only (advanced_diffusion_training/train_dreambooth_lora_flux_advanced.py, whose
    T5 embeddings train only with --enable_t5_ti, off by default);
  * sd3: both CLIPs, T5 left out as for Flux (diffusers ships no SD3 textual-inversion script).

Counted here is what the method learns: the new rows. diffusers' textual_inversion.py hands the
optimizer the *whole* input-embedding matrix and restores the old rows after each step, which
costs gradients and optimizer states for every row (NOTES.md); the training step vramplan builds
decides which of the two it runs, and the memory estimate says which.

Saved file: per text encoder one learned_embeds safetensors, {placeholder token: (num_vectors,
width)} with metadata {"format": "pt"} (`save_progress` in those scripts; textual_inversion_sdxl.py
writes learned_embeds.safetensors and learned_embeds_2.safetensors), under the token
`PLACEHOLDER_TOKEN` (the diffusers README's example; each character more adds a byte before the
8-byte padding).
"""

from __future__ import annotations

from vramplan.errors import UsageError
from vramplan.methods.base import MethodImpl, PT_FORMAT, TrainableTensor, register_method, safetensors_file_bytes
from vramplan.models.inventory import Inventory
from vramplan.spec import Method

PLACEHOLDER_TOKEN = "<cat-toy>"


def embedding_width(inventory: Inventory) -> int:
    """The input (token) embedding's width: the Embedding with the largest vocabulary."""
    embeddings = [m for m in inventory.modules if m.kind == "Embedding" and m.num_embeddings]
    if not embeddings:
        raise UsageError(f"{inventory.component} of {inventory.model} has no token embedding to extend")
    return max(embeddings, key=lambda m: m.num_embeddings).embedding_dim


class TextualInversion(MethodImpl):
    def trainable_tensors(self, spec, inventories):
        vectors = spec.num_vectors or 1
        return {encoder: [TrainableTensor(PLACEHOLDER_TOKEN, (vectors, embedding_width(inventories[encoder])))]
                for encoder in spec.model.trainable_text_encoders}

    def adapter_file_bytes(self, spec, inventories, dtype: str = "F16") -> int:
        """All learned_embeds files together, in `dtype` (fp16 by default; the diffusers scripts
        keep the text encoder in float32 and so write F32)."""
        return sum(safetensors_file_bytes([(t.name, t.shape) for t in tensors], dtype, PT_FORMAT)
                   for tensors in self.trainable_tensors(spec, inventories).values())


    def parameter_filter(self, spec, component, inventories):
        # the new rows live in EmbeddingWithNewTokens.new_rows (vramplan/step/modules.py)
        trained = component in self.trainable_tensors(spec, inventories)
        return lambda name: trained and name.startswith(component + ".") and name.endswith(".new_rows")

    def apply(self, spec, models, inventories):
        from vramplan.step.modules import EmbeddingWithNewTokens, replace_module, token_embedding_path

        trained = set(self.trainable_tensors(spec, inventories))
        for component, module in models.items():
            module.requires_grad_(False)
            if component in trained:
                path = token_embedding_path(module)
                embedding = EmbeddingWithNewTokens(module.get_submodule(path), spec.num_vectors)
                embedding.new_rows.requires_grad_(True)
                replace_module(module, path, embedding)


register_method(Method.TEXTUAL_INVERSION, TextualInversion)

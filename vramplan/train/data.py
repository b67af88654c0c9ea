"""The training images: found in a folder, captioned, center-cropped to the plan's size, tokenized.

* Images: every file with an image extension under the folder (subfolders too, sorted, hidden
  files skipped). Each is opened once up front; one that PIL cannot read is skipped with a
  warning and counted, and only a folder with no readable image at all is an error.
* Captions: the same-name `.txt` file beside an image, else `--instance-prompt`, else empty.
  Textual inversion needs its placeholder token in every prompt: `--instance-prompt` must hold
  it; captions get it in front ("<sks>, a red square"); with neither, "a photo of <sks>".
* Pixels: resized so the image covers the plan's width x height (bicubic), then center-cropped
  to it (`--center_crop` of the diffusers scripts), scaled to [-1, 1] in the VAE's dtype.
* Order: a fresh permutation each epoch from a generator seeded with (seed, epoch), so that the
  batch of any step follows from the step number alone and a resumed run sees what an
  uninterrupted one would. DreamBooth class images are drawn alongside, as diffusers'
  DreamBoothDataset pairs them (class image i % number of class images).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from vramplan.errors import UsageError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class Example:
    path: Path
    prompt: str


@dataclass
class ImageFolder:
    """The readable images of a folder and their prompts."""

    root: Path
    examples: list[Example]
    skipped: list[tuple[Path, str]] = field(default_factory=list)   # unreadable: (file, why)
    uncaptioned: int = 0

    def __len__(self) -> int:
        return len(self.examples)


def image_files(root: Path, flag: str) -> list[Path]:
    root = Path(root)
    if not root.exists():
        raise UsageError(f"{flag}: {str(root)!r} does not exist")
    if not root.is_dir():
        raise UsageError(f"{flag}: {str(root)!r} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise UsageError(f"{flag}: {str(root)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def _readable(path: Path) -> str | None:
    """None if PIL can decode the image, else why not."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except Exception as error:  # PIL raises many kinds (UnidentifiedImageError, OSError, ...)
        return f"{type(error).__name__}: {error}"
    return None


def scan_folder(root: Path, flag: str, instance_prompt: str | None = None,
                fixed_prompt: str | None = None) -> ImageFolder:
    """Find the images; `fixed_prompt` (class images) overrides captions."""
    examples, skipped, uncaptioned = [], [], 0
    for path in image_files(root, flag):
        why = _readable(path)
        if why is not None:
            skipped.append((path, why))
            continue
        if fixed_prompt is not None:
            prompt = fixed_prompt
        else:
            caption = path.with_suffix(".txt")
            if caption.is_file():
                prompt = caption.read_text(errors="replace").strip()
            elif instance_prompt is not None:
                prompt = instance_prompt
            else:
                prompt = ""
                uncaptioned += 1
        examples.append(Example(path, prompt))
    if not examples:
        raise UsageError(f"{flag}: none of the {len(skipped)} image file(s) in {str(root)!r} could be "
                         f"read (first: {skipped[0][0].name}: {skipped[0][1]})")
    return ImageFolder(Path(root), examples, skipped, uncaptioned)


def with_placeholder(prompt: str, token: str, instance_prompt: str | None) -> str:
    """Textual inversion's prompt for one image (see the module docstring)."""
    if instance_prompt is not None:
        return instance_prompt
    if not prompt:
        return f"a photo of {token}"
    return prompt if token in prompt else f"{token}, {prompt}"


def load_pixels(path: Path, width: int, height: int):
    """(3, height, width) float32 in [-1, 1]: resized to cover, then center-cropped."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = max(width / image.width, height / image.height)
        size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        image = image.resize(size, Image.BICUBIC)
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
        image = image.crop((left, top, left + width, top + height))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=generator).tolist()


class Sampler:
    """Which examples make up micro-batch m (0-based), from m alone."""

    def __init__(self, count: int, batch_size: int, seed: int):
        self.count, self.batch_size, self.seed = count, batch_size, seed
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.count, self.seed, epoch)}
        return self._orders[epoch]

    def indices(self, micro_step: int) -> list[int]:
        out = []
        for k in range(self.batch_size):
            position = micro_step * self.batch_size + k
            out.append(self._order(position // self.count)[position % self.count])
        return out


# -- tokenizers ------------------------------------------------------------------------------------

def tokenizer_folder(encoder: str) -> str:
    """A pipeline's tokenizer for each text encoder: text_encoder -> tokenizer, _2 -> tokenizer_2."""
    return "tokenizer" + encoder[len("text_encoder"):]


def load_tokenizers(model_path: Path, model) -> dict:
    from transformers import AutoTokenizer

    out = {}
    for te in model.text_encoders:
        folder = Path(model_path) / tokenizer_folder(te.name)
        if not folder.is_dir():
            raise UsageError(f"--model: {str(model_path)!r} has no {folder.name}/ for {te.name}")
        out[te.name] = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return out


@dataclass
class Placeholder:
    """Textual inversion's new tokens in one tokenizer, and where their embedding rows sit."""

    tokens: list[str]
    first_id: int          # the tokenizer's id of tokens[0]; the rest follow
    vocab: int             # the embedding's old row count: EmbeddingWithNewTokens maps id >= vocab

    def remap(self, ids):
        """Tokenizer ids -> embedding ids (new tokens after the old rows, whatever the gap)."""
        new = ids >= self.first_id
        return ids.masked_fill(new, 0) + new.long() * (ids - self.first_id + self.vocab)


def placeholder_tokens(token: str, count: int) -> list[str]:
    """diffusers' multi-vector naming: "<sks>", "<sks>_1", ... (load_textual_inversion's too)."""
    return [token] + [f"{token}_{i}" for i in range(1, count)]


def add_placeholder(tokenizer, token: str, count: int, vocab: int) -> Placeholder:
    tokens = placeholder_tokens(token, count)
    added = tokenizer.add_tokens(tokens)
    if added != count:
        raise UsageError(f"--placeholder-token {token!r} (or one of {', '.join(tokens)}) is already in the "
                         f"tokenizer's vocabulary: choose a new token, e.g. '<my-thing>'")
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if ids != list(range(ids[0], ids[0] + count)):
        raise UsageError(f"the tokenizer gave the new tokens non-consecutive ids {ids}")
    return Placeholder(tokens, ids[0], vocab)


def expand_placeholder(prompt: str, placeholder: Placeholder) -> str:
    """One token stands for all the vectors in prompts (diffusers' `maybe_convert_prompt`)."""
    if len(placeholder.tokens) == 1:
        return prompt
    return prompt.replace(placeholder.tokens[0], " ".join(placeholder.tokens))


def tokenize(tokenizers: dict, lengths: dict, prompts: list[str], placeholders: dict):
    """{encoder: (len(prompts), length) int64 ids}, padded and truncated as the scripts do."""
    out = {}
    for name, tokenizer in tokenizers.items():
        placeholder = placeholders.get(name)
        texts = [expand_placeholder(p, placeholder) if placeholder else p for p in prompts]
        ids = tokenizer(texts, padding="max_length", truncation=True, max_length=lengths[name],
                        return_tensors="pt").input_ids
        if placeholder is not None:
            ids = placeholder.remap(ids)
        out[name] = ids
    return out

"""`--gpus`: how many cards of which kind, "8xh100", "2x24GB", "4 x rtx4090", "h100" (one).

One card type per plan: the per-GPU accounting assumes every rank holds the same shards and runs
the same batch, so "2xh100,a100" is refused rather than planned for its weakest card. The count is
the number of processes `accelerate launch` starts on one machine (one node).
"""

from __future__ import annotations

import re

from vramplan.errors import UsageError
from vramplan.gpus import Gpu, resolve_gpu

_ITEM = re.compile(r"^\s*(?:(\d+)\s*[x×*]\s*)?(\S.*?)\s*$", re.IGNORECASE)


def parse_gpus(text) -> tuple[Gpu, int]:
    """"8xh100" -> (the H100 entry, 8). Repeats of one card add up ("2xh100,2xh100" is 4)."""
    raw = str(text).strip()
    if not raw:
        raise UsageError("--gpus: give a count and a card, e.g. 8xh100 or 2x24GB")
    cards: dict[str, tuple[Gpu, int]] = {}
    for item in raw.split(","):
        match = _ITEM.match(item)
        if match is None or not match.group(2):
            raise UsageError(f"--gpus: cannot read {item.strip()!r} (write COUNTxCARD, e.g. 8xh100 or 2x24GB)")
        count = int(match.group(1)) if match.group(1) is not None else 1
        if count < 1:
            raise UsageError(f"--gpus: {item.strip()!r} asks for {count} GPUs (at least 1)")
        try:
            gpu = resolve_gpu(match.group(2))
        except UsageError as error:
            raise UsageError(f"--gpus: {error}") from None
        previous = cards.get(gpu.key)
        cards[gpu.key] = (gpu, count + (previous[1] if previous else 0))
    if len(cards) > 1:
        raise UsageError(f"--gpus: mixed card types ({', '.join(cards)}): a plan shards the same way on "
                         f"every GPU, so give one type (e.g. 4xh100)")
    return next(iter(cards.values()))

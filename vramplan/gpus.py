"""The GPU catalog: each card's real capacity, and parsing of `--gpu`.

`memory_bytes` is the total that NVML (nvidia-smi's "Total") reports for the card, the figure that
"device used" is compared against. nvidia-smi prints MiB; the source of every figure is the
`nvidia-smi` output quoted next to it. A bare size ("16GB", "16GiB", "24G") makes an ad-hoc card
of exactly that many bytes, GB being 10^9 and GiB 2^30 as written.
"""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.errors import UsageError
from vramplan.units import MIB, parse_bytes, unit_of


@dataclass(frozen=True)
class Gpu:
    key: str
    name: str
    memory_bytes: int
    bf16: bool  # bfloat16 tensor cores: compute capability 8.0 (Ampere) or newer
    compute_capability: str | None = None
    unit: str = "GiB"  # how the user wrote the size; output follows it
    source: str = ""

    def to_json(self) -> dict:
        return {"key": self.key, "name": self.name, "memory_bytes": self.memory_bytes,
                "bf16": self.bf16, "compute_capability": self.compute_capability}


def _card(key, name, mib, cc, source):
    major = int(cc.split(".")[0])
    return Gpu(key=key, name=name, memory_bytes=mib * MIB, bf16=major >= 8,
               compute_capability=cc, source=source)


# (key, marketing name, nvidia-smi total MiB, compute capability, where the MiB figure was read)
CATALOG: dict[str, Gpu] = {g.key: g for g in [
    _card("t4", "NVIDIA Tesla T4 16 GB", 15360, "7.5", "nvidia-smi on Google Colab: 15360MiB"),
    _card("p100", "NVIDIA Tesla P100 16 GB", 16384, "6.0", "nvidia-smi on Kaggle: 16384MiB"),
    _card("v100", "NVIDIA Tesla V100 SXM2 16 GB", 16160, "7.0", "nvidia-smi, V100-SXM2-16GB: 16160MiB"),
    _card("rtx2080ti", "NVIDIA GeForce RTX 2080 Ti 11 GB", 11264, "7.5", "nvidia-smi: 11264MiB"),
    _card("rtx3060", "NVIDIA GeForce RTX 3060 12 GB", 12288, "8.6", "nvidia-smi: 12288MiB"),
    _card("rtx3080", "NVIDIA GeForce RTX 3080 10 GB", 10240, "8.6", "nvidia-smi: 10240MiB"),
    _card("rtx3090", "NVIDIA GeForce RTX 3090 24 GB", 24576, "8.6", "nvidia-smi: 24576MiB"),
    _card("rtx4060ti", "NVIDIA GeForce RTX 4060 Ti 16 GB", 16380, "8.9", "nvidia-smi: 16380MiB"),
    _card("rtx4070", "NVIDIA GeForce RTX 4070 12 GB", 12282, "8.9", "nvidia-smi: 12282MiB"),
    _card("rtx4080", "NVIDIA GeForce RTX 4080 16 GB", 16376, "8.9", "nvidia-smi: 16376MiB"),
    _card("rtx4090", "NVIDIA GeForce RTX 4090 24 GB", 24564, "8.9", "nvidia-smi: 24564MiB"),
    _card("a10g", "NVIDIA A10G 24 GB (AWS g5)", 23028, "8.6", "nvidia-smi on AWS g5: 23028MiB"),
    _card("l4", "NVIDIA L4 24 GB", 23034, "8.9", "nvidia-smi on Google Colab: 23034MiB"),
    _card("a6000", "NVIDIA RTX A6000 48 GB", 49140, "8.6", "nvidia-smi: 49140MiB"),
    _card("l40s", "NVIDIA L40S 48 GB", 46068, "8.9", "nvidia-smi: 46068MiB"),
    _card("a100-40g", "NVIDIA A100 SXM4 40 GB", 40960, "8.0", "nvidia-smi, A100-SXM4-40GB: 40960MiB"),
    _card("a100-80g", "NVIDIA A100 SXM4 80 GB", 81920, "8.0", "nvidia-smi, A100-SXM4-80GB: 81920MiB"),
    _card("h100", "NVIDIA H100 80 GB HBM3", 81559, "9.0", "nvidia-smi, H100 80GB HBM3: 81559MiB"),
    _card("h200", "NVIDIA H200 141 GB HBM3e", 143771, "9.0", "nvidia-smi, H200: 143771MiB"),
]}

ALIASES = {"a100": "a100-80g", "a100-80gb": "a100-80g", "a100-40gb": "a100-40g", "h100-80g": "h100",
           "4090": "rtx4090", "3090": "rtx3090", "3060": "rtx3060", "tesla-t4": "t4"}


def resolve_gpu(text: str) -> Gpu:
    """A catalog key ("rtx4090", "a100-80g") or a size ("16GB", "16GiB", "24G")."""
    key = str(text).strip().lower().replace("_", "-").replace(" ", "")
    key = ALIASES.get(key, key)
    if key in CATALOG:
        return CATALOG[key]
    if key and key[0].isdigit():
        try:
            nbytes = parse_bytes(text)
        except UsageError:
            pass
        else:
            unit = unit_of(text)
            label = str(text).strip().upper().replace("IB", "iB")
            return Gpu(key=str(text).strip(), name=f"{label} card", memory_bytes=nbytes,
                       bf16=True, unit=unit, source="as given")
    raise UsageError(f"unknown GPU {text!r}: give a size (16GB, 16GiB, 24G) or one of "
                     f"{', '.join(CATALOG)} (`vramplan gpus` lists them)")

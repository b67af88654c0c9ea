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
#
# The MiB figures are what current drivers (R525 and later, NVML v2 memory info) print as
# "Total". Older drivers printed a smaller total (apparently net of the driver-reserved part;
# not verified), e.g. A100-SXM4-40GB "40536MiB" on driver 470.82.01 (github.com/nanopool/phoenix-miner#17)
# and GeForce RTX 3090 "24268MiB" on driver 455.23.04 (github.com/pytorch/pytorch#54564).
# nvidia-smi -q now prints that part separately as "Reserved" (H100 80GB HBM3: Total 81559 MiB,
# Reserved 479 MiB; H200: 143771 / 614; L40S: 46068 / 609; RTX 4080 SUPER: 16376 / 434; see
# utkuozdemir/nvidia_gpu_exporter internal/captures/*.txt). torch's
# get_device_properties().total_memory (cudaDeviceProp.totalGlobalMem) is smaller again; where
# a real figure was found it is noted in a comment. Compute capabilities: nvidia-smi
# --query-gpu=compute_cap where quoted, else NVIDIA's per-architecture mapping (7.0 Volta V100,
# 7.5 Turing, 8.0 A100, 8.6 Ampere RTX 30xx/GA10x, 8.9 Ada RTX 40xx/L4/L40, 9.0 Hopper).
CATALOG: dict[str, Gpu] = {g.key: g for g in [
    # torch side: deviceQuery on Colab T4 (CUDA 12.4 driver) "Global Memory 15095 MBytes"
    # (github.com/sylvia-ymlin/cuda-kernels-from-scratch README.md, also "CUDA Capability 7.5").
    _card("t4", "NVIDIA Tesla T4 16 GB", 15360, "7.5",
          "nvidia-smi 'Tesla T4 ... 0MiB / 15360MiB'; totals list 'T4: 15360MiB' in "
          "github.com/modal-labs/modal-client/pull/2797"),
    _card("p100", "NVIDIA Tesla P100 16 GB", 16384, "6.0",
          "nvidia-smi 'Tesla P100-PCIE-16GB ... 3MiB / 16384MiB', driver 560.35.03 on a Kaggle-type "
          "4-vCPU host (public GitHub file, search-index id 44428131815; same total in 9 other "
          "outputs); sm_60: github.com/Kaggle/kaggle-cli/issues/1151"),
    # Was 16160 (an old-driver figure, no source); driver 570 prints 16384.
    _card("v100", "NVIDIA Tesla V100 SXM2 16 GB", 16384, "7.0",
          "nvidia-smi 'Tesla V100-SXM2-16GB ... 5MiB /  16384MiB', driver 570.211.01: "
          "github.com/1CatAI/1Cat-vLLM/issues/85"),
    _card("rtx2080ti", "NVIDIA GeForce RTX 2080 Ti 11 GB", 11264, "7.5",
          "nvidia-smi 'NVIDIA GeForce RTX 2080 Ti ... 0MiB / 11264MiB' (R535+ layout; public "
          "GitHub files, search-index ids 36370931787, 56868758348); cc 7.5: TF log "
          "'major: 7 minor: 5' in github.com/hammerlab/flowdec/issues/32"),
    _card("rtx3060", "NVIDIA GeForce RTX 3060 12 GB", 12288, "8.6",
          "nvidia-smi 'NVIDIA GeForce RTX 3060 ... 1MiB /  12288MiB', driver 580.95.05: "
          "github.com/geerlingguy/raspberry-pi-pcie-devices/issues/790"),
    # torch side: OOM message '9.78 GiB total capacity' on an RTX 3080
    # (github.com/zai-org/CogVideo/issues/34).
    _card("rtx3080", "NVIDIA GeForce RTX 3080 10 GB", 10240, "8.6",
          "nvidia-smi 'NVIDIA GeForce RTX 3080 ... 1MiB /  10240MiB' (R535+ layout; public GitHub "
          "files, search-index ids 52595158083, 45391154395)"),
    _card("rtx3090", "NVIDIA GeForce RTX 3090 24 GB", 24576, "8.6",
          "nvidia-smi 'NVIDIA GeForce RTX 3090 ... / 24576MiB', driver 595.84: "
          "github.com/noonghunna/club-3090/issues/1129; GA102 = SM 8.6: club-3090 pull 950"),
    _card("rtx4060ti", "NVIDIA GeForce RTX 4060 Ti 16 GB", 16380, "8.9",
          "nvidia-smi 'NVIDIA GeForce RTX 4060 Ti ... 2MiB /  16380MiB' (public GitHub files, "
          "search-index ids 48155927377, 39032192772); 'Total VRAM 16380 MB' for a 4060 Ti 16G "
          "in github.com/lllyasviel/Fooocus/issues/1604"),
    _card("rtx4070", "NVIDIA GeForce RTX 4070 12 GB", 12282, "8.9",
          "nvidia-smi 'NVIDIA GeForce RTX 4070 ... 430MiB /  12282MiB', driver 550.40.07: "
          "github.com/Frogging-Family/nvidia-all/pull/212"),
    _card("rtx4080", "NVIDIA GeForce RTX 4080 16 GB", 16376, "8.9",
          "nvidia-smi 'NVIDIA GeForce RTX 4080 ... 1MiB / 16376MiB' (public GitHub files, "
          "search-index ids 54158648126, 54833118447; one output shows 16384MiB); 4080 SUPER "
          "capture: Total 16376 MiB, compute_cap 8.9 (utkuozdemir/nvidia_gpu_exporter)"),
    _card("rtx4090", "NVIDIA GeForce RTX 4090 24 GB", 24564, "8.9",
          "nvidia-smi 'NVIDIA GeForce RTX 4090 ... 507MiB /  24564MiB', driver 550.163.01: "
          "github.com/RLinf/RLinf/issues/255"),
    _card("a10g", "NVIDIA A10G 24 GB (AWS g5)", 23028, "8.6",
          "nvidia-smi 'NVIDIA A10G ... 8722MiB / 23028MiB', driver 535.247.01: "
          "github.com/NVIDIA/DCGM/issues/232"),
    _card("l4", "NVIDIA L4 24 GB", 23034, "8.9",
          "totals list 'L4: 23034MiB' in github.com/modal-labs/modal-client/pull/2797; "
          "query sample 'NVIDIA L4, 8.9, 570.172.08, 23034' in a public test file"),
    _card("a6000", "NVIDIA RTX A6000 48 GB", 49140, "8.6",
          "'NVIDIA RTX A6000 | 49140 MiB | driver 580.173.02': "
          "github.com/noonghunna/club-3090/issues/1047; GA102 / SM 8.6: club-3090 pull 950"),
    _card("l40s", "NVIDIA L40S 48 GB", 46068, "8.9",
          "nvidia-smi 'L40S ... 0MiB /  46068MiB', Reserved 609 MiB, compute_cap 8.9, driver 595.80: "
          "utkuozdemir/nvidia_gpu_exporter internal/captures/linux-x86_64__nvidia-l40s__595.80.txt"),
    # torch side: deviceQuery 'NVIDIA A100-SXM4-40GB ... 40339 MBytes (42298834944 bytes)',
    # 'CUDA Capability 8.0' (github.com/bottlerocket-os/bottlerocket/pull/3873).
    _card("a100-40g", "NVIDIA A100 SXM4 40 GB", 40960, "8.0",
          "nvidia-smi 'NVIDIA A100-SXM4-40GB ... 598MiB /  40960MiB', driver 580.126.09: "
          "github.com/bottlerocket-os/bottlerocket-core-kit/pull/834"),
    _card("a100-80g", "NVIDIA A100 SXM4 80 GB", 81920, "8.0",
          "nvidia-smi 'NVIDIA A100-SXM4-80GB ... 87MiB / 81920MiB', driver 545.23.08: "
          "github.com/NVIDIA/mig-parted/issues/31"),
    _card("h100", "NVIDIA H100 80 GB HBM3", 81559, "9.0",
          "nvidia-smi 'NVIDIA H100 80GB HBM3 ... 0MiB /  81559MiB', Reserved 479 MiB, compute_cap "
          "9.0, driver 590.48.01: utkuozdemir/nvidia_gpu_exporter internal/captures/"
          "linux-x86_64__nvidia-h100-80gb-hbm3__590.48.01.txt"),
    _card("h200", "NVIDIA H200 141 GB HBM3e", 143771, "9.0",
          "nvidia-smi 'NVIDIA H200 ... 0MiB / 143771MiB', Reserved 614 MiB, compute_cap 9.0, "
          "driver 590.48.01: utkuozdemir/nvidia_gpu_exporter internal/captures/"
          "linux-x86_64__nvidia-h200__590.48.01.txt"),
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

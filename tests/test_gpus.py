"""The GPU catalog and `--gpu` parsing: catalog keys, aliases, sizes, and bad input."""

import pytest

from vramplan.errors import UsageError
from vramplan.gpus import ALIASES, CATALOG, Gpu, resolve_gpu

MIB = 2**20


@pytest.mark.parametrize("key, mib, cc, bf16", [
    ("t4", 15360, "7.5", False), ("v100", 16384, "7.0", False), ("rtx3060", 12288, "8.6", True),
    ("rtx4090", 24564, "8.9", True), ("l4", 23034, "8.9", True), ("a100-40g", 40960, "8.0", True),
    ("a100-80g", 81920, "8.0", True), ("h100", 81559, "9.0", True),
])
def test_catalog_cards(key, mib, cc, bf16):
    gpu = resolve_gpu(key)
    assert gpu is CATALOG[key]
    assert gpu.memory_bytes == mib * MIB
    assert gpu.compute_capability == cc and gpu.bf16 is bf16


def test_every_card_is_consistent():
    for key, gpu in CATALOG.items():
        assert gpu.key == key and resolve_gpu(key) is gpu
        assert gpu.memory_bytes % MIB == 0 and gpu.memory_bytes > 8 * 2**30
        assert gpu.bf16 is (int(gpu.compute_capability.split(".")[0]) >= 8)
        assert gpu.source


@pytest.mark.parametrize("text, key", [("4090", "rtx4090"), ("a100", "a100-80g"), ("A100-40GB", "a100-40g"),
                                       ("RTX4090", "rtx4090"), ("rtx 4090", "rtx4090"), (" T4 ", "t4"),
                                       ("tesla_t4", "t4"), ("h100-80g", "h100")])
def test_aliases_and_spelling(text, key):
    assert resolve_gpu(text) is CATALOG[key]


def test_aliases_point_into_the_catalog():
    assert set(ALIASES.values()) <= set(CATALOG)


@pytest.mark.parametrize("text, nbytes, unit", [("16GB", 16 * 10**9, "GB"), ("16GiB", 16 * 2**30, "GiB"),
                                                ("24G", 24 * 10**9, "GB"), ("12.5GB", 125 * 10**8, "GB")])
def test_sizes_make_ad_hoc_cards(text, nbytes, unit):
    gpu = resolve_gpu(text)
    assert isinstance(gpu, Gpu)
    assert gpu.memory_bytes == nbytes and gpu.unit == unit
    assert gpu.key == text and gpu.compute_capability is None


def test_ad_hoc_card_names():
    assert resolve_gpu("16GB").name == "16GB card"
    assert resolve_gpu("16GiB").name == "16GiB card"


@pytest.mark.parametrize("text", ["banana", "", "rtx9090", "16XB", "0GB", "-16GB", "GB"])
def test_bad_gpus_are_usage_errors_naming_the_choices(text):
    with pytest.raises(UsageError) as info:
        resolve_gpu(text)
    message = str(info.value)
    assert "16GB" in message and "rtx4090" in message and "\n" not in message


def test_to_json():
    assert resolve_gpu("h100").to_json() == {"key": "h100", "name": "NVIDIA H100 80 GB HBM3",
                                             "memory_bytes": 81559 * MIB, "bf16": True,
                                             "compute_capability": "9.0"}

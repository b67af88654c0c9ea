"""Memory sizes as users write them: GB is 10^9, GiB 2^30, a bare G is GB."""

import pytest

from vramplan.errors import UsageError
from vramplan.units import GB, GIB, MIB, format_bytes, parse_bytes, round_up, to_unit, unit_of


@pytest.mark.parametrize("text, nbytes", [
    ("16GB", 16 * 10**9), ("16GiB", 16 * 2**30), ("24G", 24 * 10**9), ("16gb", 16 * 10**9),
    ("16 GB", 16 * 10**9), (" 16GiB ", 16 * 2**30), ("1.5GiB", 3 * 2**29), ("80g", 80 * 10**9),
    ("512", 512), ("512B", 512), ("8MiB", 8 * 2**20), ("8MB", 8 * 10**6), ("4k", 4000),
    ("4KiB", 4096), ("1TB", 10**12), ("1TiB", 2**40), ("0.5GB", 5 * 10**8),
])
def test_parse_bytes(text, nbytes):
    assert parse_bytes(text) == nbytes


def test_gb_and_gib_differ_as_written():
    assert parse_bytes("16GiB") - parse_bytes("16GB") == 16 * (2**30 - 10**9)


@pytest.mark.parametrize("text", ["", "GB", "16XB", "sixteen GB", "-16GB", "16GB!", "1e9", "16 G B"])
def test_unreadable_sizes_say_how_to_write_one(text):
    with pytest.raises(UsageError, match="write e.g. 16GB, 16GiB or 24G"):
        parse_bytes(text)


@pytest.mark.parametrize("text", ["0", "0GB", "0.0GiB"])
def test_zero_is_refused(text):
    with pytest.raises(UsageError, match="must be positive"):
        parse_bytes(text)


def test_a_size_that_rounds_to_zero_bytes_is_refused():
    with pytest.raises(UsageError):
        parse_bytes("0.4")


def test_usage_error_is_a_value_error():
    assert issubclass(UsageError, ValueError)


@pytest.mark.parametrize("text, unit", [("16GB", "GB"), ("24G", "GB"), ("16GiB", "GiB"),
                                        ("512MiB", "GiB"), ("rtx4090", "GB")])
def test_unit_of(text, unit):
    assert unit_of(text) == unit


def test_format_and_convert():
    assert to_unit(GIB) == 1.0 and to_unit(GB, "GB") == 1.0 and to_unit(MIB, "MiB") == 1.0
    assert format_bytes(3 * GIB // 2) == "1.50 GiB"
    assert format_bytes(16 * GB, "GB", 1) == "16.0 GB"
    assert format_bytes(-GIB) == "-1.00 GiB"


@pytest.mark.parametrize("n, multiple, rounded", [(0, 512, 0), (1, 512, 512), (512, 512, 512),
                                                  (513, 512, 1024)])
def test_round_up(n, multiple, rounded):
    assert round_up(n, multiple) == rounded

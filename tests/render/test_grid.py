"""The grid layout: exact square counts for sizes one can check by hand, and the terminal view."""

from rich.console import Console

import pytest

from vramplan.footprint import Category, ComponentParams, Footprint
from vramplan.estimate.result import Estimate
from vramplan.gpus import resolve_gpu
from vramplan.render.grid import GridView, grid_cells, slices, square_bytes_for
from vramplan.spec import build_spec
from vramplan.units import GB, GIB

W, A, T = Category.FROZEN_WEIGHTS, Category.ACTIVATIONS, Category.TEMPORARIES


def make_estimate(categories, **options):
    options.setdefault("gpu", "16GB")
    used = sum(categories.values())
    footprint = Footprint(categories=categories, peak_allocated_bytes=used,
                          peak_reserved_bytes=used, device_used_bytes=used)
    return Estimate(spec=build_spec(options), parameters={"unet": ComponentParams(10, 1)},
                    footprint=footprint)


def test_three_and_a_half_gb_on_a_16_gb_card():
    cells = grid_cells({A: 3_500_000_000}, 16 * GB, GB)
    assert len(cells) == 16
    assert [c.fill for c in cells[:4]] == [1.0, 1.0, 1.0, 0.5]
    assert all(c.category is A for c in cells[:4])
    assert sum(c.is_free for c in cells) == 12
    assert cells[3].free_bytes == GB // 2 and not cells[3].is_free
    assert not any(c.is_over for c in cells)


def test_parts_give_back_every_byte():
    categories = {W: 2_130_000_001, Category.GRADIENTS: 12_750_000, A: 5_300_000_007,
                  Category.CUDA_CONTEXT: 500_000_000}
    cells = grid_cells(categories, 24 * GIB, GIB)
    for category, nbytes in categories.items():
        assert sum(n for c in cells for k, n in c.parts if k is category) == nbytes
    assert sum(c.used_bytes for c in cells) + sum(c.free_bytes for c in cells) == 24 * GIB


def test_layout_follows_the_category_order_not_the_dict_order():
    cells = grid_cells({A: GB, W: GB}, None, GB)
    assert [c.category for c in cells] == [W, A]


def test_a_shared_square_takes_the_category_that_fills_most_of_it():
    cells = grid_cells({W: 300_000_000, A: 700_000_000, T: 1_500_000_000}, None, GB)
    assert cells[0].parts == ((W, 300_000_000), (A, 700_000_000))
    assert cells[0].category is A
    assert cells[1].category is T and cells[2].fill == 0.5
    tie = grid_cells({W: GB // 2, A: GB // 2}, None, GB)
    assert tie[0].category is W           # ties go to the earlier category


def test_overflow_squares_are_marked():
    cells = grid_cells({W: 10 * GB, A: 8_500_000_000}, 16 * GB, GB)
    assert len(cells) == 19
    assert [c.index for c in cells if c.is_over] == [16, 17, 18]
    assert cells[18].fill == 0.5
    assert sum(c.over_bytes for c in cells) == 2_500_000_000
    assert not any(c.is_free for c in cells)


def test_capacity_inside_a_square():
    # A 16 GiB card in 1 GB squares: 17.18 GB, the 18th square holds 0.18 GB of card.
    cells = grid_cells({A: 17_500_000_000}, 16 * GIB, GB)
    assert len(cells) == 18
    assert cells[17].card_bytes == 16 * GIB - 17 * GB
    assert cells[17].over_bytes == 17_500_000_000 - 16 * GIB
    assert [c.index for c in cells if c.is_over] == [17]


def test_no_gpu_means_no_free_and_no_over():
    cells = grid_cells({A: 2_500_000_000}, None, GB)
    assert len(cells) == 3
    assert not any(c.is_free or c.is_over for c in cells)


def test_square_size_follows_the_unit_the_user_wrote():
    assert square_bytes_for(resolve_gpu("16GB")) == GB
    assert square_bytes_for(resolve_gpu("16GiB")) == GIB
    assert square_bytes_for(resolve_gpu("rtx4090")) == GIB     # nvidia-smi counts MiB
    assert square_bytes_for(None) == GIB
    assert len(grid_cells({A: GB}, 16 * GIB, GIB)) == 16
    assert len(grid_cells({A: GB}, 16 * GIB, GB)) == 18


def test_slices_of_a_half_square():
    cell = grid_cells({A: 3_500_000_000}, 16 * GB, GB)[3]
    quarters = slices(cell, 4)
    assert [q.category for q in quarters] == [A, A, None, None]
    assert [q.free for q in quarters] == [False, False, True, True]


def test_negative_sizes_are_refused():
    with pytest.raises(ValueError):
        grid_cells({A: -1}, None, GB)


def _text(renderable, colour: bool, width: int = 100) -> str:
    console = Console(record=True, width=width, force_terminal=colour,
                      color_system="truecolor" if colour else None)
    console.print(renderable)
    return console.export_text()


def test_grid_view_draws_squares_and_a_legend():
    estimate = make_estimate({W: 2 * GB, A: 1_500_000_000})
    plain = _text(GridView.from_estimate(estimate), colour=False)
    # 2 squares of weights, 1.5 of activations (the half drawn as one character), then free.
    assert " 0 WW WW AA A. .. .. .. .." in plain
    assert " 8 .. .. .. .. .. .. .. .." in plain
    for label in (W.label, A.label, "free", "1 square = 1 GB"):
        assert label in plain
    assert "57.1%" in plain and "12.50" in plain     # share of used, free GB
    coloured = _text(GridView.from_estimate(estimate), colour=True)
    assert "██ ██ ██ █░ ░░" in coloured


def test_grid_view_marks_overflow():
    estimate = make_estimate({W: 10 * GB, A: 8_500_000_000})
    plain = _text(GridView.from_estimate(estimate), colour=False)
    assert "16 !! !! !" in plain
    assert "over capacity" in plain and "2.50" in plain
    coloured = _text(GridView.from_estimate(estimate), colour=True)
    assert "▄▄ ▄▄ ▄" in coloured


def test_grid_view_puts_the_legend_under_a_narrow_grid():
    estimate = make_estimate({W: 2 * GB})
    lines = _text(GridView.from_estimate(estimate), colour=False, width=50).splitlines()
    assert lines[1].startswith(" 0 WW WW ..")
    assert any(line.startswith("WW") and W.label in line for line in lines)

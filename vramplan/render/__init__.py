"""Drawing answers, never computing them: the card as a grid of squares and the tables around it.

- `grid`: `grid_cells` (pure layout of categories into squares) and `GridView` (rich renderable)
- `tables`: the spec panel, category table, totals, verdict, notes; `render_estimate`
- `compare`: `CompareView`, several grids side by side and one table of numbers
- `chart`: `write_grid_chart`, the same grid as PNG or SVG (matplotlib, imported when called)
- `frames`: `estimates_frame` / `footprints_frame` (pandas, imported when called), `write_csv`

Nothing here imports torch; rich is the only import paid when `vramplan.render` is imported.
"""

from vramplan.render.chart import write_grid_chart
from vramplan.render.compare import CompareView
from vramplan.render.frames import estimates_frame, footprints_frame, write_csv
from vramplan.render.grid import Cell, GridView, grid_cells, square_bytes_for
from vramplan.render.tables import estimate_view, render_estimate

__all__ = [
    "Cell", "CompareView", "GridView", "estimate_view", "estimates_frame", "footprints_frame",
    "grid_cells", "render_estimate", "square_bytes_for", "write_csv", "write_grid_chart",
]

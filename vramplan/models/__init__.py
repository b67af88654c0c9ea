"""Known models and their inventories (module shapes, parameter counts), shipped as data."""

"""The analytic tier: count bytes from the spec and the shipped inventories, without torch."""

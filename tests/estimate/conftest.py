"""Shared helpers for the analytic tier's tests: estimates cached per spec, and the shipped
inventories read straight from their JSON (so that expectations do not go through the code
under test).
"""

import json
from functools import lru_cache
from types import SimpleNamespace
from math import prod
from pathlib import Path

import pytest

from vramplan.estimate import estimate
from vramplan.footprint import Category
from vramplan.spec import build_spec

DATA = Path(__file__).resolve().parents[2] / "vramplan" / "models" / "data"


_ESTIMATES: dict = {}


def cached_estimate(**options):
    """`estimate(build_spec(options))`, computed once per distinct resolved spec for the session
    (`{}` and `{"method": "lora", "rank": 16}` share one)."""
    spec = build_spec(options)
    key = json.dumps(spec.to_json(), sort_keys=True)
    if key not in _ESTIMATES:
        _ESTIMATES[key] = estimate(spec)
    return _ESTIMATES[key]


@lru_cache(maxsize=None)
def inventory_json(model: str, component: str) -> dict:
    return json.loads((DATA / model / f"{component}.json").read_text())


def param_numels(model: str, component: str) -> list[int]:
    return [prod(shape) for _, shape in inventory_json(model, component)["params"]]


def blocks(nbytes: int) -> int:
    """The CUDA caching allocator's 512-byte rounding of one allocation."""
    return -(-nbytes // 512) * 512


def per_tensor(numels, itemsize: int) -> int:
    """Bytes of one allocation per tensor of `itemsize`-byte elements, each rounded to 512."""
    return sum(blocks(n * itemsize) for n in numels)


def max_over_phases(est, category: Category) -> int:
    return max(p.categories.get(category, 0) for p in est.footprint.phases)


def adapted_graphs(spec, monkeypatch) -> list:
    """(component, graph variant) of each adapted graph the step of `spec` replays."""
    import vramplan.estimate.step as step
    from vramplan.models.inventory import load_model_inventories

    seen = []
    real = step._adapted_graph

    def spy(spec, inventories, method, component, variant, env):
        seen.append((component, variant))
        return real(spec, inventories, method, component, variant, env)

    with monkeypatch.context() as m:
        m.setattr(step, "_adapted_graph", spy)
        m.setattr(step, "REUSE", False)
        step.build_timeline(spec, load_model_inventories(spec.model))
    return seen


@pytest.fixture(scope="session")
def h():
    """The helpers above, for tests (conftest modules are not for importing)."""
    return SimpleNamespace(estimate=cached_estimate, inventory=inventory_json, numels=param_numels,
                           blocks=blocks, per_tensor=per_tensor, max_over_phases=max_over_phases,
                           adapted_graphs=adapted_graphs)

#!/usr/bin/env python
"""Build the catalog's module inventories on the meta device and write them as shipped data.

    python scripts/build_inventory.py                      # every model, every component
    python scripts/build_inventory.py --model sd15 sdxl    # some models
    python scripts/build_inventory.py --check              # rebuild in memory, exit 1 on a diff

Each component is built from its real config (`vramplan/models/configs/<model>/<component>.json`)
with `with torch.device("meta")` -- no weights, exact shapes -- and its inventory written to
`vramplan/models/data/<model>/<component>.json`, which `vramplan.models.inventory` loads without
torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vramplan.models.catalog import MODELS  # noqa: E402
from vramplan.models.inventory import inventory_path, load_config  # noqa: E402
from vramplan.models.local import build_component_inventory, build_module, dump_inventory  # noqa: E402

__all__ = ["build_inventory", "build_component_inventory", "main"]

# Left out of --check: rebuilding with a newer library is not a difference in the model.
_VOLATILE = ("built_with",)


def build_inventory(model_key: str, component_name: str) -> dict:
    """The inventory of one catalog component, built on the meta device from its shipped config."""
    model = MODELS[model_key]
    component = model.component(component_name)
    config = load_config(model_key, component_name)
    module = build_module(component.cls, component.library, config)
    return build_component_inventory(module, {
        "model": model_key, "component": component_name, "cls": component.cls,
        "library": component.library, "config": config})


def _differences(old: dict, new: dict) -> list[str]:
    """A short summary of how two inventories differ (empty when they match)."""
    out = []
    for key in sorted(set(old) | set(new)):
        if key in _VOLATILE or old.get(key) == new.get(key):
            continue
        a, b = old.get(key), new.get(key)
        if key == "total_params":
            out.append(f"total_params {a:,} -> {b:,}")
        elif key in ("params", "modules", "buffers") and isinstance(a, list) and isinstance(b, list):
            def ident(row):
                return json.dumps(row[0] if key != "modules" else row.get("name"))
            names_a = {ident(r): r for r in a}
            names_b = {ident(r): r for r in b}
            gone = [n for n in names_a if n not in names_b]
            added = [n for n in names_b if n not in names_a]
            changed = [n for n in names_a if n in names_b and names_a[n] != names_b[n]]
            parts = [f"{len(gone)} removed", f"{len(added)} added", f"{len(changed)} changed"]
            first = (gone or added or changed or ["(order)"])[0]
            out.append(f"{key}: {', '.join(parts)} (first: {first})")
        else:
            out.append(f"{key} differs")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", choices=sorted(MODELS), metavar="KEY",
                        help=f"models to build (default: all of {', '.join(MODELS)})")
    parser.add_argument("--check", action="store_true",
                        help="rebuild in memory and exit 1 if the shipped data differs")
    args = parser.parse_args(argv)

    failed = 0
    for key in args.model or list(MODELS):
        for component in MODELS[key].components:
            start = time.perf_counter()
            data = build_inventory(key, component.name)
            seconds = time.perf_counter() - start
            path = inventory_path(key, component.name)
            label = f"{key}/{component.name}"
            if args.check:
                if not path.is_file():
                    print(f"MISSING {label}: {path} does not exist")
                    failed += 1
                    continue
                diffs = _differences(json.loads(path.read_text()), data)
                if diffs:
                    failed += 1
                    print(f"DIFFERS {label}: " + "; ".join(diffs))
                else:
                    print(f"ok      {label}: {data['total_params']:,} parameters ({seconds:.1f} s)")
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(dump_inventory(data))
                print(f"wrote   {label}: {data['total_params']:,} parameters, "
                      f"{len(data['modules'])} modules, {path.stat().st_size / 1e3:.0f} kB "
                      f"({seconds:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

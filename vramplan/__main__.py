from vramplan.cli import console

raise SystemExit(console())

"""Load a recorded op graph (see `vramplan/simulate/record.py`) and size it without torch.

Storage and shape sizes are stored as formulas over B (images per step), H and W (latent
height and width), printed by sympy from torch's symbolic shapes: integers, + - *, floor
division `//`, `Mod(a, b)`. We compile each formula once with Python after checking that it uses
nothing else, and evaluate them all for the user's sizes. The recording's guards (conditions the
shapes satisfied while tracing, e.g. `Eq(Mod(H, 8), 0)`) are checked too: a size outside them
would take another code path than the one recorded.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import marshal
import re
import sys
import types
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from vramplan.cache import cache_root, write_atomic
from vramplan.errors import UsageError
from vramplan.timeline import gc_paused

TRACE_ROOT = Path(__file__).resolve().parent.parent / "models" / "traces"

_FUNCS = {
    "Mod": lambda a, b: a % b,
    "Eq": lambda a, b: a == b,
    "Ne": lambda a, b: a != b,
    "Max": max,
    "Min": min,
    "FloorDiv": lambda a, b: a // b,
    "CeilToInt": lambda a: -(-a // 1),
    "And": lambda *a: all(a),
    "Or": lambda *a: any(a),
}
_ALLOWED = (ast.Expression, ast.List, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Load, ast.Call,
            ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod, ast.USub, ast.Compare, ast.Lt,
            ast.LtE, ast.Gt, ast.GtE, ast.Eq, ast.NotEq, ast.Pow, ast.BoolOp, ast.And, ast.Or)


def compile_formula(text: str, names: tuple[str, ...]):
    tree = ast.parse(text, mode="eval")
    _check(tree, text, names)
    return compile(tree, "<formula>", "eval")


def _check(tree, text: str, names) -> None:
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED):
            raise ValueError(f"formula {text!r}: {type(node).__name__} not allowed")
        if isinstance(node, ast.Name) and node.id not in names and node.id not in _FUNCS:
            raise ValueError(f"formula {text!r}: unknown name {node.id}")
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in _FUNCS):
            raise ValueError(f"formula {text!r}: call not allowed")


@dataclass
class Graph:
    """A recorded graph with its formulas compiled; `evaluate(env)` sizes them all at once."""

    data: dict
    code: object          # one compiled expression producing the list of every formula's value

    @property
    def ops(self) -> list:
        return self.data["ops"]

    @property
    def tensors(self) -> list:
        return self.data["tensors"]

    @property
    def storages(self) -> list:
        return self.data["storages"]

    def opname(self, op) -> str:
        return self.data["opnames"][op[0]]

    def module(self, op) -> str:
        return self.data["modules"][op[1]]

    def evaluate(self, env: dict) -> list[int]:
        scope = dict(_FUNCS, **env)
        return [int(v) for v in eval(self.code, {"__builtins__": {}}, scope)]

    def failed_guards(self, env: dict) -> list[str]:
        scope = dict(_FUNCS, **env)
        bad = []
        for text in self.data.get("guards", []):
            try:
                ok = eval(compile_formula(text, tuple(env)), {"__builtins__": {}}, scope)
            except ValueError:
                continue
            if not ok:
                bad.append(text)
        return bad


def parse_graph(data: dict, names=("B", "H", "W", "R")) -> Graph:
    """Check every formula, then compile them as one list expression (one compile is much
    faster than thousands)."""
    source = "[" + ",".join(f"({t})" for t in data["exprs"]) + "]"
    if _plain(source, names):
        code = compile(source, "<formulas>", "eval")
    else:
        tree = ast.parse(source, mode="eval")
        _check(tree, "the recorded formulas", names)
        code = compile(tree, "<formulas>", "eval")
    return Graph(data=data, code=code)


_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_]\w*)|(\*\*|//|<=|>=|==|!=|[-+*%<>])|([(\[])|([)\]])|(,))")


def _plain(source: str, names) -> bool:
    """Whether `source` is, token by token, a list of sums and products of integers, `names` and
    calls of `_FUNCS`: then `_check` would accept its syntax tree, and building that tree (the
    slow part of loading a graph) can be skipped. Anything else goes through `_check`."""
    operand = True      # expecting an operand (else an operator or a closing bracket)
    stack = []          # open brackets: "call", "group" or "list" (where commas may appear)
    pos, end = 0, len(source)
    match = _TOKEN.match
    while pos < end:
        m = match(source, pos)
        if m is None or m.end() == pos:
            return source[pos:].isspace()
        pos = m.end()
        number, name, op, opening, closing, comma = m.groups()
        if operand:
            if number or (name is not None and name in names):
                operand = False
            elif name is not None and name in _FUNCS and source.startswith("(", pos):
                stack.append("call")
                pos += 1
            elif opening is not None:
                stack.append("list" if opening == "[" and not stack else "group")
            elif op != "-":   # unary minus only
                return False
        elif op is not None:
            operand = True
        elif closing is not None:
            if not stack or (closing == "]") != (stack.pop() == "list"):
                return False
        elif comma is not None and stack and stack[-1] in ("call", "list"):
            operand = True
        else:
            return False
    return not operand and not stack


def trace_path(model_key: str, name: str) -> Path:
    return TRACE_ROOT / model_key / f"{name}.json.gz"


@lru_cache(maxsize=64)
def load_graph(model_key: str, name: str) -> Graph:
    path = trace_path(model_key, name)
    if not path.exists():
        raise UsageError(f"no recorded trace {model_key}/{name} (run scripts/record_traces.py)")
    return compiled_graph(path)


def compiled_graph(path: Path) -> Graph:
    """The graph in `path` (.json.gz), parsed and its formulas checked and compiled: read back from
    `${VRAMPLAN_CACHE}/compiled-traces/` (marshal, as Python caches its own bytecode) when this
    file was compiled before, else made and written there. The entry is named by the file's
    digest and the interpreter's tag, so a changed trace or another Python never reads it. Why:
    decoding and checking an SDXL denoiser's trace took some 35 ms, reading it back 10 ms, and a
    fit on a small card reads three of them (one per quantization)."""
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()[:24]
    name = f"{path.name.split('.')[0]}-{digest}-{sys.implementation.cache_tag}.marshal"
    entry = cache_root() / "compiled-traces" / name
    try:
        with gc_paused():
            data, code = marshal.loads(entry.read_bytes())
        if isinstance(data, dict) and isinstance(code, types.CodeType):
            return Graph(data=data, code=code)
    except (OSError, EOFError, ValueError, TypeError):
        pass      # none yet, or unreadable: made again below
    with gc_paused():   # the decoder builds ~10^5 lists, all kept: no collector passes over them meanwhile
        graph = parse_graph(json.loads(gzip.decompress(raw)))
    write_atomic(entry, marshal.dumps((graph.data, graph.code)))
    return graph


def read_json_gz(path: Path):
    # the decoder builds ~10^5 lists, all kept: no collector passes over them meanwhile
    with gc_paused():
        return json.loads(gzip.decompress(path.read_bytes()))

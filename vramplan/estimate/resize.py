"""A replay's records for the same graph at other sizes (another rank), without replaying it.

Why: fit tries rank after rank, and each rank's denoiser replay (about 0.1 s for SDXL) was most
of a search once everything else was kept. An adapted graph at another rank is the same graph
with other bytes for the adapters' tensors and storages (`concrete.retarget`: the structure is
shared, by identity). A replay reads sizes in two places only: the bytes it allocates (a
storage's, a tensor's, a convolution's workspace, or another record's, copied), and two
decisions -- whether a gradient aliases its output (same bytes) and whether a workspace is
allocated at all (nonzero). The Replayer logs both (`Replayer.sources` and the rest); here the
log is read against the new graph: when every decision comes out the same, the replay would make
the same records in the same order, and each one's bytes are its source's in the new graph. When
a decision differs, there is no resize and the caller replays.
"""

from __future__ import annotations

from dataclasses import dataclass

from vramplan.estimate.concrete import Concrete
from vramplan.estimate.conv_workspaces import workspace_bytes
from vramplan.estimate.replay import Replayer, convolutions


def structure(graph: Concrete) -> tuple:
    """What the replay reads of a graph besides sizes: shared, by identity, by its resized copies."""
    return (graph.opnames, graph.modules, graph.ops, graph.t_sid, graph.t_dtype, graph.t_param, graph.s_alloc,
            graph.s_free, graph.regions, graph.functions, graph.inputs, graph.outputs)


@dataclass(frozen=True)
class Sizes:
    """Where a replay's records took their bytes from, by row, and the decisions that read sizes."""

    structure: tuple
    low_dtype: str
    sources: tuple          # per row: 4*sid (storage), 4*tid+1 (tensor), 4*k+2 (workspaces[k]), 4*row+3 (a copy)
    workspaces: tuple       # (op index, kind, allocated: nonzero)
    aliases: tuple          # (tid, output tid, same bytes)
    saved_from: tuple       # (module, row): rows summed into saved_by_module


def sizes_of(rep: Replayer, records: list) -> Sizes | None:
    """The log of `rep`, whose allocations are `records` in order; None when they are not (a
    replay that allocated through another path cannot be resized)."""
    if len(rep.sources) != len(records):
        return None
    row_of = {id(r): i for i, r in enumerate(records)}
    copied = [row_of.get(id(r)) for r in rep.copied]
    saved = [(module, row_of.get(id(r))) for module, r in rep.saved_from]
    if None in copied or any(row is None for _, row in saved):
        return None
    sources = tuple(4 * copied[s >> 2] + 3 if s & 3 == 3 else s for s in rep.sources)
    return Sizes(structure(rep.g), rep.opt.low_dtype, sources, tuple(rep.workspaces), tuple(rep.aliases),
                 tuple(saved))


def resized_bytes(sizes: Sizes, graph: Concrete, low_dtype: str) -> list[int] | None:
    """Each row's bytes for `graph` (rounded as the clock rounds), or None when `graph` is not
    the logged one at other sizes, or a decision would come out otherwise."""
    if low_dtype != sizes.low_dtype or any(a is not b for a, b in zip(structure(graph), sizes.structure)):
        return None
    t_bytes, s_bytes = graph.t_bytes, graph.s_bytes
    for tid, out, same in sizes.aliases:
        if (t_bytes[tid] == t_bytes[out]) != same:
            return None
    workspaces = []
    if sizes.workspaces:
        conv = convolutions(graph, low_dtype)
        for i, kind, made in sizes.workspaces:
            key, dtype = conv[i]
            nbytes = workspace_bytes(key, dtype, kind)
            if bool(nbytes) != made:
                return None
            workspaces.append(nbytes)
    out = []
    append = out.append
    for s in sizes.sources:
        kind, k = s & 3, s >> 2
        nbytes = s_bytes[k] if kind == 0 else t_bytes[k] if kind == 1 else workspaces[k] if kind == 2 else out[k]
        append(-(-nbytes // 512) * 512)     # replay.cuda_rounded, inlined: once per row
    return out

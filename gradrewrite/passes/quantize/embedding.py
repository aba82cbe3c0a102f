"""Weight-only quantization of embedding tables and of the LM heads tied to them.

An ``aten.embedding`` table ``[V, dim]`` is quantized group-wise along ``dim`` with
``quantize_groupwise`` (round to nearest: a table has no input Hessian for GPTQ and no
preceding op to fold an AWQ scale into) and its lookups become
``gradrewrite::groupwise_embedding`` (``rewrite/quant_embedding_ops.py``). A linear
layer whose weight is the same tensor (a tied LM head: one ``get_attr`` used twice, or
two attributes over one storage) becomes a ``groupwise_linear`` that reads the very
same packed buffers, so the table is stored, and counted, once.

``embeddings=auto`` quantizes a table only where the report shows it pays:

1. the table (with its tied heads, once) holds at least ``MIN_SHARE`` of the graph's
   weight values, so there is something to save; and
2. it costs no more output error per saved bit than the linear layers did: with
   ``e_base`` the model's output error (relative L2 against fp32, on the pass's error
   samples) before the table is quantized and ``e_table`` after,
   ``(e_table^2 - e_base^2) / saved_table_bits <= e_linears^2 / saved_linear_bits``.
   Independent rounding errors add in energy, so this compares the marginal
   error-per-bit of the table with the average one the user already accepted for the
   linears. Tables are tried largest first; an accepted table becomes part of the base.
"""
from __future__ import annotations

import contextlib
import fnmatch
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx

from ...errors import ConfigError
from ...rewrite.graph import Graph, _view_key, copy_meta, is_bn_statistic, module_path
from ...rewrite.quant_embedding_ops import GROUPWISE_EMBEDDING
from ...rewrite.quant_ops import GROUPWISE_LINEAR
from .error_report import layer_error
from .layers import observe
from .weight_only import BITS, GroupwiseWeight, quantize_groupwise

aten = torch.ops.aten

EMBEDDING_MODES = ("auto", "on", "off")
MIN_SHARE = 0.05     # auto: a table below 5% of the weights saves too little to risk error
MIN_GROUP = 16       # MatMulNBits / GatherBlockQuantized block sizes are powers of two >= 16


def check_options(embeddings: str, embedding_bits: int, static: bool) -> None:
    if embeddings not in EMBEDDING_MODES:
        raise ConfigError(f"unknown embeddings {embeddings!r} for quantize",
                          f"use one of {', '.join(EMBEDDING_MODES)}")
    if static and embeddings == "on":
        raise ConfigError("embeddings=on is for weight-only quantization (static int8 keeps tables "
                          "fp32)", "use mode=weight-only, or leave embeddings at auto")
    if embedding_bits and embedding_bits not in BITS:
        raise ConfigError(f"embedding_bits={embedding_bits} is out of range",
                          "use 0 (same as bits) or 2, 3, 4, 8")


@dataclass
class Table:
    """One stored table and every node that reads it."""
    weight: str                                            # first get_attr target
    path: str                                              # module path of its first lookup
    attrs: list[fx.Node] = field(default_factory=list)     # get_attr nodes over its storage
    lookups: list[fx.Node] = field(default_factory=list)   # aten.embedding calls
    heads: list[fx.Node] = field(default_factory=list)     # aten.linear calls using it as weight
    other: list[str] = field(default_factory=list)         # any other reader (kept fp32)

    def value(self, graph: Graph) -> torch.Tensor:
        return graph.attr(self.attrs[0])


def find_tables(graph: Graph, exclude: str) -> tuple[list[Table], list[dict[str, str]]]:
    """Tables read by ``aten.embedding`` (grouped by storage, so ties are one table), and
    ``{path, reason}`` for those that cannot be quantized."""
    by_key: dict[tuple, Table] = {}
    attrs_by_key: dict[tuple, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "get_attr" and not is_bn_statistic(node):
            t = graph.attr(node)
            if isinstance(t, torch.Tensor) and t.dim() == 2:
                attrs_by_key.setdefault(_view_key(t), []).append(node)
    for node in graph.nodes:
        if node.op == "call_function" and node.target == aten.embedding.default:
            w = node.args[0]
            if not (isinstance(w, fx.Node) and w.op == "get_attr"):
                continue
            key = _view_key(graph.attr(w))
            if key not in by_key:
                by_key[key] = Table(str(w.target), module_path(node) or str(w.target),
                                    attrs=attrs_by_key.get(key, [w]))
    excludes = tuple(g.strip() for g in exclude.split("|") if g.strip())
    tables, skipped = [], []
    for table in by_key.values():
        for a in table.attrs:
            for user in a.users:
                if user.target == aten.embedding.default and user.args[0] is a:
                    table.lookups.append(user)
                elif user.target == aten.linear.default and user.args[1] is a and user.args[0] is not a:
                    table.heads.append(user)
                else:
                    table.other.append(user.name)
        t = table.value(graph)
        hit = next((g for g in excludes if fnmatch.fnmatchcase(table.path, g)), None)
        reason = (f"excluded by {hit!r}" if hit else
                  f"table dtype {str(t.dtype).removeprefix('torch.')} is not float32"
                  if t.dtype != torch.float32 else
                  f"embedding dim {t.shape[1]} < {MIN_GROUP}" if t.shape[1] < MIN_GROUP else
                  f"table is also read by {', '.join(table.other[:3])} (it would stay fp32 there)"
                  if table.other else None)
        if reason:
            skipped.append({"path": table.path, "reason": reason})
        else:
            tables.append(table)
    return tables, skipped


def table_group(group: int, dim: int) -> int:
    """The group size used for a table: ``group``, or the largest power of two <= dim
    when dim is smaller (a group longer than a row would be mostly padding)."""
    return min(group, 1 << int(math.log2(dim)))


@contextlib.contextmanager
def _swapped(graph: Graph, attrs: Sequence[fx.Node], value: torch.Tensor):
    """Bind ``value`` to every attr of a table for a trial run, then put the very same
    tensor objects back (so ties over one storage survive the trial)."""
    saved = []
    for a in attrs:
        owner_path, _, leaf = str(a.target).rpartition(".")
        owner = graph.gm.get_submodule(owner_path) if owner_path else graph.gm
        store = owner._parameters if leaf in owner._parameters else owner._buffers
        saved.append((store, leaf, store[leaf]))
        store[leaf] = torch.nn.Parameter(value, requires_grad=False) if store is owner._parameters \
            else value
    try:
        yield
    finally:
        for store, leaf, old in saved:
            store[leaf] = old


def _output_error(graph: Graph, samples: Sequence[tuple], reference: list[list[torch.Tensor]]) -> float:
    """Relative L2 error of all float outputs over the samples, against ``reference``."""
    pairs = []
    for sample, ref in zip(samples, reference):
        got = graph(*sample)
        pairs += [(r, g) for r, g in zip(ref, got) if r.is_floating_point()]
    return layer_error(pairs)["relative_error"]


class EmbeddingStep:
    """Set up before the linear layers are quantized (records the fp32 outputs and the
    looked-up indices); ``run`` after them decides and rewrites."""

    def __init__(self, graph: Graph, mode: str, bits: int, group: int, exclude: str,
                 samples: Sequence[tuple]):
        self.mode, self.bits, self.group = mode, bits, group
        self.tables, self.skipped = find_tables(graph, exclude) if mode != "off" else ([], [])
        self.samples = list(samples)
        self.indices: dict[fx.Node, list[torch.Tensor]] = {}
        self.reference: list[list[torch.Tensor]] = []
        self.total_numel = graph.parameter_count()
        if not self.tables:
            return
        watch = {}
        for t in self.tables:
            for lookup in t.lookups:
                idx = lookup.args[1]
                self.indices.setdefault(idx, [])
                watch[idx] = lambda v, key=idx: self.indices[key].append(v.detach().clone())

        observe(graph, self.samples, watch)
        self.reference = [graph(*s) for s in self.samples]

    def run(self, graph: Graph, linear_bits: int, linear_numel: int,
            skipped: list[dict[str, str]], errors: list[dict[str, Any]]) -> dict[str, Any]:
        """Quantize the tables that pass (see the module doc); returns the report section.
        ``skipped`` (the linears' list) loses the tied heads this step quantizes; ``errors``
        (the per-layer error report) gains a row per quantized table."""
        if self.mode == "off":
            return {"embeddings": {"mode": "off", "tables": []}}
        graph.gm.recompile()   # the trial runs below must see the quantized linears
        # measured in both modes: the report shows every table's effect on the output
        e_linears = _output_error(graph, self.samples, self.reference) if self.tables else None
        saved_linear = linear_numel * 32 - linear_bits
        e_base = e_linears
        records, quantized_heads = [], set()
        out_bits = out_numel = 0
        for table in sorted(self.tables, key=lambda t: -t.value(graph).numel()):
            w = table.value(graph).detach().float()
            group = table_group(self.group, w.shape[1])
            q = quantize_groupwise(w, self.bits, group)
            deq = q.dequantized()
            stored = sum(q.storage_bits().values())
            saved = w.numel() * 32 - stored
            share = w.numel() / max(1, self.total_numel)
            rec = {"path": table.path, "weight": table.weight, "shape": list(w.shape),
                   "bits": self.bits, "group": group,
                   "tied_heads": [module_path(h) or h.name for h in table.heads],
                   "lookups": len(table.lookups), "share_of_weights": round(share, 4),
                   "bytes_before": w.numel() * 4, "bytes_after": math.ceil(stored / 8),
                   "bits_per_weight": round(stored / w.numel(), 4), "storage_bits": q.storage_bits(),
                   **_rows_error(w, deq, self.indices, table)}
            with _swapped(graph, table.attrs, deq):
                e_table = _output_error(graph, self.samples, self.reference)
            take, reason = _decide(share, e_base, e_table, saved, e_linears, saved_linear) \
                if self.mode == "auto" else (True, "embeddings=on")
            rec.update({"output_error_before": e_base, "output_error_with_table": e_table,
                        "quantized": take, "reason": reason})
            if take:
                _replace(graph, table, q)
                quantized_heads.update(rec["tied_heads"])
                out_bits += stored
                out_numel += w.numel()
                e_base = e_table
                errors.append({"path": table.path, "kind": "embedding", "shape": rec["shape"],
                               "bits_per_weight": rec["bits_per_weight"], "outliers": 0,
                               **{k: v for k, v in rec["table_error"].items() if k != "rows"}})
            records.append(rec)
        skipped[:] = [s for s in skipped if s["path"] not in quantized_heads]
        return {"embeddings": {
            "mode": self.mode, "bits": self.bits, "rule": (
                f"auto: quantize a table holding >= {MIN_SHARE:.0%} of the weights whose added "
                "output error energy per saved bit is at most the linear layers' "
                "(e_linears^2 / their saved bits)" if self.mode == "auto" else "embeddings=on"),
            "output_error_linears_only": e_linears,
            "output_error_data": f"{len(self.samples)} samples (the pass's error samples)",
            "bits_per_weight": round(out_bits / out_numel, 4) if out_numel else None,
            "tables": records, "skipped": self.skipped},
            "bits_per_weight_with_embeddings": round((linear_bits + out_bits) /
                                                     max(1, linear_numel + out_numel), 4)}


def _decide(share: float, e_base: float, e_table: float, saved: int, e_linears: float,
            saved_linear: int) -> tuple[bool, str]:
    if share < MIN_SHARE:
        return False, f"table is {share:.1%} of the weights (< {MIN_SHARE:.0%}): too little to save"
    if saved_linear <= 0 or not e_linears:
        return False, "no quantized linear layer to compare its error with (use embeddings=on)"
    per_bit = (e_table ** 2 - e_base ** 2) / saved
    budget = e_linears ** 2 / saved_linear
    verdict = per_bit <= budget
    return verdict, (f"added output error energy {per_bit:.3g}/bit "
                     f"{'<=' if verdict else '>'} the linear layers' {budget:.3g}/bit")


def _rows_error(w: torch.Tensor, deq: torch.Tensor, indices: dict, table: Table) -> dict[str, Any]:
    """The table's error on the rows the samples looked up (all rows if none recorded)."""
    seen = [i.reshape(-1) for lookup in table.lookups for i in indices.get(lookup.args[1], [])]
    rows = torch.unique(torch.cat(seen)).long() if seen else torch.arange(w.shape[0])
    err = layer_error([(w[rows], deq[rows])])
    return {"table_error": {"rows": int(rows.numel()), **err}}


def _replace(graph: Graph, table: Table, q: GroupwiseWeight) -> None:
    """Lookups -> groupwise_embedding, tied heads -> groupwise_linear, all on one copy."""
    first = min((n for n in table.lookups + table.heads), key=_position(graph))
    add = lambda suffix, value: graph.add_attr(f"{table.weight}_{suffix}", value, before=first,
                                               parameter=False)
    packed, scales, zeros = add("packed", q.packed), add("scales", q.scales), add("zeros", q.zeros)
    dim = q.in_features
    for node in table.lookups:
        with graph.graph.inserting_before(node):
            new = graph.graph.call_function(GROUPWISE_EMBEDDING, (
                node.args[1], packed, scales, zeros, q.bits, q.group, dim))
        _swap_node(graph, node, new, f"{q.bits}-bit g{q.group} embedding")
    for node in table.heads:
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        with graph.graph.inserting_before(node):
            new = graph.graph.call_function(GROUPWISE_LINEAR, (
                node.args[0], packed, scales, zeros, bias, None, None, None, q.bits, q.group, dim))
        _swap_node(graph, node, new, f"{q.bits}-bit g{q.group} (tied to {table.weight})")


def _position(graph: Graph):
    order = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: order[n]


def _swap_node(graph: Graph, old: fx.Node, new: fx.Node, what: str) -> None:
    copy_meta(old, new, keep_val=True)
    new.meta.setdefault("gradrewrite", {}).update({"quantized": what})
    old.replace_all_uses_with(new)
    graph.graph.erase_node(old)


__all__ = ["EMBEDDING_MODES", "MIN_SHARE", "EmbeddingStep", "Table", "check_options", "find_tables",
           "table_group"]

"""GWQ outlier selection: per-weight saliency scores, top-k per layer, compressed-row storage.

Criteria (one option apart, same budget):

- ``gradient`` (GWQ): the gradient of a loss on calibration data w.r.t. every quantized
  weight, aggregated over samples as ``sum |g|`` (``abs``) or ``sum g^2`` (``square``).
  The loss: next-token cross-entropy for a causal LM; else the user's loss callable;
  else the squared distance between the model's outputs with round-to-nearest
  quantized weights and the fp32 outputs, differentiated at the quantized weights
  (at the fp32 weights that distance and its gradient are exactly 0).
- ``hessian``: the diagonal-Hessian proxy of a layer's reconstruction loss,
  ``w_ij^2 * E[x_j^2]`` (SpQR/OBQ-style saliency with H = E[x x^T] diagonal).
- ``magnitude``: ``|w_ij|``.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from ...errors import ConfigError
from ...rewrite.calibration import progress as iterate
from ...rewrite.graph import Graph
from ...rewrite.quant_ops import pack_outlier_positions
from .layers import QLayer

CRITERIA = ("gradient", "hessian", "magnitude")
AGGREGATIONS = ("abs", "square")
LOSSES = ("auto", "causal-lm", "mse")


SPREADS = ("layer", "rows", "cols")


def top_k_mask(score: torch.Tensor, fraction: float, spread: str = "layer") -> torch.Tensor:
    """Boolean mask of the highest scores: ``round(fraction * numel)`` of the layer
    (``spread=layer``), ``round(fraction * K)`` in every output row (``rows``: equal rows
    need no padding in the ORT decode term, which gathers rows padded to the longest), or
    the ``round(fraction * K)`` input columns (at least one) with the highest summed score,
    whole (``cols``: the decode term is a gather of a few inputs and a small dense matmul)."""
    if spread == "cols" and score.dim() == 2:
        k = max(1, int(round(fraction * score.shape[1]))) if fraction > 0 else 0
        mask = torch.zeros(score.shape, dtype=torch.bool)
        if k > 0:
            mask[:, torch.topk(score.double().sum(0), k, sorted=False).indices] = True
        return mask
    if spread == "rows" and score.dim() == 2:
        k = int(round(fraction * score.shape[1]))
        mask = torch.zeros(score.shape, dtype=torch.bool)
        if k > 0:
            mask.scatter_(1, torch.topk(score.double(), k, dim=1, sorted=False).indices, True)
        return mask
    k = int(round(fraction * score.numel()))
    mask = torch.zeros(score.numel(), dtype=torch.bool)
    if k > 0:
        mask[torch.topk(score.reshape(-1).double(), k, sorted=False).indices] = True
    return mask.reshape(score.shape)


def store_outliers(w: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                  torch.Tensor | None]:
    """The masked entries of a 2-D ``w`` as the graph stores them (``rewrite/quant_ops.py``):
    whole columns (every row masked at the same columns) as fp16 ``[N, c]`` values and the
    ``c`` columns, no counts; otherwise compressed rows: fp16 values, 16-bit cols (int32
    past K = 65536) and per-row counts (uint8 unless a row holds more than 255)."""
    col_hits = mask.sum(0)
    if mask.any() and bool(((col_hits == 0) | (col_hits == mask.shape[0])).all()):
        cols = col_hits.nonzero().flatten()
        values = w.detach()[:, cols].to(torch.float16)
        packed, _ = pack_outlier_positions(torch.zeros_like(cols), cols, 1, w.shape[1])
        return values, packed, None
    rows, cols = mask.nonzero(as_tuple=True)          # row-major: rows sorted, cols within
    values = w.detach()[rows, cols].to(torch.float16)
    cols, counts = pack_outlier_positions(rows, cols, w.shape[0], w.shape[1])
    return values, cols, counts


def magnitude_scores(graph: Graph, layers: Sequence[QLayer]) -> dict[str, torch.Tensor]:
    return {l.param: graph.attr(l.weight_node).detach().float().abs() for l in layers}


def hessian_scores(graph: Graph, layers: Sequence[QLayer],
                   sq_inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``w^2 * E[x^2]`` per weight, from per-input-feature mean squared activations."""
    return {l.param: graph.attr(l.weight_node).detach().float() ** 2 * sq_inputs[l.param][None, :]
            for l in layers}


def resolve_loss(graph: Graph, loss: Any) -> str | Callable:
    """The loss ``choose_loss`` picks (without its reason)."""
    return choose_loss(graph, loss)[0]


def choose_loss(graph: Graph, loss: Any) -> tuple[str | Callable, str]:
    """The gradient loss and why: ``auto`` -> ``causal-lm`` only for a language model
    (integer ids [B, T] in, logits [B, T, V] out with V = the rows of the embedding table
    the ids index), else ``mse`` (the output distance). An explicit ``causal-lm`` on a
    model whose output is not vocabulary logits is a ConfigError."""
    if callable(loss):
        return loss, "user callable"
    if loss not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r} for quantize", f"use one of {', '.join(LOSSES)} "
                          "(or, from Python, a callable (outputs, inputs) -> scalar)")
    ids, why = _lm_check(graph)
    if loss == "causal-lm":
        if ids is None:
            raise ConfigError(f"loss=causal-lm needs a language model whose output is vocabulary "
                              f"logits [B, T, V] from integer ids [B, T], but {why}",
                              "use loss=mse (the output distance) or loss=auto")
        return loss, f"asked for: {why}"
    if loss == "mse":
        return loss, "asked for"
    if ids is not None:
        return "causal-lm", f"chose causal-lm: {why}"
    return "mse", f"chose output-distance (mse): {why}"


def lm_input(graph: Graph) -> int | None:
    return _lm_check(graph)[0]


def _lm_check(graph: Graph) -> tuple[int | None, str]:
    """(index of the ids input, reason) when the model is a language model, else (None, reason)."""
    outputs = [n for n in graph.nodes if n.op == "output"]
    first = pytree.tree_leaves(outputs[0].args[0])[0] if outputs else None
    val = getattr(first, "meta", {}).get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 3:
        shape = list(val.shape) if isinstance(val, torch.Tensor) else "not a tensor"
        return None, f"the output ({shape}) is not [B, T, V] logits"
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    found_ids = False
    for i, spec in enumerate(graph.inputs):
        if spec.dtype.is_floating_point or len(spec.shape) != 2 \
                or tuple(spec.shape) != tuple(int(s) for s in val.shape[:2]):
            continue
        found_ids = True
        node = placeholders[i] if i < len(placeholders) else None
        rows = _embedding_rows(graph, node)
        width = int(val.shape[-1])
        if not rows:
            return None, f"the ids input {i} indexes no embedding table"
        if width in rows:
            return i, f"the output [B, T, {width}] is vocabulary-wide (the embedding table of " \
                      f"input {i} has {width} rows)"
        return None, f"the output is not vocabulary-wide (width {width}; the embedding table of " \
                     f"the ids has {max(rows)} rows)"
    if not found_ids:
        return None, "no integer [B, T] ids input matches the output's [B, T]"
    return None, "the output is not vocabulary-wide"


def _embedding_rows(graph: Graph, ids: Any) -> list[int]:
    """Rows of the embedding tables indexed by values computed from ``ids`` only through
    shape ops (view/reshape/...)."""
    if ids is None:
        return []
    reach, frontier = {ids}, [ids]
    while frontier:                     # ids and what is computed from it without mixing
        node = frontier.pop()
        for user in node.users:
            if user in reach or user.op != "call_function":
                continue
            name = str(user.target)
            if any(k in name for k in ("view", "reshape", "unsqueeze", "squeeze", "flatten",
                                       "expand", "clone", "contiguous", "_to_copy", "slice", "alias")):
                reach.add(user)
                frontier.append(user)
    rows = []
    for node in graph.nodes:
        if node.op == "call_function" and "embedding" in str(node.target) and len(node.args) > 1 \
                and node.args[1] in reach and isinstance(node.args[0], torch.fx.Node):
            val = node.args[0].meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() == 2:
                rows.append(int(val.shape[0]))
    return rows


def causal_lm_loss(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], ids_index: int):
    logits, ids = outputs[0], inputs[ids_index]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                           ids[:, 1:].reshape(-1))


def gradient_scores(graph: Graph, layers: Sequence[QLayer], samples: Sequence[tuple], *,
                    loss: str | Callable, aggregation: str,
                    rtn: Callable[[torch.Tensor], torch.Tensor],
                    progress=None) -> dict[str, torch.Tensor]:
    """Aggregated gradients of the loss w.r.t. each layer's weight over ``samples``.

    ``rtn`` maps a weight to its round-to-nearest dequantized form (for ``mse``)."""
    gm = copy.deepcopy(graph.gm)
    for p in gm.parameters():
        p.requires_grad_(False)
    params: dict[str, torch.nn.Parameter] = {}
    for l in layers:
        owner_path, _, leaf = l.param.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        value = getattr(owner, leaf).detach().float().clone()
        if loss == "mse":
            value = rtn(value)
        owner._parameters.pop(leaf, None)
        owner._buffers.pop(leaf, None)
        params[l.param] = torch.nn.Parameter(value)
        owner.register_parameter(leaf, params[l.param])
    ids_index = lm_input(graph) if loss == "causal-lm" else None
    acc = {k: torch.zeros_like(p) for k, p in params.items()}
    for sample in iterate(progress, f"gradients ({loss if isinstance(loss, str) else 'user loss'})",
                          samples):
        with torch.enable_grad():
            out = [t for t in pytree.tree_leaves(gm(*sample)) if isinstance(t, torch.Tensor)]
            value = sample_loss(loss, out, sample, ids_index, graph(*sample) if loss == "mse" else None)
            grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
        for key, g in zip(params, grads):
            accumulate(acc, key, g, aggregation)
    return acc


def sample_loss(loss: str | Callable, out: list[torch.Tensor], sample: Sequence[torch.Tensor],
                ids_index: int | None, ref: list[torch.Tensor] | None) -> torch.Tensor:
    """The gradient loss of one sample from the model's outputs (``ref``: the fp32 outputs, for mse)."""
    if loss == "causal-lm":
        return causal_lm_loss(out, sample, ids_index)
    if loss == "mse":
        return sum(F.mse_loss(o.float(), r.float(), reduction="sum") for o, r in zip(out, ref))
    return loss(out, sample)


def accumulate(acc: dict[str, torch.Tensor], key: str, g: torch.Tensor | None, aggregation: str) -> None:
    """Adds one sample's gradient to a weight's score: ``|g|`` (abs) or ``g^2`` (square)."""
    if g is not None:
        acc[key] += g.abs() if aggregation == "abs" else g * g


class KeptIndices:
    """A layer's outlier mask held as its flat indices (a few per cent of the weights), so
    masks chosen early (layer-wise gradients) cost little memory until their layer is quantized."""

    def __init__(self, mask: torch.Tensor):
        self.shape = tuple(mask.shape)
        flat = mask.reshape(-1).nonzero().flatten()
        self.flat = flat.to(torch.int32) if mask.numel() < 2 ** 31 else flat

    def mask(self) -> torch.Tensor:
        out = torch.zeros(self.shape, dtype=torch.bool)
        out.view(-1)[self.flat.long()] = True
        return out


def outlier_mask(score: torch.Tensor | KeptIndices, fraction: float, spread: str) -> torch.Tensor:
    """A layer's outlier mask from its saliency scores (``top_k_mask``), or the one chosen already."""
    return score.mask() if isinstance(score, KeptIndices) else top_k_mask(score, fraction, spread)


__all__ = ["CRITERIA", "AGGREGATIONS", "LOSSES", "SPREADS", "top_k_mask", "store_outliers", "magnitude_scores",
           "hessian_scores", "gradient_scores", "resolve_loss", "choose_loss", "sample_loss", "accumulate",
           "KeptIndices", "outlier_mask", "lm_input"]

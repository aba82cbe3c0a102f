"""Is an attention causal? Its mask's values say, checked at capture a block of query rows
at a time, for fused attention (SDPA's ``attn_mask``) and attention written out
(``Q @ K^T`` -> scale, soft-cap, mask, ALiBi bias -> softmax -> ``P @ V``).

A key is *hidden* from a query where the mask is ``False`` (a bool mask) or very
negative: ``-inf``, or a finite value at most half the dtype's minimum (``finfo.min``,
as transformers writes it). A finite score plus such a value underflows to exactly zero
in the softmax, so an attention is causal when every later key is hidden from every
query. Written-out attention is checked on the softmax input with the scores set to zero:
what remains is the mask (and the ALiBi bias, the soft-cap applied to zero), whatever
order the model adds them in.

The check also decides how many keys a chunk of queries [s, e) reads. Keys 0:e are
enough when a hidden key weighs exactly zero. Under a finite mask a row whose keys are
all hidden (a left-padding query) has the softmax of equal values: it spreads evenly
over every key, including the later ones; such attentions read keys 0:T
(``OpInfo.full_keys``), unless the inputs are fixed (the API's all-ones mask) and no
row is fully hidden.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ...errors import PassError
from ...rewrite.graph import op_name
from . import chunk_program
from .chunk_program import _axes
from .seq_axis import CAUSAL, SCORE_MATMULS, SDPA, VIEWS, is_pointwise, sdpa_args, shape_of



def hidden(m: torch.Tensor) -> torch.Tensor:
    """Where a mask (bool, or additive float) hides a key."""
    if m.dtype == torch.bool:
        return ~m
    return m <= torch.finfo(m.dtype).min / 2


def finite_hidden(m: torch.Tensor) -> bool:
    return m.dtype != torch.bool and bool(((m > float("-inf")) & hidden(m)).any())


def score_path(softmax: fx.Node, members: set[fx.Node], axes_of: dict) -> tuple[list[fx.Node], list[fx.Node], list[fx.Node]]:
    """(the ``Q @ K^T`` matmuls, the ops from them to the softmax input in graph order,
    the other inputs of those ops): the score path is the gradient path's query x key
    tensors between the matmuls and the softmax."""
    sources, path, sides, seen = [], [], [], set()
    stack = [softmax.args[0]]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in members and n.op == "call_function" and len(_axes(axes_of, n)) == 2:
            if n.target in SCORE_MATMULS:
                sources.append(n)
            else:
                path.append(n)
                stack.extend(n.all_input_nodes)
        else:
            sides.append(n)
    order = {n: i for i, n in enumerate(softmax.graph.nodes)}
    return sources, sorted(path, key=order.get), sides


def _query_axis_of(side: fx.Node, path: list[fx.Node], infos: dict) -> int | None:
    """The side input's axis that lines up with the scores' query axis."""
    for c in path:
        m = infos[c].in_maps.get(side)
        if m:
            q = len(shape_of(c)) - 2
            return m.get(q)
    return None


class AttentionMasks:
    """Checks every attention on the gradient path; see the module docstring."""

    def __init__(self, gm: fx.GraphModule, grad: set[fx.Node], infos: dict, axes_of: dict, T: int,
                 chunk: int, example: dict[str, torch.Tensor], where, fixed_inputs: bool):
        self.gm, self.grad, self.infos, self.axes_of, self.T = gm, grad, infos, axes_of, T
        self.chunk, self.example, self.where, self.fixed = chunk, example, where, fixed_inputs

    def check(self) -> set[fx.Node]:
        """Raise naming an attention whose mask lets a query see a later key; set
        ``full_keys``; return the SDPA masks that are exactly the causal mask."""
        exact: set[fx.Node] = set()
        seen: dict = {}   # SDPA mask node, or a softmax's mask inputs and ops -> result
        for node in self.gm.graph.nodes:
            info = self.infos.get(node)
            if node not in self.grad or info is None or info.kind != CAUSAL:
                continue
            if node.target is SDPA:
                a = sdpa_args(node)
                mask = a["attn_mask"]
                if a["is_causal"]:
                    continue
                if mask not in seen:
                    seen[mask] = self._sdpa_mask(node, mask)
                is_exact, finite, full_row = seen[mask]
                if is_exact:
                    exact.add(mask)
            elif info.key_axis is not None and info.probs_of is None:
                sources, path, sides = score_path(node, self.grad, self.axes_of)
                key = (tuple(sides), tuple((n.target, repr([a for a in n.args if not isinstance(a, fx.Node)]))
                                           for n in path))   # layers sharing a mask: checked once
                if key not in seen:
                    seen[key] = self._softmax(node, sources, path, sides)
                is_exact, finite, full_row = seen[key]
            else:
                continue
            info.full_keys = finite and (full_row or not self.fixed)
        return exact

    def _refuse(self, node: fx.Node, why: str) -> PassError:
        return PassError(f"stream-bp: {op_name(node)} at {self.where(node)} is non-causal attention ({why})",
                         "stream-bp applies to causal (decoder) attention only")

    def _probe(self, outputs: list[tuple[fx.Node, dict]]) -> chunk_program.ChunkProgram:
        return chunk_program.build(self.gm, [], outputs, set(), self.infos, self.axes_of, self.T)

    def _user(self, prog: chunk_program.ChunkProgram) -> list[torch.Tensor]:
        return [self.example[n] for n in prog.user_inputs]

    def _blocks(self, node: fx.Node, masks) -> tuple[bool, bool, bool]:
        """Run ``masks(s, e)`` (the mask for query rows [s, e), all keys) block by block:
        (exactly the causal mask, with no bias, finite hidden values, a fully hidden row)."""
        T = self.T
        is_exact, finite, full_row = True, False, False
        for s in range(0, T, self.chunk):
            e = min(T, s + self.chunk)
            with torch.no_grad():
                m = masks(s, e)
            hide = hidden(m)
            later = torch.arange(T)[None, :] > torch.arange(s, e)[:, None]
            if (~hide & later).any():
                raise self._refuse(node, "its mask lets a token see later tokens")
            is_exact = is_exact and bool((~hide | later).all()) and (
                m.dtype == torch.bool or not bool(m.masked_fill(hide, 0).any()))  # no bias either
            finite = finite or finite_hidden(m)
            full_row = full_row or bool(hide.all(-1).any())
        return is_exact, finite, full_row

    def _sdpa_mask(self, node: fx.Node, mask: fx.Node) -> tuple[bool, bool, bool]:
        rank = len(shape_of(mask))
        ax = self.axes_of.get(mask) or {}
        if rank - 2 not in ax or rank - 1 not in ax:
            raise self._refuse(node, "its mask does not order queries and keys")
        probe = self._probe([(mask, {rank - 2: ("s", "e"), rank - 1: ("0", "T")})])
        return self._blocks(node, lambda s, e: probe(s, e, [], self._user(probe), [])[0])

    def _softmax(self, node: fx.Node, sources: list[fx.Node], path: list[fx.Node],
                 sides: list[fx.Node]) -> tuple[bool, bool, bool]:
        if not sources:
            raise PassError(f"stream-bp: {op_name(node)} at {self.where(node)} normalises over the "
                            "sequence axis without query x key scores from a matmul",
                            "stream-bp needs ops that are token-wise or causal along the sequence")
        zero = set(sources)  # views of the scores are scores too
        for n in path:
            if n.target in VIEWS and n.args[0] in zero:
                zero.add(n)
            elif not is_pointwise(n.target):
                raise PassError(f"stream-bp: attention scores pass through {op_name(n)} at "
                                f"{self.where(n)} before {op_name(node)}, which the mask check "
                                "does not follow",
                                "stream-bp follows scale, soft-cap and additive masks on the scores")
        outputs = []
        for side in sides:
            ax = _axes(self.axes_of, side)
            q = _query_axis_of(side, path, self.infos)
            outputs.append((side, {a: ("s", "e") if a == q else ("0", "T") for a in ax}))
        probe = self._probe(outputs)

        def masks(s: int, e: int) -> torch.Tensor:
            env = dict(zip(sides, probe(s, e, [], self._user(probe), [])))
            for src in zero:   # scores set to zero (broadcast over batch and heads): mask and bias remain
                shape = [1] * (len(shape_of(src)) - 2) + [e - s, shape_of(src)[-1]]
                env[src] = torch.zeros(shape, dtype=src.meta["val"].dtype)
            for n in path:
                if n in zero:
                    continue
                args = fx.map_arg(n.args, env.__getitem__)
                kwargs = fx.map_arg(n.kwargs, env.__getitem__)
                env[n] = n.target(*args, **kwargs)
            return env[node.args[0]]

        return self._blocks(node, masks)

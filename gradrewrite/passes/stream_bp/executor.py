"""Run a training step as StreamBP: store layer boundaries, then backward chunk by chunk.

1. Capture the model's forward (ids [, attention mask] -> logits) with torch.export,
   classify every op against the sequence axis and refuse a model whose gradient path
   mixes tokens non-causally, naming the op.
2. Forward, segment by segment without autograd, keeping only the values that cross a
   segment boundary (the residual stream between layers).
3. Epilogue (final norm, LM head, loss) chunk by chunk over ``logits_chunk`` rows: the
   loss is the token sum divided by the exact normaliser (valid shifted labels). When
   the head reads only the last layer's rows, that layer is skipped in step 2: its rows
   [s, e) are computed with autograd right before the head's, and backpropagated at
   once (one layer forward less; its autograd graph for one chunk is alive while the
   head's logits are).
4. Layers in reverse, ``chunk`` rows at a time: recompute rows [s, e) (keys/values
   0:e), backward at once with the output gradient's rows, free. Parameter gradients
   accumulate in ``.grad``; the input boundary accumulates its gradient for the layer
   below.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ...errors import InputError, PassError
from ...rewrite.graph import Graph, module_path, op_name
from . import chunk_program
from .chunk_program import ChunkProgram
from .masks import AttentionMasks, score_path
from .partition import Segment, gradient_nodes, partition
from .seq_axis import CAUSAL, GLOBAL, OPAQUE, SDPA, key_operand, sdpa_args, shape_of, track

aten = torch.ops.aten

IGNORE_INDEX = -100


# The oldest transformers whose causal LMs were checked against plain backprop (4.44.2,
# 4.49.0 and 5.x); older masks and attention code are refused rather than guessed at.
MIN_TRANSFORMERS = "4.44"


def check_transformers_version() -> None:
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise InputError(f"stream-bp: transformers {transformers.__version__} is older than "
                         f"{MIN_TRANSFORMERS}, the oldest version stream-bp supports",
                         f"pip install 'transformers>={MIN_TRANSFORMERS}'")


class LogitsOf(nn.Module):
    """Calls a causal LM with (input_ids [, attention_mask]) and returns its logits tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.keywords = hasattr(model, "config")  # a transformers model
        if self.keywords and type(model).__module__.startswith("transformers."):
            check_transformers_version()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        if self.keywords:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        else:
            out = self.model(input_ids) if attention_mask is None else self.model(input_ids, attention_mask)
        return logits_of(out)


def logits_of(out: Any) -> torch.Tensor:
    """The logits in what a causal LM returns: a tensor, a ``transformers`` ModelOutput
    (``.logits``), a dict with ``"logits"``, or a tuple (its first batch x seq x vocab
    tensor: a leading loss is skipped)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, dict):
        logits = out.get("logits")
    if logits is None and isinstance(out, (tuple, list)):
        logits = next((t for t in out if isinstance(t, torch.Tensor) and t.dim() == 3), None)
    if not isinstance(logits, torch.Tensor):
        raise InputError(f"stream-bp: the model returns a {type(out).__name__} without logits",
                         "return the logits (batch x seq x vocab), a ModelOutput with .logits, or "
                         "a tuple holding them")
    return logits


def logits_node(gm: fx.GraphModule) -> fx.Node:
    """The graph output holding the logits: of a flattened ModelOutput or tuple, the
    first batch x seq x vocab tensor (as :func:`logits_of` picks it)."""
    output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    if isinstance(output, (list, tuple)):
        output = next((o for o in output if shape_of(o) is not None and len(shape_of(o)) == 3), output[0])
    return output


def logits_only(gm: fx.GraphModule) -> None:
    """Make ``gm`` return its logits alone, as a 1-tuple without the pytree output spec
    (a saved program then loads without the model's output class, e.g. transformers')."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = ((logits_node(gm),),)
    gm.graph.set_codegen(fx.graph.CodeGen())
    gm.graph.eliminate_dead_code()
    gm.recompile()


@dataclass
class SegmentPrograms:
    """A segment's chunk program, and the program computing the keys/values its causal
    attentions read (all rows 0:e per chunk: computed once per layer, not per chunk)."""

    main: ChunkProgram
    kv: ChunkProgram | None
    stash: list[fx.Node]


_STASH_THROUGH = {aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                  aten.unsqueeze.default, aten.expand.default, aten.transpose.int,
                  aten.permute.default, aten.clone.default, aten.contiguous.default,
                  aten.alias.default}


def _stash_point(node: fx.Node, members: set[fx.Node], axes_of: dict) -> fx.Node:
    """The earliest tensor a key/value operand is a view of (before a grouped-query
    expansion or a transpose), so the stash holds each key once."""
    while node.target in _STASH_THROUGH and node.args[0] in members:
        ax = axes_of.get(node.args[0]) or {}
        if not isinstance(ax, dict) or list(ax.values()) != [(1, 1)]:
            break
        node = node.args[0]
    return node


def stashed_keys_values(seg: Segment, infos: dict, axes_of: dict) -> list[fx.Node]:
    out: list[fx.Node] = []
    members = set(seg.nodes)
    for node in seg.nodes:
        info = infos[node]
        if node.target is SDPA and info.kind == CAUSAL:
            a = sdpa_args(node)
            kv = [a["key"], a["value"]]
        elif info.probs_of is not None:  # P @ V, and the Q @ K^T of its softmax
            scores, _, _ = score_path(info.probs_of, members, axes_of)
            kv = [_stash_point(key_operand(n), members, axes_of) for n in scores] + \
                [_stash_point(node.args[1], members, axes_of)]
        else:
            continue
        out += [t for t in kv if t in members and t not in out]
    return out


@dataclass
class Plan:
    """Everything derived from one capture (one input shape)."""

    graph: Graph
    T: int
    segments: list[Segment]
    programs: list[SegmentPrograms]
    seq_axis: dict[fx.Node, int]
    kinds: dict[str, int] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        return {"segments": [s.name for s in self.segments], "seq_len": self.T,
                "op_kinds": self.kinds}


def capture(wrapper: LogitsOf, inputs: dict[str, torch.Tensor], chunk: int,
            fixed_inputs: bool = False) -> Plan:
    """``fixed_inputs``: every call uses these mask values (an all-ones mask the API
    made up), so a mask found to be exactly causal may be replaced by ``is_causal``."""
    args = tuple(inputs.values())
    try:
        ep = torch.export.export(wrapper, args, strict=False)
    except Exception as exc:  # export failures are the model's, not ours
        raise InputError(f"stream-bp: torch.export could not capture the model: "
                         f"{str(exc).splitlines()[0]}",
                         "the model must be exportable with torch.export") from None
    graph = Graph.from_exported_program(ep, args, source=type(wrapper.model).__name__)
    native_gqa(graph.gm)
    return analyse(graph, wrapper, chunk, drop_causal_masks=fixed_inputs)


def _repeated_heads(node: fx.Node) -> tuple[fx.Node, int] | None:
    """``(x, n)`` when ``node`` is x's heads each repeated ``n`` times, the way
    transformers' ``repeat_kv`` builds it: ``x[:, :, None].expand(B, H, n, T, D)``
    reshaped to ``B x H*n x T x D`` (head h reads head h // n of x)."""
    if node.target not in (aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        return None
    expand = node.args[0]
    if not isinstance(expand, fx.Node) or expand.target is not aten.expand.default:
        return None
    src = expand.args[0]
    while isinstance(src, fx.Node) and _is_full_slice(src):
        src = src.args[0]
    if not isinstance(src, fx.Node) or src.target is not aten.unsqueeze.default or src.args[1] != 2:
        return None
    x = src.args[0]
    while isinstance(x, fx.Node) and _is_full_slice(x):
        x = x.args[0]
    xs, es, out = shape_of(x), shape_of(expand), shape_of(node)
    if xs is None or es is None or out is None or len(xs) != 4 or len(es) != 5:
        return None
    B, H, T, D = xs
    n = es[2]
    if list(es) != [B, H, n, T, D] or list(out) != [B, H * n, T, D]:
        return None
    return x, n


def _is_full_slice(node: fx.Node) -> bool:
    if node.target is not aten.slice.Tensor:
        return False
    a = list(node.args) + [None] * (5 - len(node.args))
    dim, start, end, step = (a[1] or 0), (a[2] or 0), a[3], (a[4] or 1)
    size = shape_of(node.args[0])
    return (size is not None and isinstance(end, int) and start == 0 and step == 1
            and end >= size[dim])


def native_gqa(gm: fx.GraphModule) -> None:
    """Grouped-query attention written as SDPA over repeated key/value heads ->
    SDPA with ``enable_gqa=True`` on the unrepeated ones (the same result: query head h
    attends with key/value head h // n). Chunks then stash, slice and backpropagate the
    keys/values once per kv head instead of n times, and the CPU flash kernel reads
    them in place; the repeat copies are gone from the forward too."""
    changed = False
    for node in gm.graph.nodes:
        if node.target is not SDPA:
            continue
        a = sdpa_args(node)
        if a["enable_gqa"]:
            continue
        k, v = _repeated_heads(a["key"]), _repeated_heads(a["value"])
        if k is None or v is None or k[1] != v[1]:
            continue
        node.args = (a["query"], k[0], v[0], *node.args[3:])
        node.kwargs = {**node.kwargs, "enable_gqa": True}
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()


def _where(node: fx.Node, strip: str) -> str:
    """A node's module path as the user names it (without the capture wrapper's prefix)."""
    path = module_path(node)
    if strip and (path == strip or path.startswith(strip + ".")):
        path = path[len(strip) + 1:]
    return path or "<root>"


def trainable_targets(gm: fx.GraphModule, live: nn.Module) -> set[str]:
    params = dict(live.named_parameters(remove_duplicate=False))
    return {str(n.target) for n in gm.graph.nodes
            if n.op == "get_attr" and str(n.target) in params and params[str(n.target)].requires_grad}


def analyse(graph: Graph, live: nn.Module, chunk: int, trainable: set[str] | None = None,
            drop_causal_masks: bool = False) -> Plan:
    """Classify, partition and build chunk programs; raise naming the op that blocks it.

    ``trainable``: get_attr targets that get gradients (default: the parameters of
    ``live`` with ``requires_grad``)."""
    gm = graph.gm
    strip = "model" if isinstance(live, LogitsOf) else ""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    seq_inputs = {n.name: 1 for n in placeholders if shape_of(n) is not None and len(shape_of(n)) == 2
                  and not n.meta["val"].dtype.is_floating_point}
    if not seq_inputs:
        raise PassError("stream-bp: the model has no token input (an integer batch x seq tensor)",
                        "stream-bp applies to causal language models taking token ids")
    axes_of, infos, T = track(gm, seq_inputs)
    trainable = trainable_targets(gm, live) if trainable is None else trainable
    grad = gradient_nodes(gm, trainable)
    output = logits_node(gm)
    kinds: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node in grad and node.op == "call_function":
            info = infos[node]
            kinds[info.kind] = kinds.get(info.kind, 0) + 1
            if info.kind in (GLOBAL, OPAQUE):
                where = _where(node, strip)
                raise PassError(f"stream-bp: {op_name(node)} at {where} {info.reason or 'mixes tokens'}",
                                "stream-bp needs ops that are token-wise or causal along the sequence")
    out_axes = axes_of.get(output) or {}
    if len(out_axes) != 1 or list(out_axes.values())[0] != (1, 1):
        raise PassError("stream-bp: the model output has no single sequence axis",
                        "the model must return logits shaped batch x seq x vocab")
    segments = partition(gm, grad, output)
    if output not in segments[-1].outputs:
        raise PassError("stream-bp: the logits are not computed after the last layer",
                        "the model must end with its LM head")
    names = [p.name for p in placeholders]
    example = dict(zip(names, graph.example_inputs))

    def check_masks() -> set[fx.Node]:
        return AttentionMasks(gm, grad, infos, axes_of, T, chunk, example, lambda n: _where(n, strip),
                              drop_causal_masks).check()

    exact = check_masks()
    if drop_causal_masks and exact:
        _use_is_causal(gm, exact)
        axes_of, infos, T = track(gm, seq_inputs)
        check_masks()
    for seg in segments:
        if strip and seg.name.startswith(strip + "."):
            seg.name = seg.name[len(strip) + 1:]
    seq_axis: dict[fx.Node, int] = {}
    programs = []

    def rows_of(nodes: list[fx.Node]) -> list[tuple[fx.Node, dict]]:
        outs = []
        for o in nodes:
            ax = axes_of.get(o) or {}
            if len(ax) != 1 or list(ax.values())[0] != (1, 1):
                raise PassError(f"stream-bp: {op_name(o)} at {_where(o, strip)} crosses a layer "
                                "boundary without a single sequence axis",
                                "layers must pass batch x seq x hidden tensors")
            seq_axis[o] = next(iter(ax))
            outs.append((o, {seq_axis[o]: ("s", "e")}))
        return outs

    for seg in segments:
        stash = stashed_keys_values(seg, infos, axes_of)
        main = chunk_program.build(gm, seg.inputs + stash, rows_of(seg.outputs), trainable,
                                   infos, axes_of, T)
        kv = chunk_program.build(gm, seg.inputs, rows_of(stash), trainable, infos, axes_of, T) \
            if stash else None
        programs.append(SegmentPrograms(main, kv, stash))
    return Plan(graph, T, segments, programs, seq_axis, kinds)


def _use_is_causal(gm: fx.GraphModule, masks: set[fx.Node]) -> None:
    """SDPA with a mask equal to the causal one -> ``is_causal=True`` and no mask, so
    chunks run the mask-free kernel and the mask is never built."""
    for node in gm.graph.nodes:
        if node.target is SDPA and sdpa_args(node)["attn_mask"] in masks:
            a = sdpa_args(node)
            node.args = (a["query"], a["key"], a["value"])
            node.kwargs = {"is_causal": True, **({"scale": a["scale"]} if a["scale"] is not None else {}),
                           **({"enable_gqa": True} if a["enable_gqa"] else {})}
    gm.graph.eliminate_dead_code()


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels[:, t+1] at position t; the last position predicts nothing."""
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, :-1] = labels[:, 1:]
    return out


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """Cross entropy in at least fp32 (half-precision logits lose the normaliser)."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Reference loss: mean next-token cross entropy over valid shifted labels."""
    target = shifted_labels(labels)
    count = (target != IGNORE_INDEX).sum().clamp(min=1)
    loss = F.cross_entropy(_upcast(logits.reshape(-1, logits.shape[-1])), target.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / count


def _rows(value: torch.Tensor, axis: int, rng: tuple[str, str], s: int, e: int) -> torch.Tensor:
    start = 0 if rng[0] == "0" else s
    end = e if rng[1] == "e" else value.shape[axis]
    return value.narrow(axis, start, end - start)


class _Runner:
    """Calls chunk programs with live inputs; gradient buffers for boundary values."""

    def __init__(self, plan: Plan, live: nn.Module, inputs: dict[str, torch.Tensor]):
        self.plan, self.inputs = plan, inputs
        self.params = dict(live.named_parameters(remove_duplicate=False))
        self.values: dict[fx.Node, torch.Tensor] = {}   # full values, no autograd
        self.grads: dict[fx.Node, torch.Tensor] = {}    # full gradient buffers

    def call(self, prog: ChunkProgram, s: int, e: int, track: bool,
             rows: list | None = None) -> tuple[tuple, list]:
        """Run rows [s, e); with ``track``, boundary rows become leaves whose gradients
        are added to the buffers by :meth:`collect`. ``rows``: the boundary rows given
        (already leaves of the caller's), instead of read from the stored values."""
        if rows is not None:
            return prog(s, e, rows, [self.inputs[n] for n in prog.user_inputs],
                        [self.params[p] for p in prog.params]), []
        leaves = []
        args = []
        for b, rng in zip(prog.boundary, prog.boundary_ranges):
            x = _rows(self.values[b], self.plan.seq_axis[b], rng, s, e)
            if track:
                x = x.detach().requires_grad_()
                leaves.append((b, rng, x))
            args.append(x)
        outs = prog(s, e, args, [self.inputs[n] for n in prog.user_inputs],
                    [self.params[p] for p in prog.params])
        return outs, leaves

    def collect(self, leaves: list, s: int, e: int) -> None:
        for b, rng, x in leaves:
            if x.grad is None:
                continue
            if b not in self.grads:
                self.grads[b] = torch.zeros_like(self.values[b])
            _rows(self.grads[b], self.plan.seq_axis[b], rng, s, e).add_(x.grad)

    def stash(self, seg_progs: SegmentPrograms) -> None:
        """Keys/values of every row, once per layer; a copy when they are views of a
        larger tensor (a fused qkv projection), so the rest of it can be freed."""
        if seg_progs.kv is None:
            return
        with torch.no_grad():
            for node, v in zip(seg_progs.stash, self.call(seg_progs.kv, 0, self.plan.T, False)[0]):
                if v.untyped_storage().nbytes() > v.numel() * v.element_size():
                    v = v.clone()
                self.values[node] = v

    def full(self, seg_progs: SegmentPrograms) -> tuple:
        self.stash(seg_progs)
        with torch.no_grad():
            return self.call(seg_progs.main, 0, self.plan.T, False)[0]

    def backward_chunks(self, prog: ChunkProgram, outputs: list[fx.Node], chunk: int) -> None:
        T = self.plan.T
        out_grads = [self.grads.pop(o, None) for o in outputs]
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            outs, leaves = self.call(prog, s, e, True)
            pairs = [(y, g.narrow(self.plan.seq_axis[o], s, e - s))
                     for y, g, o in zip(outs, out_grads, outputs) if g is not None and y.requires_grad]
            if pairs:
                torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
            self.collect(leaves, s, e)
            del outs, leaves, pairs


def run_step(plan: Plan, live: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor,
             chunk: int, logits_chunk: int, normalizer: float | torch.Tensor) -> torch.Tensor:
    """Forward + chunked backward; gradients accumulate in the live parameters' ``.grad``.

    When the head reads only the last segment's outputs, row for row, the last segment
    is not run in the forward: its rows are computed once, with autograd, chunk by
    chunk right before the head's rows that need them (one layer forward less than
    recompute-everything, and its outputs are never stored whole)."""
    target = shifted_labels(labels)
    run = _Runner(plan, live, inputs)
    fused = _head_reads_last_rows(plan)
    before_head = len(plan.segments) - (2 if fused else 1)
    for seg, progs in zip(plan.segments[:before_head], plan.programs[:before_head]):
        for o, v in zip(seg.outputs, run.full(progs)):
            run.values[o] = v
        for node in progs.stash:
            run.values.pop(node, None)  # recomputed when this layer's backward runs
    total = torch.zeros((), dtype=torch.float64)

    def head_loss(args: list, s: int, e: int) -> None:
        nonlocal total
        (logits,), leaves = run.call(plan.programs[-1].main, s, e, True, args)
        part = F.cross_entropy(_upcast(logits.reshape(-1, logits.shape[-1])),
                               target[:, s:e].reshape(-1), ignore_index=IGNORE_INDEX,
                               reduction="sum") / normalizer
        if part.requires_grad:
            part.backward()
        run.collect(leaves, s, e)
        total += part.detach().double()

    if fused:
        _fused_last_segment(run, plan, chunk, logits_chunk, head_loss)
        rest = zip(reversed(plan.segments[:-2]), reversed(plan.programs[:-2]))
    else:
        run.stash(plan.programs[-1])  # attention in the head's own segment (a model without layers)
        for s in range(0, plan.T, logits_chunk):
            head_loss(None, s, min(plan.T, s + logits_chunk))
        _stash_backward(run, plan.programs[-1], chunk)
        rest = zip(reversed(plan.segments[:-1]), reversed(plan.programs[:-1]))
    for seg, progs in rest:
        run.stash(progs)
        # The prologue (embedding lookup, positions) keeps nothing per row but its output,
        # whose gradient is already held whole: one backward instead of one per chunk (an
        # embedding's backward writes a dense vocabulary x width gradient each time).
        whole = seg is plan.segments[0] and progs.kv is None
        run.backward_chunks(progs.main, seg.outputs, plan.T if whole else chunk)
        for node in seg.outputs:
            run.values.pop(node, None)
        _stash_backward(run, progs, chunk)
    return total


def _head_reads_last_rows(plan: Plan) -> bool:
    """The head reads rows [s, e) of the last segment's outputs and nothing else."""
    if len(plan.segments) < 2 or plan.programs[-1].kv is not None:
        return False
    head, last = plan.programs[-1].main, plan.segments[-2]
    return all(b in last.outputs and rng == ("s", "e") for b, rng in zip(head.boundary, head.boundary_ranges))


def _fused_last_segment(run: _Runner, plan: Plan, chunk: int, logits_chunk: int, head_loss) -> None:
    """Rows [s, e) of the last segment with autograd, the head and loss on them
    ``logits_chunk`` rows at a time (their gradients collected on detached copies of the
    segment's outputs), then the segment's backward for those rows."""
    seg, progs = plan.segments[-2], plan.programs[-2]
    head = plan.programs[-1].main
    run.stash(progs)
    T = plan.T
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        outs, leaves = run.call(progs.main, s, e, True)
        rows = dict(zip(seg.outputs, (o.detach().requires_grad_() for o in outs)))
        for hs in range(s, e, logits_chunk):
            he = min(e, hs + logits_chunk)
            head_loss([rows[b].narrow(plan.seq_axis[b], hs - s, he - hs) for b in head.boundary], hs, he)
        pairs = [(y, rows[o].grad) for y, o in zip(outs, seg.outputs)
                 if y.requires_grad and rows[o].grad is not None]
        if pairs:
            torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
        run.collect(leaves, s, e)
        del outs, leaves, rows, pairs
    _stash_backward(run, progs, chunk)


def _stash_backward(run: _Runner, progs: SegmentPrograms, chunk: int) -> None:
    """The stashed keys/values' gradients, back to the segment's inputs."""
    if progs.kv is not None:
        for node in progs.stash:
            run.values.pop(node)
        run.backward_chunks(progs.kv, progs.stash, chunk)


def default_chunk(T: int, chunk: int | None, n_chunks: int | None) -> int:
    if chunk is not None:
        return max(1, int(chunk))
    return max(1, math.ceil(T / (n_chunks or 4)))

"""nm-sparsity: N:M structured sparsity (keep n of every m weights along the reduction dim).

Two ways to get there:

- ``mode=oneshot`` (default): magnitude pruning now. Each eligible conv/linear weight W
  becomes ``W * nm_mask(|W|)`` (exact zeros, same parameter name); biases are untouched.
- ``mode=srste | pgf-mask | pgf-structure``: training-time rules (SR-STE, Progressive
  Gradient Flow) are installed on the graph (``training.insert_training_rewrites``); after
  training, the ``nm-finalize`` pass bakes the final masks into the weights. PGF mask
  decay's β decays exponentially by default (``decay=exp``; ``decay=linear`` is the other
  choice): why is in ``training``'s docstring, the measurements in BENCHMARKS.md.

Either way, each sparsified layer node is annotated (``sparsity``, ``density``, shown by
``gradrewrite inspect``), ``graph.meta["nm_sparsity"][param]`` keeps the mask, and a
JSON summary goes to ``graph.meta["export_metadata"]["nm_sparsity"]`` (written into the
artifact by the backends). Grouping follows ``rewrite/nm_masks.py``: linear groups run along input
features, conv groups along input channels at each kernel position. Compressed storage
is in ``rewrite/nm_storage.py`` (shared with the backends); the GPU 2:4 path in ``semi_structured.py``.

Eligible layers: conv1d/2d/3d (not transposed) and linear (``aten.linear``; ``addmm`` of
a transposed weight in oneshot mode) whose weight is a stored weight used by that layer
only, with ``K`` (input features, or input channels per group) ``>= m``; ``K % m != 0``
(for pgf-structure: K not a multiple of every stage's m) is skipped or padded per
``on_indivisible``, in every mode. The training rules get ``LayerRef.path`` = the
weight's parameter path (``fc.weight``), which is also the key of every record here.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ...errors import ConfigError
from ...rewrite.graph import Graph, module_path, op_name
from ...rewrite.registry import PassContext, PassResult, register_pass
from ...rewrite.selectors import Selector
from ...rewrite.nm_masks import index_bits, nm_mask
from ...rewrite.nm_storage import VALUE_DTYPES, layer_bits_per_weight

aten = torch.ops.aten

MODES = ("oneshot", "srste", "pgf-mask", "pgf-structure")
TRAINING_MODES = MODES[1:]
DECAYS = ("linear", "exp")
GRADIENTS = ("pass-through", "chain-rule")
ON_INDIVISIBLE = ("skip", "pad")

_CONV_TARGETS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
                 aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding,
                 aten.convolution.default)
_LINEAR_TARGETS = (aten.linear.default, aten.addmm.default)
_TRANSPOSES = (aten.t.default, aten.permute.default, aten.transpose.int)


# ---------------------------------------------------------------------------- layers
@dataclass
class NMLayer:
    """One eligible layer: its compute node, its weight's get_attr node and grouping."""

    node: fx.Node
    weight_node: fx.Node
    kind: str            # "linear" | "conv"
    path: str            # module path of the layer (``features.0``)
    param: str           # the weight's attribute path (``features.0.weight``)
    shape: tuple[int, ...]
    pad: bool = False    # K % m != 0, tail groups padded


def _layer_kind(node: fx.Node) -> str | None:
    if node.target in _CONV_TARGETS:
        return "conv"
    if node.target in _LINEAR_TARGETS:
        return "linear"
    return None


def _weight_of(node: fx.Node) -> tuple[fx.Node | None, str | None]:
    """The get_attr node holding this layer's ``[out, in, ...]`` weight, or a reason."""
    if node.target == aten.addmm.default:      # addmm(bias, x, t(W))
        arg = node.args[2] if len(node.args) > 2 else None
        if not (isinstance(arg, fx.Node) and arg.target in _TRANSPOSES and len(arg.users) == 1
                and isinstance(arg.args[0], fx.Node) and arg.args[0].op == "get_attr"):
            return None, "addmm whose weight is not a transposed stored weight"
        if arg.target == aten.permute.default and list(arg.args[1]) != [1, 0]:
            return None, "addmm whose weight is permuted, not transposed"
        return arg.args[0], None
    arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    if not isinstance(arg, fx.Node):
        return None, "weight is not a tensor"
    if arg.op != "get_attr":
        return None, f"weight is computed by {op_name(arg)}, not a stored weight"
    return arg, None


def _display_path(node: fx.Node, weight_node: fx.Node | None) -> str:
    path = module_path(node)
    if path:
        return path
    return str(weight_node.target) if weight_node is not None else node.name


def find_layers(graph: Graph, select: str, exclude: str, n: int, m: int,
                on_indivisible: str = "skip", *, stage_ms: tuple[int, ...] = (),
                training: bool = False,
                what: str = "nm-sparsity") -> tuple[list[NMLayer], list[dict[str, str]]]:
    """Eligible layers among those ``select`` picks, and ``{"path", "reason"}`` for the
    conv/linear layers it picks but leaves dense. ``stage_ms``: other group sizes K
    must divide (pgf-structure stages); ``training``: the weight must be a direct
    argument of the layer. Raises ConfigError when the selector matches nothing or
    nothing it matches is eligible."""
    chosen = Selector.parse(select).select(graph, what=what)
    excludes = tuple(g.strip() for g in exclude.split("|") if g.strip())
    attr_nodes: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            attr_nodes.setdefault(str(node.target), []).append(node)

    layers: list[NMLayer] = []
    skipped: list[dict[str, str]] = []
    candidates = 0
    for node in chosen:
        kind = _layer_kind(node)
        if kind is None:
            continue                                  # not a conv/linear: not ours
        candidates += 1
        w_node, reason = _weight_of(node)
        path = _display_path(node, w_node)
        hit = next((g for g in excludes if fnmatch.fnmatchcase(path, g)), None)
        if hit is not None:
            reason = f"excluded by {hit!r}"
        elif reason is None:
            reason = _check(graph, node, w_node, kind, n, m, on_indivisible, attr_nodes,
                            stage_ms, training)
        if reason is not None:
            skipped.append({"path": path, "reason": reason})
            continue
        w = graph.attr(w_node)
        k = int(w.shape[1])
        layers.append(NMLayer(node, w_node, kind, path, str(w_node.target), tuple(w.shape),
                              pad=any(k % mm for mm in {m, *stage_ms})))
    if not layers:
        if not candidates:
            raise ConfigError(
                f"selector {select!r} for {what} matches {len(chosen)} node(s) but no conv or "
                "linear layer", "select conv/linear layers, e.g. select='op:linear|conv'")
        reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:6])
        more = f" (and {len(skipped) - 6} more)" if len(skipped) > 6 else ""
        raise ConfigError(f"no layer is eligible for {n}:{m} sparsity: {reasons}{more}",
                          "change select/exclude, pick an m dividing the layers' input size, "
                          "or use on_indivisible=pad")
    return layers, skipped


def _check(graph: Graph, node: fx.Node, w_node: fx.Node, kind: str, n: int, m: int,
           on_indivisible: str, attr_nodes: dict[str, list[fx.Node]],
           stage_ms: tuple[int, ...], training: bool) -> str | None:
    if node.target == aten.convolution.default and len(node.args) > 6 and node.args[6]:
        return "transposed convolution"
    if training and node.target == aten.addmm.default:
        return "addmm reads its weight through a transpose; the training rules need it direct"
    users = {u for a in attr_nodes.get(str(w_node.target), [w_node]) for u in a.users}
    consumer = node.args[2] if node.target == aten.addmm.default else node   # addmm: t(W)
    if users != {consumer}:
        return "weight shared with another layer"
    w = graph.attr(w_node)
    if not isinstance(w, torch.Tensor) or not w.dtype.is_floating_point:
        return f"weight dtype {getattr(w, 'dtype', type(w).__name__)} is not floating point"
    if kind == "linear" and w.dim() != 2:
        return f"linear weight is {w.dim()}-D, not 2-D"
    if kind == "conv" and w.dim() < 3:
        return f"conv weight is {w.dim()}-D"
    k = int(w.shape[1])
    if kind == "conv" and k < m:
        groups = _conv_groups(node)
        what = "conv" if groups == 1 else ("depthwise conv" if k == 1 else f"grouped conv (groups={groups})")
        return f"{what}: K={k} input channels per group is fewer than m={m}"
    if k < m:
        return f"K={k} input features is fewer than m={m}"
    bad = [mm for mm in dict.fromkeys((m, *stage_ms)) if k % mm]
    if bad and on_indivisible == "skip":
        which = f"m={bad[0]}" if bad[0] == m else f"the schedule's m={bad[0]}"
        return f"K={k} is not a multiple of {which} (on_indivisible=pad pads the last group)"
    return None


def _conv_groups(node: fx.Node) -> int:
    if node.target == aten.convolution.default:
        return int(node.args[8]) if len(node.args) > 8 else 1
    return int(node.args[6]) if len(node.args) > 6 else int(node.kwargs.get("groups", 1))


# ---------------------------------------------------------------------------- records
def _bits(shape: tuple[int, ...], n: int, m: int, kind: str) -> dict[str, float]:
    return {vd: round(layer_bits_per_weight(shape, n, m, kind, vd), 6) for vd in VALUE_DTYPES}


def record_layer(graph: Graph, layer: NMLayer, mask: torch.Tensor, n: int, m: int) -> dict[str, Any]:
    """Annotate a sparsified layer, keep its mask and export summary; its report entry."""
    w = graph.attr(layer.weight_node)
    density = float((w != 0).sum()) / max(1, w.numel())
    ratio = f"{n}:{m}"
    layer.node.meta.setdefault("gradrewrite", {}).update(
        {"sparsity": ratio, "density": round(density, 4)})
    graph.meta.setdefault("nm_sparsity", {})[layer.param] = {
        "n": n, "m": m, "kind": layer.kind, "shape": list(layer.shape),
        "mask": mask.detach().bool().cpu().clone()}
    bits = _bits(layer.shape, n, m, layer.kind)
    entry = {"path": layer.path, "weight": layer.param, "kind": layer.kind,
             "shape": list(layer.shape), "n": n, "m": m, "density": round(density, 6),
             "padded": layer.pad, "bits_per_weight": bits}
    graph.meta.setdefault("export_metadata", {}).setdefault("nm_sparsity", {})[layer.param] = {
        "module": layer.path, "n": n, "m": m, "kind": layer.kind, "shape": list(layer.shape),
        "density": round(density, 6), "padded": layer.pad, "bits_per_weight": bits,
        "index_bits": index_bits(m),
        "groups_along": "input features" if layer.kind == "linear"
        else "input channels at each kernel position ([out, *k, in/groups] order)"}
    return entry


MASK_FILE = "nm_masks.npz"


def export_masks(graph: Graph) -> None:
    """Ship every layer's mask with the artifact: ``nm_masks.npz`` holds, per weight
    path, ``np.packbits`` of the boolean mask (C order) and its shape, so a consumer
    recovers the exact pattern even where a kept weight happens to be 0.0."""
    import io

    import numpy as np

    arrays = {}
    for param, info in graph.meta.get("nm_sparsity", {}).items():
        mask = info["mask"].numpy()
        arrays[f"{param}.bits"] = np.packbits(mask.reshape(-1))
        arrays[f"{param}.shape"] = np.asarray(mask.shape, dtype=np.int64)
    if not arrays:
        return
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    graph.meta.setdefault("export_files", {})[MASK_FILE] = buf.getvalue()


def load_masks(path: str) -> dict[str, torch.Tensor]:
    """Read an artifact's ``nm_masks.npz`` back into boolean masks."""
    import numpy as np

    data = np.load(path, allow_pickle=False)
    out = {}
    for key in data.files:
        if key.endswith(".bits"):
            param = key[: -len(".bits")]
            shape = tuple(int(v) for v in data[f"{param}.shape"])
            bits = np.unpackbits(data[key], count=int(np.prod(shape))).astype(bool)
            out[param] = torch.from_numpy(bits.reshape(shape))
    return out


def make_report(mode: str, n: int, m: int, entries: list[dict[str, Any]],
                skipped: list[dict[str, str]], **extra: Any) -> dict[str, Any]:
    numels = [_numel(e["shape"]) for e in entries]
    total = sum(numels)
    nonzero = sum(e["density"] * c for e, c in zip(entries, numels))
    compressed = {vd: round(sum(e["bits_per_weight"][vd] * c for e, c in zip(entries, numels))
                            / max(1, total), 6) for vd in VALUE_DTYPES}
    return {"mode": mode, "n": n, "m": m, **extra, "layers": entries, "skipped": skipped,
            "totals": {"sparsified_params": total,
                       "density": round(nonzero / max(1, total), 6),
                       "dense_bits_per_weight": {vd: float(b) for vd, (_, b) in VALUE_DTYPES.items()},
                       "compressed_bits_per_weight": compressed}}


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def parse_schedule(text: str) -> tuple[tuple[int, int], ...]:
    """``"7:8|4:8|2:8"`` -> ``((7, 8), (4, 8), (2, 8))``; ConfigError if malformed."""
    stages = []
    for item in (s.strip() for s in str(text).split("|")):
        a, colon, b = item.partition(":")
        try:
            stage = (int(a), int(b)) if colon else None
        except ValueError:
            stage = None
        if stage is None or not 0 < stage[0] < stage[1]:
            raise ConfigError(f"bad schedule stage {item!r} in schedule={text!r}",
                              "write stages as N:M with 0 < N < M, separated by |, e.g. 7:8|4:8|2:8")
        stages.append(stage)
    return tuple(stages)


# ---------------------------------------------------------------------------- passes
@register_pass("nm-sparsity")
@dataclass(frozen=True)
class NMSparsity:
    """N:M structured sparsity: keep n of every m weights (magnitude one-shot, or SR-STE /
    PGF training rules finished by nm-finalize)."""

    n: int = field(default=2, metadata={"help": "weights kept per group"})
    m: int = field(default=4, metadata={"help": "group size along the reduction dim"})
    select: str = field(default="op:linear|conv", metadata={"help": "layers to sparsify (selector)"})
    exclude: str = field(default="", metadata={
        "help": "module-path globs to leave dense, separated by | (e.g. 'classifier|head')"})
    mode: str = field(default="oneshot", metadata={
        "help": "oneshot | srste | pgf-mask | pgf-structure"})
    on_indivisible: str = field(default="skip", metadata={
        "help": "K not a multiple of m: skip the layer, or pad its last group"})
    srste_lambda: float = field(default=2e-4, metadata={"help": "SR-STE decay of pruned weights"})
    decay: str = field(default="exp", metadata={
        "help": "pgf-mask beta(t) decay: exp (default; see the module docstring) | linear"})
    decay_rate: float = field(default=0.0, metadata={
        "help": "pgf-mask beta decay rate a (0: derived from decay_steps)"})
    schedule: str = field(default="", metadata={
        "help": "pgf-structure stages, e.g. '7:8|4:8|2:8|1:8' (empty: derived)"})
    warmup_steps: int = field(default=0, metadata={"help": "dense steps before sparsifying"})
    decay_steps: int = field(default=1000, metadata={
        "help": "steps of the decay / schedule (0: straight to the fixed mask)"})
    gradient: str = field(default="pass-through", metadata={
        "help": "pgf-mask gradient: pass-through | chain-rule"})
    mask_interval: int = field(default=1, metadata={"help": "steps between mask updates"})

    exact = False   # lossy: verification measures the change but does not fail on it

    def __post_init__(self) -> None:
        n, m = self.n, self.m
        if m < 2:
            raise ConfigError(f"m={m} is too small", "use m >= 2 (e.g. n=2, m=4)")
        if n < 1:
            raise ConfigError(f"n={n} keeps no weight", "use 1 <= n < m (e.g. n=2, m=4)")
        if n >= m:
            raise ConfigError(f"n={n} must be smaller than m={m}",
                              "n:m keeps n of every m weights; use e.g. n=2, m=4")
        for key, value, valid in (("mode", self.mode, MODES), ("decay", self.decay, DECAYS),
                                  ("gradient", self.gradient, GRADIENTS),
                                  ("on_indivisible", self.on_indivisible, ON_INDIVISIBLE)):
            if value not in valid:
                raise ConfigError(f"unknown {key} {value!r} for nm-sparsity",
                                  f"use one of {', '.join(valid)}")
        for key in ("warmup_steps", "decay_steps", "decay_rate", "srste_lambda"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}={getattr(self, key)} is negative", f"give {key} >= 0")
        if self.mask_interval < 1:
            raise ConfigError(f"mask_interval={self.mask_interval} must be >= 1",
                              "give mask_interval >= 1")
        if self.schedule:
            stages = parse_schedule(self.schedule)
            # Density (n/m) must fall; a stage may keep it while changing the structure
            # (8:64|4:32|2:16|1:8), but never raise it or repeat a stage.
            if any(a1 * b2 < a2 * b1 or (a1, b1) == (a2, b2)
                   for (a1, b1), (a2, b2) in zip(stages, stages[1:])):
                raise ConfigError(f"schedule={self.schedule!r} is not decreasing in density",
                                  "each stage keeps at most the fraction (n/m) of the one before, "
                                  "and no stage repeats")
            if stages[-1] != (n, m):
                raise ConfigError(f"schedule={self.schedule!r} does not end at {n}:{m}",
                                  f"make the last stage {n}:{m} (the n, m options)")
        if self.mode in TRAINING_MODES:
            try:
                self.train_config()      # the training rules' own checks, at pipeline build
            except ValueError as exc:
                raise ConfigError(f"bad nm-sparsity training options: {exc}",
                                  "see `gradrewrite passes` for the options") from None

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if graph.meta.get("pending_training"):
            raise ConfigError(f"the graph already has {graph.meta['pending_training']} training "
                              "rewrites installed", "run nm-finalize first")
        training = self.mode in TRAINING_MODES
        stage_ms = tuple(b for _, b in self.train_config().stages()) \
            if self.mode == "pgf-structure" else ()
        layers, skipped = find_layers(graph, self.select, self.exclude, self.n, self.m,
                                      self.on_indivisible, stage_ms=stage_ms, training=training)
        if training:
            return self._install_training(graph, layers, skipped)
        entries = []
        for layer in layers:
            w = graph.attr(layer.weight_node)
            mask = nm_mask(w, self.n, self.m, layer.kind, pad=layer.pad)
            graph.set_attr(layer.weight_node, w * mask)
            entries.append(record_layer(graph, layer, mask, self.n, self.m))
        graph.commit()
        export_masks(graph)
        return PassResult(True, make_report(self.mode, self.n, self.m, entries, skipped))

    def train_config(self) -> Any:
        from .training import NMTrainConfig

        return NMTrainConfig(
            method=self.mode, n=self.n, m=self.m, srste_lambda=self.srste_lambda,
            decay=self.decay, decay_rate=self.decay_rate,
            schedule=parse_schedule(self.schedule) if self.schedule else (),
            warmup_steps=self.warmup_steps, decay_steps=self.decay_steps,
            gradient=self.gradient, mask_interval=self.mask_interval)

    def _install_training(self, graph: Graph, layers: list[NMLayer],
                          skipped: list[dict[str, str]]) -> PassResult:
        from .training import LayerRef, insert_training_rewrites

        cfg = self.train_config()
        # LayerRef.path is the weight's parameter path: unique per layer, and the key
        # finalize() hands back the masks under.
        refs = [LayerRef(path=l.param, layer_node=l.node, weight_node=l.weight_node, kind=l.kind,
                         pad=l.pad) for l in layers]
        # What nm-finalize needs to annotate and report once the masks are final.
        graph.meta["nm_training"] = {
            "mode": self.mode, "n": self.n, "m": self.m,
            "layers": {l.param: {"path": l.path, "kind": l.kind, "shape": list(l.shape),
                                 "pad": l.pad} for l in layers},
            "skipped": skipped}
        insert_training_rewrites(graph, refs, cfg)
        entries = [{"path": l.path, "weight": l.param, "kind": l.kind, "shape": list(l.shape),
                    "n": self.n, "m": self.m, "density": round(self.n / self.m, 6),
                    "padded": l.pad, "bits_per_weight": _bits(l.shape, self.n, self.m, l.kind)}
                   for l in layers]
        report = make_report(self.mode, self.n, self.m, entries, skipped,
                             status="training rewrites installed: train, then run nm-finalize "
                                    "(densities are the targets)")
        return PassResult(True, report)


@register_pass("nm-finalize")
@dataclass(frozen=True)
class NMFinalize:
    """Bake the N:M masks a training mode of nm-sparsity learned into the weights."""

    exact = False   # the dense-weight training rewrites go; masked weights stay

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        info = graph.meta.get("nm_training")
        if graph.meta.get("pending_training") != "nm-sparsity" and \
                getattr(graph.gm, "nm_trainer", None) is None:
            raise ConfigError("nothing to finalize", "run nm-sparsity with a training mode first")
        from .training import finalize

        cfg = getattr(getattr(graph.gm, "nm_trainer", None), "cfg", None)
        if info is None:   # rewrites installed by hand: take the ratio from the trainer
            info = {"mode": getattr(cfg, "method", "training"), "n": getattr(cfg, "n", None),
                    "m": getattr(cfg, "m", None), "layers": {}, "skipped": []}
        n, m = info["n"], info["m"]
        masks = finalize(graph)
        entries = []
        for key, mask in masks.items():
            layer = _layer_after_training(graph, key, info["layers"].get(key), m)
            if layer is None or n is None:
                continue
            entries.append(record_layer(graph, layer, mask, n, m))
        graph.meta.pop("nm_training", None)
        graph.commit()
        export_masks(graph)
        return PassResult(True, make_report(info["mode"], n, m, entries, info["skipped"],
                                            finalized=True))


def _layer_after_training(graph: Graph, key: str, known: dict | None,
                          m: int | None) -> NMLayer | None:
    """The layer whose weight ``key`` (a parameter path) names, once training is gone."""
    attrs = [nd for nd in graph.nodes if nd.op == "get_attr" and str(nd.target) == key]
    if not attrs:   # a helper keyed by module path: find the layer reading its weight
        attrs = [nd for nd in graph.nodes if nd.op == "get_attr"
                 and str(nd.target).rpartition(".")[0] == key and str(nd.target).endswith("weight")]
    for w_node in attrs:
        for user in w_node.users:
            kind = _layer_kind(user)
            if kind is None and user.target in _TRANSPOSES:
                nxt = next(iter(user.users), None)
                user, kind = (nxt, _layer_kind(nxt)) if nxt is not None else (user, None)
            if kind is not None:
                w = graph.attr(w_node)
                k = int(w.shape[1])
                pad = (known or {}).get("pad", bool(m) and k % int(m) != 0)
                return NMLayer(user, w_node, kind, (known or {}).get("path") or module_path(user),
                               str(w_node.target), tuple(w.shape), pad=bool(pad))
    return None


__all__ = ["NMSparsity", "NMFinalize", "NMLayer", "find_layers", "record_layer", "make_report",
           "parse_schedule", "MODES", "TRAINING_MODES"]

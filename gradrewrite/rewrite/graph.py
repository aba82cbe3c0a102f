"""The graph every pass and backend works on.

A ``Graph`` wraps torch.export's ATen-level FX graph in its *unlifted* form: parameters
and buffers are ``get_attr`` nodes on a ``GraphModule`` that keeps the model's module
hierarchy. That form lets a pass add, replace or drop weights by editing attributes,
while node metadata (``nn_module_stack``, ``stack_trace``, ``val``) keeps naming layers
the way the user does. Backends that need an ``ExportedProgram`` re-export the module
(``to_exported_program``), which preserves that metadata.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

aten = torch.ops.aten

# Op families a selector or rule can name instead of listing ATen overloads.
OP_KINDS: dict[str, tuple[Any, ...]] = {
    "conv": (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
             aten.convolution.default, aten.conv1d.padding, aten.conv2d.padding,
             aten.conv3d.padding),
    "conv_transpose": (aten.conv_transpose1d.default, aten.conv_transpose2d.input,
                       aten.conv_transpose3d.input),
    "linear": (aten.linear.default, aten.addmm.default),
    "matmul": (aten.matmul.default, aten.mm.default, aten.bmm.default),
    "batch_norm": (aten.batch_norm.default,
                   aten._native_batch_norm_legit_no_training.default,
                   aten._native_batch_norm_legit_functional.default,
                   aten.native_batch_norm.default),
    "layer_norm": (aten.layer_norm.default, aten.native_layer_norm.default),
    "embedding": (aten.embedding.default,),
    "dropout": (aten.dropout.default, aten.native_dropout.default,
                aten.feature_dropout.default, aten.alpha_dropout.default),
    "attention": (aten.scaled_dot_product_attention.default,),
}
_KIND_OF: dict[Any, str] = {op: kind for kind, ops in OP_KINDS.items() for op in ops}


def op_name(node: fx.Node) -> str:
    """A short, stable name for what a node computes: ``aten.conv2d``, ``getitem``."""
    if node.op != "call_function":
        return node.op
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        name = target._schema.name.replace("::", ".")
        return name if target._overloadname == "default" else f"{name}.{target._overloadname}"
    return getattr(target, "__name__", str(target))


def op_kind(node: fx.Node) -> str:
    """The op family (``conv``, ``linear`` …) or, for other ops, the bare op name."""
    if node.op != "call_function":
        return node.op
    kind = _KIND_OF.get(node.target)
    if kind:
        return kind
    return op_name(node).split(".")[1] if op_name(node).startswith("aten.") else op_name(node)


def module_path(node: fx.Node) -> str:
    """The dotted path of the innermost module that produced ``node`` (``""`` = root).

    For ``get_attr`` nodes this is the owning module of the parameter.
    """
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0]
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # Strict-mode export spells paths as L['self'].features[0]; normalise to features.0.
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path).lstrip(".")
    return path


def module_type(node: fx.Node) -> str:
    """The class name of the innermost module that produced ``node`` (``""`` if none)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    type_ = list(stack.values())[-1][1]
    type_ = type_ if isinstance(type_, str) else getattr(type_, "__qualname__", str(type_))
    return type_.rpartition(".")[2]


def tensor_meta(node: fx.Node) -> tuple[tuple[int, ...] | None, str | None]:
    """(shape, dtype) of a node's value where known; symbolic sizes print as text."""
    val = node.meta.get("val")
    if isinstance(val, (list, tuple)):
        val = val[0] if val and isinstance(val[0], torch.Tensor) else None
    if isinstance(val, torch.Tensor):
        shape = tuple(int(s) if isinstance(s, int) or str(s).isdigit() else str(s)
                      for s in val.shape)
        return shape, str(val.dtype).removeprefix("torch.")
    return None, None


def copy_meta(src: fx.Node, dst: fx.Node, *, keep_val: bool = False) -> None:
    """Give a node a pass created the provenance of the node it replaces."""
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn"):
        if key in src.meta:
            dst.meta[key] = copy.copy(src.meta[key])
    if keep_val and "val" in src.meta:
        dst.meta["val"] = src.meta["val"]


@dataclass(frozen=True)
class InputSpec:
    """Shape and dtype of one user input; ``high`` bounds random integer inputs.

    ``dynamic_batch``: dim 0 is symbolic (``shape[0]`` is then the example batch)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32
    high: int | None = None
    dynamic_batch: bool = False

    def shape_text(self) -> str:
        """``2x3x8x8``, or ``Bx3x8x8`` with a dynamic batch (as --input spells it)."""
        dims = ["B", *map(str, self.shape[1:])] if self.dynamic_batch else list(map(str, self.shape))
        return "x".join(dims)

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.name}: {self.shape_text()}:{dtype}"

    def random(self, generator: torch.Generator, batch: int | None = None) -> torch.Tensor:
        """Seeded random values; ``batch`` replaces dim 0 (of a dynamic-batch input)."""
        shape = (batch, *self.shape[1:]) if batch is not None and self.dynamic_batch else self.shape
        if self.dtype.is_floating_point:
            return torch.randn(shape, generator=generator, dtype=self.dtype)
        if self.dtype == torch.bool:
            return torch.randint(0, 2, shape, generator=generator).bool()
        return torch.randint(0, self.high or 2, shape, generator=generator,
                             dtype=self.dtype)


def is_bn_statistic(node: fx.Node) -> bool:
    """A batch norm's running statistics: buffers, not parameters (not counted as such)."""
    return node.op == "get_attr" and str(node.target).rpartition(".")[2] in _BN_STATISTICS


def _view_key(t: torch.Tensor) -> tuple:
    """Equal for two tensors that are the same view of the same memory."""
    if t.numel() == 0:
        return (id(t),)
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype,
            type(t))


def _deepcopy_keeping_ties(gm: fx.GraphModule) -> fx.GraphModule:
    """``deepcopy`` of a module whose tied weights are distinct tensors over one storage
    (what ``ExportedProgram.module()`` gives a tied LM head): the copies stay tied, so a
    clone saves, counts and trains the shared weight once."""
    memo: dict[int, Any] = {}
    first: dict[tuple, torch.Tensor] = {}
    tensors = [t for _, t in gm.named_parameters(remove_duplicate=False)] + \
        [t for _, t in gm.named_buffers(remove_duplicate=False)]
    for t in tensors:
        if id(t) in memo:
            continue
        key = _view_key(t)
        if key in first:
            memo[id(t)] = memo[id(first[key])]
        else:
            first[key] = t
            memo[id(t)] = copy.deepcopy(t, memo)
    return copy.deepcopy(gm, memo)


def _copy_sharing_weights(gm: fx.GraphModule) -> fx.GraphModule:
    """``deepcopy`` of a module that keeps the very same parameter and buffer tensors."""
    memo: dict[int, Any] = {}
    for _, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        memo[id(t)] = t
    return copy.deepcopy(gm, memo)


_BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class Graph:
    """An ATen FX graph plus what is needed to run, verify and lower it."""

    gm: fx.GraphModule
    inputs: list[InputSpec]
    example_inputs: tuple[torch.Tensor, ...]
    source: str = "<module>"
    meta: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_exported_program(cls, ep: torch.export.ExportedProgram,
                              example_inputs: tuple[torch.Tensor, ...],
                              source: str = "<module>", *, dynamic_batch: bool = False) -> "Graph":
        """``dynamic_batch``: inputs whose dim 0 is symbolic in ``ep`` stay dynamic (by
        default the graph is re-exported at the example shapes)."""
        gm = ep.module()
        # The runtime guard check torch.export adds is not part of the computation.
        for node in list(gm.graph.nodes):
            if node.op == "call_module" and str(node.target).startswith("_guards"):
                gm.graph.erase_node(node)
        _infer_module_paths(gm)
        gm.graph.lint()
        gm.recompile()
        names = [s.arg.name for s in ep.graph_signature.input_specs
                 if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
        dynamic = _dynamic_batch_inputs(ep) if dynamic_batch else set()
        inputs = [InputSpec(name, tuple(t.shape), t.dtype, _int_high(gm, name, t), name in dynamic)
                  for name, t in zip(names, example_inputs)]
        return cls(gm=gm, inputs=inputs, example_inputs=tuple(example_inputs), source=source)

    def clone(self, *, share_weights: bool | None = None) -> "Graph":
        """A deep copy: passes on the clone never touch this graph's weights.

        ``share_weights`` (default: when the weights are memory-mapped files, see
        ``mapped_safetensors``): the copy's nodes and modules are its own but its weight
        tensors are this graph's. Safe because passes bind new tensors (``set_attr``,
        ``add_attr``) and never write weights in place; it keeps a large model in memory once."""
        import warnings

        if share_weights is None:
            share_weights = "mapped_weights" in self.meta
        with warnings.catch_warnings():  # torch pytree deprecation noise from deepcopy
            warnings.simplefilter("ignore", FutureWarning)
            gm = _copy_sharing_weights(self.gm) if share_weights else _deepcopy_keeping_ties(self.gm)
            return Graph(gm=gm, inputs=list(self.inputs),
                         example_inputs=self.example_inputs, source=self.source,
                         meta=copy.deepcopy(self.meta))

    # ---------------------------------------------------------------- reading
    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    @property
    def nodes(self) -> Iterator[fx.Node]:
        return iter(self.gm.graph.nodes)

    def call_nodes(self) -> list[fx.Node]:
        return [n for n in self.gm.graph.nodes if n.op == "call_function"]

    def node_count(self) -> int:
        """Compute nodes: what a user thinks of as the graph's size."""
        return len(self.call_nodes())

    def op_histogram(self) -> dict[str, int]:
        hist: dict[str, int] = {}
        for node in self.call_nodes():
            hist[op_name(node)] = hist.get(op_name(node), 0) + 1
        return dict(sorted(hist.items()))

    def attr(self, node_or_target: fx.Node | str) -> torch.Tensor:
        """The tensor behind a ``get_attr`` node (or dotted attribute path)."""
        target = node_or_target.target if isinstance(node_or_target, fx.Node) else node_or_target
        obj: Any = self.gm
        for part in str(target).split("."):
            obj = getattr(obj, part)
        return obj

    def parameter_count(self) -> int:
        """Values of the weights the graph reads, each shared tensor once: what
        ``sum(p.numel() for p in model.parameters())`` counts, so batch-norm statistics
        (buffers) are left out; weights a pass stores as buffers (int8) still count."""
        seen, total = set(), 0
        for node in self.nodes:
            if node.op == "get_attr" and not is_bn_statistic(node):
                t = self.attr(node)
                if not isinstance(t, torch.Tensor):
                    continue
                key = _view_key(t)  # tied weights may be two tensors over one storage
                if key not in seen:
                    seen.add(key)
                    total += t.numel()
        return total

    def text(self) -> str:
        """The graph as readable text, one node a line, with module paths."""
        lines = [f"# source: {self.source}",
                 f"# inputs: {', '.join(s.describe() for s in self.inputs)}",
                 f"# {self.node_count()} compute nodes"]
        for node in self.nodes:
            shape, dtype = tensor_meta(node)
            where = f"  # {module_path(node)}" if module_path(node) else ""
            ty = f" : {dtype}{list(shape)}" if shape is not None else ""
            if node.op == "placeholder":
                lines.append(f"%{node.name}{ty} = input{where}")
            elif node.op == "get_attr":
                lines.append(f"%{node.name}{ty} = weight[{node.target}]")
            elif node.op == "output":
                lines.append(f"return {_fmt_args(node.args[0])}")
            else:
                lines.append(f"%{node.name}{ty} = {op_name(node)}({_fmt_args(node.args, node.kwargs)}){where}")
        return "\n".join(lines) + "\n"

    # ---------------------------------------------------------------- running
    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor]:
        """Run the graph; outputs are always a flat list of tensors."""
        with torch.no_grad():
            out = self.gm(*args)
        return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]

    def random_inputs(self, seed: int, batch: int | None = None) -> tuple[torch.Tensor, ...]:
        """Seeded inputs of the example shapes (``batch``: dim 0 of dynamic-batch inputs)."""
        gen = torch.Generator().manual_seed(seed)
        return tuple(spec.random(gen, batch) for spec in self.inputs)

    @property
    def dynamic_batch(self) -> bool:
        return any(s.dynamic_batch for s in self.inputs)

    @property
    def example_batch(self) -> int | None:
        """The batch the graph was traced at, when its batch is dynamic."""
        return next((s.shape[0] for s in self.inputs if s.dynamic_batch), None)

    def to_exported_program(self, gm: fx.GraphModule | None = None) -> torch.export.ExportedProgram:
        """Re-export the (rewritten) module, or ``gm``, a backend's view of it with the same
        inputs; metadata survives the round trip, and so does a dynamic batch."""
        from .dynamic_batch import dynamic_shapes

        return torch.export.export(self.gm if gm is None else gm, self.example_inputs, strict=False,
                                   dynamic_shapes=dynamic_shapes([s.dynamic_batch for s in self.inputs]))

    # ---------------------------------------------------------------- editing
    def add_attr(self, name: str, value: torch.Tensor, *, before: fx.Node,
                 parameter: bool = True) -> fx.Node:
        """Add a weight under a unique name next to ``before`` and return its node.

        ``name`` is a dotted path (``features.0.weight_folded``); the owning submodule
        must exist. The new ``get_attr`` node is inserted right before ``before``.
        """
        owner_path, _, leaf = name.rpartition(".")
        owner = self.gm.get_submodule(owner_path) if owner_path else self.gm
        base, i = leaf, 0
        while hasattr(owner, leaf):
            i += 1
            leaf = f"{base}_{i}"
        if parameter:
            owner.register_parameter(leaf, torch.nn.Parameter(value.detach(), requires_grad=False))
        else:
            owner.register_buffer(leaf, value.detach())
        target = f"{owner_path}.{leaf}" if owner_path else leaf
        with self.graph.inserting_before(before):
            node = self.graph.get_attr(target)
        node.meta["val"] = fake_like(value, before)
        return node

    def set_attr(self, node: fx.Node, value: torch.Tensor) -> None:
        """Replace the tensor behind a ``get_attr`` node, keeping its name.

        A new tensor object is bound (never an in-place write), so the model the graph
        was captured from, which may share storage with it, is left untouched.
        """
        owner_path, _, leaf = str(node.target).rpartition(".")
        owner = self.gm.get_submodule(owner_path) if owner_path else self.gm
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(value.detach().clone(), requires_grad=False)
        else:
            owner._buffers[leaf] = value.detach().clone()
        node.meta["val"] = fake_like(value, node)

    def commit(self) -> None:
        """Drop unused weights, check the graph and regenerate its code."""
        for node in list(self.graph.nodes):
            if node.op == "get_attr" and not node.users:
                self.graph.erase_node(node)
        used = {str(n.target) for n in self.graph.nodes if n.op == "get_attr"}
        # Submodules the graph calls (e.g. training rewrites) own their state.
        called = tuple(f"{n.target}." for n in self.graph.nodes if n.op == "call_module")
        for name, _ in list(self.gm.named_parameters(remove_duplicate=False)) + \
                list(self.gm.named_buffers(remove_duplicate=False)):
            if name not in used and not name.startswith(called):
                owner_path, _, leaf = name.rpartition(".")
                owner = self.gm.get_submodule(owner_path) if owner_path else self.gm
                delattr(owner, leaf)
        self.graph.lint()
        self.gm.recompile()


def _dynamic_batch_inputs(ep: torch.export.ExportedProgram) -> set[str]:
    """User inputs whose dim 0 the program keeps symbolic."""
    user = {s.arg.name for s in ep.graph_signature.input_specs
            if s.kind == torch.export.graph_signature.InputKind.USER_INPUT}
    found = set()
    for node in ep.graph.nodes:
        val = node.meta.get("val")
        if (node.op == "placeholder" and node.name in user and isinstance(val, torch.Tensor)
                and val.dim() and not isinstance(val.shape[0], int)):
            found.add(node.name)
    return found


def _infer_module_paths(gm: fx.GraphModule) -> None:
    """Name layers that lack ``nn_module_stack`` (TorchScript, some ONNX graphs) after
    the module owning the weights they consume: ``linear(x, head.weight)`` -> ``head``."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or module_path(node):
            continue
        owners = [str(a.target).rpartition(".")[0] for a in node.all_input_nodes
                  if a.op == "get_attr"]
        if owners and owners[0]:
            node.meta["nn_module_stack"] = {owners[0]: (owners[0], "")}


def fake_like(value: torch.Tensor, near: fx.Node) -> torch.Tensor:
    """A ``meta['val']`` for a new constant, using the graph's fake mode if present."""
    for node in near.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and hasattr(val, "fake_mode"):
            return val.fake_mode.from_tensor(value, static_shapes=True)
    return value.detach().to("meta")


def _int_high(gm: fx.GraphModule, input_name: str, example: torch.Tensor) -> int | None:
    """Upper bound for random integer inputs: the smallest embedding table they index."""
    if example.dtype.is_floating_point or example.dtype == torch.bool:
        return None
    placeholder = next((n for n in gm.graph.nodes
                        if n.op == "placeholder" and n.name == input_name), None)
    bounds = []
    frontier, seen = [placeholder] if placeholder is not None else [], set()
    while frontier:  # follow shape-preserving ops (view, slice, expand) to the lookup
        node = frontier.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if user.target == aten.embedding.default and user.args[1] is node:
                table = user.args[0]
                shape, _ = tensor_meta(table)
                if shape:
                    bounds.append(int(shape[0]))
            elif user.op == "call_function" and op_kind(user) in (
                    "view", "reshape", "slice", "expand", "unsqueeze", "to", "_to_copy",
                    "clone", "contiguous", "select"):
                frontier.append(user)
    if bounds:
        return min(bounds)
    return int(example.max().item()) + 1 if example.numel() else 2


def _fmt_args(args: Any, kwargs: dict | None = None) -> str:
    def fmt(a: Any) -> str:
        if isinstance(a, fx.Node):
            return f"%{a.name}"
        if isinstance(a, (list, tuple)):
            inner = ", ".join(fmt(x) for x in a)
            return f"[{inner}]"
        if isinstance(a, torch.dtype):
            return str(a).removeprefix("torch.")
        return repr(a)
    parts = [fmt(a) for a in (args if isinstance(args, (list, tuple)) else [args])]
    parts += [f"{k}={fmt(v)}" for k, v in (kwargs or {}).items()]
    return ", ".join(parts)


def iter_module_paths(nodes: Iterable[fx.Node]) -> list[str]:
    """Distinct module paths of ``nodes`` in graph order."""
    seen: dict[str, None] = {}
    for node in nodes:
        seen.setdefault(module_path(node), None)
    return list(seen)

"""Training-step capture: forward, loss, backward and the SGD update as ONE fx graph.

How it is built (and why). ``torch.export`` captures the model's forward (ATen, with
``nn_module_stack``). That forward is then replayed by an ``fx.Interpreter`` inside
``make_fx`` (fake tensors), the loss is applied, and ``torch.autograd.grad`` runs:
make_fx records the backward ops the autograd engine executes, exactly as AOTAutograd
builds its joint graph. We do this ourselves rather than call
``torch.export.experimental._export_forward_backward`` because in torch 2.13 that drops
``nn_module_stack`` on every node (selectors could not see layers) and leaves backward
nodes without ``val``; here a pre-hook on every autograd node of the forward points
the tracer's current metadata at the forward node it came from, so each backward node
carries the module path of its layer. The update is emitted by ``emit_update`` after
tracing, so passes (``sparse-update``, ``qas``) can rebuild it.

Representation (consumed by sparse-update, qas, stream-bp, the memory planner and the
microcontroller backend):

- ``graph.gm``: a GraphModule; parameters (and buffers, lifted constants) are
  ``get_attr`` nodes under their module path (``features.3.conv.weight``). SGD momentum
  buffers are ``get_attr`` buffers ``<path>_momentum`` (only when momentum > 0).
- placeholders: the model's inputs, then the labels (``graph.inputs`` lists them).
- outputs: ``(loss, *updated)`` where ``updated`` are the new values of the trained
  parameters, then the new momentum buffers, in ``meta["train_step"]["outputs"]`` order.
  The graph never mutates its weights: one call = one step; ``apply_step`` writes the
  results back so the next call continues training.
- every node's ``meta["custom"]["train_role"]`` is ``forward``, ``loss``, ``backward``
  or ``update``; backward nodes keep the ``nn_module_stack`` of their forward layer.
- update ops that write a parameter or momentum buffer in place (on a device) carry
  ``meta["custom"]["writes"] = <attr>``; the memory planner keeps them out of the arena.
- gradient node of parameter ``p``: named ``<p with _>_grad`` with ``meta["param"] = p``;
  its update node ``<p with _>_new`` (``meta["param"]``, role ``update``).
- ``graph.meta["train_step"]``: ``params`` (path -> {trained, shape, attr, grad, update,
  rows}), ``inputs`` / ``labels`` (placeholder names), ``loss`` (node name), ``outputs``
  (what each output is), ``optimizer`` ({name, lr, momentum}). ``rows`` (None = all)
  is the number of leading output channels a partial-channel update touches.
- ``graph.meta["training"] = True``: inference-only passes and checks skip it.

Batch norm runs with its running statistics (the model is captured in eval mode), as
on-device training with frozen/folded BN does; fold it first with ``fold-bn``.
"""
from __future__ import annotations

import operator
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
import torch.nn as nn
from torch.export.graph_signature import InputKind
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree

from ..errors import InputError
from .graph import Graph, InputSpec, module_path, op_name

aten = torch.ops.aten
LOSSES = ("cross_entropy", "mse")
OPTIMIZERS = ("sgd",)


def _loss_fn(loss: str | Callable) -> Callable:
    if callable(loss):
        return loss
    if loss == "cross_entropy":
        return lambda out, y: nn.functional.cross_entropy(out, y)
    if loss == "mse":
        return lambda out, y: nn.functional.mse_loss(out, y)
    raise InputError(f"unknown loss {loss!r}", f"use one of {', '.join(LOSSES)} or pass a callable")


def default_labels(loss: str, output: torch.Tensor, seed: int = 0) -> InputSpec:
    """Labels matching the model output: class indices for cross-entropy (one per row,
    below the number of classes), a tensor of the output's shape for MSE."""
    if loss == "cross_entropy":
        if output.dim() < 2:
            raise InputError(f"cross_entropy needs a (batch, classes) output, the model returns "
                             f"shape {tuple(output.shape)}", "use --loss mse, or pass --label")
        return InputSpec("labels", (output.shape[0],), torch.int64, int(output.shape[1]))
    return InputSpec("labels", tuple(output.shape), output.dtype)


class _Replay(fx.Interpreter):
    """Replays the exported forward, tagging every autograd node it creates with the
    fx node it came from, so the backward ops traced later inherit its metadata."""

    def __init__(self, gm: fx.GraphModule, hooks: list):
        super().__init__(gm)
        self.hooks = hooks
        self.seen: set[int] = set()

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.op == "call_function":
            meta = {**{k: v for k, v in n.meta.items()
                       if k in ("nn_module_stack", "stack_trace", "source_fn_stack", "torch_fn")},
                    "custom": {"train_role": "backward", "fwd_node": n.name}}
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                    self._tag(t.grad_fn, meta)
        return out

    def _tag(self, fn, meta: dict) -> None:
        stack = [fn]
        while stack:  # autograd nodes created inside this op (composites make several)
            f = stack.pop()
            if f is None or id(f) in self.seen or type(f).__name__ == "AccumulateGrad":
                continue
            self.seen.add(id(f))
            saved: list = []

            def pre(grad_outputs, meta=meta, saved=saved):
                saved.append(fx_traceback.current_meta)
                fx_traceback.current_meta = meta

            def post(grad_inputs, grad_outputs, saved=saved):
                fx_traceback.current_meta = saved.pop()

            self.hooks.append(f.register_prehook(pre))
            self.hooks.append(f.register_hook(post))
            stack.extend(nf for nf, _ in f.next_functions)


def _set_role(role: str) -> None:
    fx_traceback.current_meta = {"custom": {"train_role": role}}


def capture_train_step(model: nn.Module | Graph, loss_fn: str | Callable,
                       example_batch: Sequence[torch.Tensor], optimizer: str = "sgd",
                       lr: float = 0.01, momentum: float = 0.0, *,
                       source: str = "<module>") -> Graph:
    """One explicit training-step graph (see the module docstring).

    ``example_batch`` is the model's inputs followed by the labels. ``model`` may be an
    inference ``Graph`` (e.g. after ``fold-bn``): its module is captured again.
    """
    if optimizer not in OPTIMIZERS:
        raise InputError(f"unknown optimizer {optimizer!r}", f"use one of {', '.join(OPTIMIZERS)}")
    if not lr > 0:
        raise InputError(f"learning rate must be positive, got {lr}", "pass e.g. --lr 0.01")
    if not 0 <= momentum < 1:
        raise InputError(f"momentum must be in [0, 1), got {momentum}", "pass e.g. momentum=0.9")
    if isinstance(model, Graph):
        source = model.source
        model = model.gm
    loss_name = loss_fn if isinstance(loss_fn, str) else getattr(loss_fn, "__name__", "custom")
    loss_fn = _loss_fn(loss_fn)
    batch = tuple(example_batch)
    if len(batch) < 2:
        raise InputError("the example batch needs the model inputs and the labels",
                         "pass (inputs..., labels)")
    inputs, labels = batch[:-1], batch[-1]
    try:
        model = model.eval()
    except NotImplementedError:
        pass  # unlifted export modules are already inference modules
    try:
        ep = torch.export.export(model, inputs, strict=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"torch.export could not capture {source}: {first}",
                         "check the input shapes match the model (run with --debug)") from exc
    # functional core ATen: in-place activations (ReLU6(inplace=True)) become pure ops
    ep = ep.run_decompositions()
    fwd = ep.graph_module
    sig = ep.graph_signature
    state: list[tuple[str, str, torch.Tensor]] = []  # (kind, path, value) in placeholder order
    n_user = 0
    for spec in sig.input_specs:
        if spec.kind == InputKind.PARAMETER:
            state.append(("param", spec.target, ep.state_dict[spec.target]))
        elif spec.kind == InputKind.BUFFER:
            value = ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants[spec.target]
            state.append(("buffer", spec.target, value))
        elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
            state.append(("constant", spec.target, ep.constants[spec.target]))
        elif spec.kind == InputKind.USER_INPUT:
            n_user += 1
        else:
            raise InputError(f"unsupported exported input kind {spec.kind} in {source}",
                             "export the model without token/effect inputs")
    param_paths = [p for k, p, _ in state if k == "param"]
    n_state = len(state)

    hooks: list = []

    def joint(*flat):
        st, user, y = flat[:n_state], flat[n_state:-1], flat[-1]
        with torch.enable_grad():
            params = [t.detach().requires_grad_(t.dtype.is_floating_point) if k == "param" else t
                      for (k, _, _), t in zip(state, st)]
            _set_role("forward")
            with fx_traceback.preserve_node_meta():
                out = _Replay(fwd, hooks).run(*params, *user)
            out = out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out
            _set_role("loss")
            loss = loss_fn(out, y)
            _set_role("backward")
            wrt = [p for (k, _, _), p in zip(state, params) if k == "param" and p.requires_grad]
            grads = torch.autograd.grad(loss, wrt, allow_unused=True)
        return (loss.detach(), *[g if g is not None else torch.zeros(()) for g in grads])

    with fx_traceback.preserve_node_meta():
        saved = fx_traceback.current_meta
        try:
            joint_gm = make_fx(joint, tracing_mode="fake")(*[v for _, _, v in state], *inputs, labels)
        except Exception as exc:
            raise _backward_error(fwd, exc, source) from exc
        finally:
            fx_traceback.current_meta = saved
            for h in hooks:
                h.remove()
    if not isinstance(joint_gm, fx.GraphModule):
        raise InputError(f"could not trace the training step of {source}", "run with --debug")
    return _assemble(joint_gm, state, param_paths, ep, inputs, labels, loss_name,
                     {"name": optimizer, "lr": float(lr), "momentum": float(momentum)}, source)


def _backward_error(fwd: fx.GraphModule, exc: Exception, source: str) -> InputError:
    """Name every forward op autograd cannot differentiate, not just the first."""
    bad = []
    for node in fwd.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        args = pytree.tree_map_only(fx.Node, lambda a: _real_like(a.meta.get("val")), (node.args, node.kwargs))
        leaves = [a for a in pytree.tree_leaves(args) if isinstance(a, torch.Tensor)
                  and a.dtype.is_floating_point]
        if not leaves:
            continue
        try:
            with torch.enable_grad():
                for a in leaves:
                    a.requires_grad_(True)
                out = node.target(*args[0], **args[1])
                outs = [o for o in pytree.tree_leaves(out) if isinstance(o, torch.Tensor) and o.requires_grad]
                if outs:
                    torch.autograd.grad(sum(o.float().sum() for o in outs), leaves, allow_unused=True)
        except Exception:
            bad.append(f"{op_name(node)} at {module_path(node) or '<root>'}")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if bad:
        return InputError(f"the backward cannot handle {len(bad)} op(s) of {source}: {', '.join(bad)}",
                          "replace those layers with differentiable ones, or freeze the part "
                          "of the model that uses them")
    return InputError(f"could not build the backward of {source}: {first}", "run with --debug")


def _real_like(val: Any) -> Any:
    if isinstance(val, torch.Tensor):
        if val.dtype.is_floating_point:
            return torch.randn(tuple(int(s) for s in val.shape), dtype=val.dtype)
        return torch.zeros(tuple(int(s) for s in val.shape), dtype=val.dtype)
    return val


def _safe(path: str) -> str:
    return path.replace(".", "_")


def _assemble(jgm: fx.GraphModule, state, param_paths, ep, inputs, labels, loss_name,
              optimizer: dict, source: str) -> Graph:
    """Placeholders of weights -> get_attr on a module tree; name grads; emit updates."""
    root = nn.Module()
    for kind, path, value in state:
        owner = root
        *parents, leaf = path.split(".")
        for part in parents:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        if kind == "param":
            owner.register_parameter(leaf, nn.Parameter(value.detach().clone(), requires_grad=False))
        else:
            owner.register_buffer(leaf, value.detach().clone())
    g = jgm.graph
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    state_ph, user_ph, label_ph = placeholders[:len(state)], placeholders[len(state):-1], placeholders[-1]
    first = next(n for n in g.nodes if n.op != "placeholder")
    attr_nodes: dict[str, fx.Node] = {}
    for (kind, path, _), ph in zip(state, state_ph):
        with g.inserting_before(first), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the attribute exists once the module is built
            node = g.get_attr(path)
        node.meta["val"] = ph.meta.get("val")
        ph.replace_all_uses_with(node)
        g.erase_node(ph)
        attr_nodes[path] = node
    names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    for ph, name in zip(user_ph, names):
        ph._rename(name)
    label_ph._rename("labels")

    for node in list(g.nodes):  # autograd's detaches are no-ops in a functional graph
        if node.op == "call_function" and node.target == aten.detach.default:
            node.replace_all_uses_with(node.args[0])
            g.erase_node(node)
    out_node = next(n for n in g.nodes if n.op == "output")
    loss_node, *grad_nodes = out_node.args[0]
    loss_node._rename("loss")
    params: dict[str, dict] = {}
    grads_by_path: dict[str, fx.Node] = {}
    for path, gnode in zip(param_paths, grad_nodes):
        val = attr_nodes[path].meta.get("val")
        trained = isinstance(gnode, fx.Node) and gnode.op == "call_function" \
            and tuple(gnode.meta["val"].shape) == tuple(val.shape)
        params[path] = {"trained": bool(trained), "shape": list(val.shape), "attr": path,
                        "grad": None, "update": None, "rows": None}
        if trained:
            if gnode.meta.get("param"):  # one node is the gradient of two params (tied)
                with g.inserting_after(gnode):
                    gnode = g.call_function(aten.alias.default, (gnode,))
                gnode.meta["val"] = gnode.args[0].meta["val"]
            gnode._rename(f"{_safe(path)}_grad")
            gnode.meta["param"] = path
            grads_by_path[path] = gnode
    out_node.args = ((loss_node,),)
    for node in g.nodes:
        if node.op == "get_attr":
            node.meta["custom"] = {"train_role": "weight"}
        elif node.op == "placeholder":
            node.meta["custom"] = {"train_role": "input"}
        elif node.op == "call_function" and not role(node):
            node.meta["custom"] = {"train_role": "forward"}  # replayed with the model's meta
    gm = fx.GraphModule(root, g)
    graph = Graph(gm=gm,
                  inputs=[InputSpec(n, tuple(t.shape), t.dtype, _int_high(t)) for n, t in zip(names, inputs)]
                  + [InputSpec("labels", tuple(labels.shape), labels.dtype, _int_high(labels))],
                  example_inputs=tuple(inputs) + (labels,), source=source)
    graph.meta["training"] = True
    graph.meta["train_step"] = {
        "params": params, "inputs": names, "labels": "labels", "loss": "loss",
        "loss_fn": loss_name, "optimizer": optimizer, "outputs": ["loss"],
    }
    for path, gnode in grads_by_path.items():
        emit_update(graph, path, gnode)
    rebuild_outputs(graph)
    dead_code(graph)
    graph.commit()
    return graph


def _int_high(t: torch.Tensor) -> int | None:
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        return None
    return int(t.max().item()) + 1 if t.numel() else 2


def emit_update(graph: Graph, path: str, grad: fx.Node, *, rows: int | None = None,
                saturate: tuple[int, int] | None = None) -> fx.Node:
    """Append the optimizer update of parameter ``path`` from gradient node ``grad``.

    ``rows``: the gradient covers only the first ``rows`` output channels (partial-
    channel update); the rest of the parameter is carried over unchanged.
    ``saturate``: the parameter holds integers in this range (an int8-stored weight):
    the update is rounded to the nearest integer and clamped, as the device stores it.
    """
    ts = graph.meta["train_step"]
    opt = ts["optimizer"]
    info = ts["params"][path]
    g = graph.graph
    weight = next(n for n in g.nodes if n.op == "get_attr" and n.target == info["attr"])
    new_nodes: list[fx.Node] = []

    def call(target, args, val) -> fx.Node:
        node = g.call_function(target, args)
        node.meta["val"] = val
        node.meta["custom"] = {"train_role": "update"}
        node.meta["param"] = path
        if grad.meta.get("nn_module_stack"):
            node.meta["nn_module_stack"] = dict(grad.meta["nn_module_stack"])
        new_nodes.append(node)
        return node

    pval = weight.meta["val"]
    gval = grad.meta["val"]
    output = next(n for n in g.nodes if n.op == "output")
    with g.inserting_before(output):
        w = weight if rows is None else call(aten.slice.Tensor, (weight, 0, 0, rows), gval)
        step = grad
        mom_new = None
        if opt["momentum"]:
            mom_attr = f"{info['attr']}_momentum"
            if not _has_attr(graph.gm, mom_attr):
                _add_buffer(graph.gm, mom_attr, torch.zeros(tuple(pval.shape), dtype=pval.dtype))
            mom = next((n for n in g.nodes if n.op == "get_attr" and n.target == mom_attr), None)
            if mom is None:
                with g.inserting_before(next(n for n in g.nodes if n.op != "get_attr" and n.op != "placeholder")):
                    mom = g.get_attr(mom_attr)
                mom.meta["val"] = pval
                mom.meta["custom"] = {"train_role": "weight"}
            m = mom if rows is None else call(aten.slice.Tensor, (mom, 0, 0, rows), gval)
            v = call(aten.add.Tensor, (call(aten.mul.Tensor, (m, opt["momentum"]), gval), grad), gval)
            v.meta["custom"]["writes"] = mom_attr  # in place into the momentum buffer
            mom_new = v if rows is None else call(aten.slice_scatter.default, (mom, v, 0, 0, rows), pval)
            mom_new.meta["custom"]["writes"] = mom_attr
            mom_new._rename(f"{_safe(path)}_momentum_new")
            step = v
        scaled = call(aten.mul.Tensor, (step, opt["lr"]), gval)
        new = call(aten.sub.Tensor, (w, scaled), gval)
        new.meta["custom"]["writes"] = info["attr"]  # in place into the parameter
        if saturate is not None:
            new = call(aten.clamp.default, (call(aten.round.default, (new,), gval), *saturate), gval)
        if rows is not None:
            new = call(aten.slice_scatter.default, (weight, new, 0, 0, rows), pval)
    new._rename(f"{_safe(path)}_new")
    new.meta["custom"] = {"train_role": "update", "update_of": path, "writes": info["attr"]}
    info.update(grad=grad.name, update=new.name, rows=rows, trained=True,
                momentum=mom_new.name if mom_new is not None else None)
    return new


def _has_attr(gm: nn.Module, path: str) -> bool:
    try:
        obj = gm
        for part in path.split("."):
            obj = getattr(obj, part)
        return True
    except AttributeError:
        return False


def _add_buffer(gm: nn.Module, path: str, value: torch.Tensor) -> None:
    owner_path, _, leaf = path.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    owner.register_buffer(leaf, value)


def rebuild_outputs(graph: Graph) -> None:
    """Outputs = (loss, new value of each trained param, new momentum buffers)."""
    ts = graph.meta["train_step"]
    by_name = {n.name: n for n in graph.graph.nodes}
    outs, what = [by_name[ts["loss"]]], ["loss"]
    for path, info in ts["params"].items():
        if info["trained"] and info["update"]:
            outs.append(by_name[info["update"]])
            what.append(path)
    for path, info in ts["params"].items():
        if info["trained"] and info.get("momentum"):
            outs.append(by_name[info["momentum"]])
            what.append(f"{path}_momentum")
    output = next(n for n in graph.graph.nodes if n.op == "output")
    output.args = (tuple(outs),)
    ts["outputs"] = what


def dead_code(graph: Graph) -> int:
    """Erase unused pure nodes; shrink convolution_backward output masks to what is used.

    Returns the number of nodes removed. A convolution_backward whose input-gradient
    output nobody reads stops computing it: that is where the backward chain ends.
    """
    removed, changed = 0, True
    while changed:
        changed = False
        for node in reversed(list(graph.graph.nodes)):
            if node.op == "call_function" and not node.users and not node.is_impure():
                graph.graph.erase_node(node)
                removed += 1
                changed = True
            elif node.op == "call_function" and node.target == aten.convolution_backward.default:
                used = {u.args[1] for u in node.users if u.target is operator.getitem}
                mask = list(node.args[10])
                new_mask = [bool(m) and i in used for i, m in enumerate(mask)]
                if new_mask != mask:
                    node.args = node.args[:10] + (new_mask,)
                    val = node.meta.get("val")
                    if isinstance(val, (tuple, list)):
                        node.meta["val"] = tuple(v if new_mask[i] else None for i, v in enumerate(val))
                    changed = True
    return removed


def role(node: fx.Node) -> str:
    return (node.meta.get("custom") or {}).get("train_role", "")


def apply_step(graph: Graph, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Write a step's updated parameters (and momentum) back into ``graph``; return the loss."""
    ts = graph.meta["train_step"]
    for what, value in zip(ts["outputs"][1:], outputs[1:]):
        attr = ts["params"][what]["attr"] if what in ts["params"] else \
            f"{ts['params'][what.removesuffix('_momentum')]['attr']}_momentum"
        owner_path, _, leaf = attr.rpartition(".")
        owner = graph.gm.get_submodule(owner_path) if owner_path else graph.gm
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(value.detach().clone(), requires_grad=False)
        else:
            owner._buffers[leaf] = value.detach().clone()
    return outputs[0]


def train(graph: Graph, batches, steps: int | None = None) -> list[float]:
    """Run the step graph over ``batches`` (tuples of inputs..., labels); returns losses."""
    losses = []
    for i, batch in enumerate(batches):
        if steps is not None and i >= steps:
            break
        out = graph(*batch)
        losses.append(float(apply_step(graph, out)))
    return losses


def trained_params(graph: Graph) -> dict[str, dict]:
    return {p: i for p, i in graph.meta["train_step"]["params"].items() if i["trained"]}

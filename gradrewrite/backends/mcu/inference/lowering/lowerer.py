"""The graph walk that turns an ATen graph into a ``Program`` (kernel calls over planned buffers).

``Lowerer`` walks the graph in order. Constant subgraphs (weights, ``arange``, a
weight's transpose, a position embedding lookup) are evaluated here and become flash
arrays. Views become strided ``Val``s on their base buffer; a kernel that needs
contiguous data gets a copy only then. Each op goes to its handler in ``HANDLERS``
(the op-family modules of this package); int8 QDQ chains become integer kernels
(``int8.py``, mixed into the class). With ``collect=True`` the walk goes on past
unsupported ops and lists them all (``gradrewrite check``).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx

from .....rewrite.graph import Graph, module_path, op_name
from .....rewrite.quant_ops import DEQUANTIZE_PER_CHANNEL, QUANTIZE_PER_TENSOR
from .....rewrite import int8_layers as int8
from .. import nm
from ...program import ITEMSIZE, TORCH_DTYPES, Buf, Program, Step, Val, c_ints, contiguous_strides, numel
from . import int8_elementwise as int8_elem
from .base import HANDLERS, Unsupported, ident, kernel_dtype, val_meta
from .int8 import Int8Layers


class Lowerer(Int8Layers):
    """One walk over ``graph`` (``run``): its buffers, constants and kernel steps so far."""

    int8_elementwise = True   # plan int8 ops between the int8 layers (int8_elementwise.py)
    float_outputs = True      # int8 conv/linear layers whose output stays float (int8.py)

    def __init__(self, graph: Graph, *, collect: bool = False, sparse: bool = True,
                 quantized_inputs: bool = False, stream: bool = True):
        self.graph = graph
        self.collect = collect
        self.sparse = sparse
        # a float input whose only readers quantize it to int8: the C API takes the int8 tensor
        self.quantized_inputs = quantized_inputs
        # int8 depthwise convs in place of a dying input; pointwise expand + depthwise streamed
        self.stream = stream
        self.input_quant: list[dict | None] = []
        self._dw_inplace: list[tuple[Step, Val, Val]] = []   # (step, input, output)
        self._fused: dict[fx.Node, Val] = {}   # depthwise head -> output its streamed expand wrote
        self.vals: dict[fx.Node, Any] = {}
        self.steps: list[Step] = []
        self.consts: list[Buf] = []
        self.arena: list[Buf] = []
        self.kernel_files: set[str] = {"gr_kernels.h", "gr_dsp.h", "gr_tensor.c"}  # outputs are copied out
        self.unsupported: list[tuple[str, str, str]] = []
        self._const_cache: dict[fx.Node, torch.Tensor] = {}
        self._const_val: dict[Any, Val] = {}
        self._is_const: dict[fx.Node, bool] = {}
        self._fusable: dict[fx.Node, Step] = {}
        self._names: set[str] = set()
        self.qlayers = int8.find(graph, float_outputs=self.float_outputs)
        self.qelems = int8_elem.plan(graph, self.qlayers) if self.int8_elementwise \
            else int8_elem.Plan({}, {}, {})
        self.skip = self._dead_after_patterns()
        self.nm_layers = 0
        self.current: fx.Node | None = None

    # ----------------------------------------------------------------- helpers
    def _unique(self, base: str) -> str:
        name, i = ident(base), 0
        while name in self._names:
            i += 1
            name = f"{ident(base)}_{i}"
        self._names.add(name)
        return name

    def _dead_after_patterns(self) -> set[fx.Node]:
        """Nodes only int8 patterns consumed: their kernels replace them."""
        needed: set[fx.Node] = set()
        out = next(n for n in self.graph.gm.graph.nodes if n.op == "output")
        stack = [out]
        while stack:
            n = stack.pop()
            if n in needed:
                continue
            needed.add(n)
            deps = self.qlayers[n].inputs if n in self.qlayers else \
                (int8_elem.deps(self.qelems, n) or n.all_input_nodes)
            stack.extend(deps)
        return {n for n in self.graph.gm.graph.nodes if n.op == "call_function" and n not in needed}

    def is_const(self, node: Any) -> bool:
        if not isinstance(node, fx.Node):
            return True
        if node not in self._is_const:
            if node.op == "get_attr":
                res = True
            elif node.op == "call_function" and node.target != DEQUANTIZE_PER_CHANNEL:
                res = all(self.is_const(a) for a in node.all_input_nodes) and \
                    not str(op_name(node)).startswith(("aten.rand", "aten.normal", "aten.bernoulli"))
            else:
                res = False
            self._is_const[node] = res
        return self._is_const[node]

    def const_value(self, node: Any) -> Any:
        if not isinstance(node, fx.Node):
            return node
        if node not in self._const_cache:
            if node.op == "get_attr":
                value = self.graph.attr(node)
            else:
                args = fx.node.map_arg(node.args, self.const_value)
                kwargs = fx.node.map_arg(node.kwargs, self.const_value)
                with torch.no_grad():
                    value = node.target(*args, **kwargs)
            self._const_cache[node] = value.detach() if isinstance(value, torch.Tensor) else value
        return self._const_cache[node]

    def add_const(self, name: str, array: np.ndarray, dtype: str) -> Buf:
        buf = Buf(self._unique("w_" + name), "const", array.nbytes, dtype, data=np.ascontiguousarray(array))
        self.consts.append(buf)
        return buf

    def const_val(self, node: Any, dtype: str | None = None) -> Val:
        """A flash array for a constant tensor node (deduplicated by storage)."""
        t = self.const_value(node)
        if not isinstance(t, torch.Tensor):
            t = torch.tensor(t, dtype=torch.float32)
        t = t.contiguous()
        dt = dtype or kernel_dtype(t.dtype)
        key = (t.data_ptr(), tuple(t.shape), dt) if t.numel() else id(t)
        if key not in self._const_val:
            arr = t.numpy().astype({"f32": np.float32, "i8": np.int8, "i32": np.int32,
                                    "i64": np.int64, "u8": np.uint8}[dt])
            name = str(node.target) if isinstance(node, fx.Node) and node.op == "get_attr" else \
                (node.name if isinstance(node, fx.Node) else "const")
            buf = self.add_const(name, arr.reshape(-1), dt)
            self._const_val[key] = Val(buf, tuple(t.shape), contiguous_strides(tuple(t.shape)))
        return self._const_val[key]

    def val(self, node: Any) -> Val:
        if isinstance(node, fx.Node) and node in self.vals:
            return self.vals[node]
        if self.is_const(node):
            return self.const_val(node)
        raise Unsupported(f"input {node} was not generated")

    def new(self, shape: tuple[int, ...], dtype: str, name: str | None = None,
            inplace_of: Val | None = None) -> Val:
        base = name or (self.current.name if self.current is not None else "t")
        nbytes = max(1, numel(shape)) * ITEMSIZE[dtype]
        buf = Buf(self._unique(base), "arena", nbytes, dtype)
        if inplace_of is not None and inplace_of.buf.kind == "arena" and inplace_of.is_contiguous() \
                and inplace_of.offset == 0 and inplace_of.buf.nbytes == nbytes:
            buf.inplace_of = inplace_of.buf
        self.arena.append(buf)
        return Val(buf, shape, contiguous_strides(shape))

    def emit(self, kernel: str, file: str, code: str, reads: list[Val], writes: list[Val],
             macs: int = 0, params: dict | None = None, op: str | None = None) -> Step:
        node = self.current
        step = Step(op or (op_name(node) if node is not None else kernel),
                    module_path(node) if node is not None else "", code,
                    [v.buf for v in reads], [v.buf for v in writes], kernel, macs, params or {})
        self.steps.append(step)
        self.kernel_files.add(file)
        return step

    def contig(self, v: Val) -> Val:
        if v.is_contiguous():
            return v
        out = self.new(v.shape, v.dtype, name=f"{v.buf.name}_c")
        self.copy(v, out)
        return out

    def copy(self, src: Val, dst: Val, op: str = "copy") -> None:
        nd = max(1, len(src.shape))
        shape = src.shape or (1,)
        ss = src.strides or (1,)
        ds = dst.strides or (1,)
        code = (f"{{ static const int32_t sh[{nd}] = {c_ints(shape)}, ss[{nd}] = {c_ints(ss)}, "
                f"ds[{nd}] = {c_ints(ds)};\n"
                f"  gr_copy_nd({ITEMSIZE[src.dtype]}, {nd}, sh, {src.ptr()}, ss, {dst.out()}, ds); }}")
        self.emit("gr_copy_nd", "gr_tensor.c", code, [src], [dst], op=op)

    # ----------------------------------------------------------------- main loop
    def run(self) -> Program:
        inputs, offset = [], 0
        for node in self.graph.gm.graph.nodes:
            self.current = node
            if node.op == "placeholder":
                val = val_meta(node)
                try:
                    dt = kernel_dtype(val.dtype)
                except Unsupported as exc:
                    if not self.collect:
                        raise Unsupported(f"input {node.name}: {exc}") from None
                    self.unsupported.append(("input", node.name, str(exc)))
                    dt = "f32"
                quant = self._input_quantize(node, self.int8_elementwise) if self.quantized_inputs else None
                if quant is not None:
                    dt = "i8"
                shape = tuple(int(s) for s in val.shape)
                buf = Buf(ident(node.name), "input", numel(shape) * ITEMSIZE[dt], dt, offset=offset)
                offset += buf.nbytes
                self.vals[node] = Val(buf, shape, contiguous_strides(shape))
                inputs.append(self.vals[node])
                self.input_quant.append(quant)
                if quant is not None:  # the caller quantized it: its quantize nodes are the input
                    for user in node.users:
                        self.vals[user] = self.vals[node] if user.target == QUANTIZE_PER_TENSOR else \
                            int8_elem.lower_input_pad(self, user, self.vals[node], quant["zero_point"])
                        self.skip.add(user)
                        for q in (user.users if user.target != QUANTIZE_PER_TENSOR else ()):
                            self.vals[q] = self.vals[user]   # quantize(pad(x)): the padded int8 input
                            self.skip.add(q)
            elif node.op == "output":
                outs = [a for a in torch.utils._pytree.tree_leaves(node.args[0]) if isinstance(a, fx.Node)]
                outputs = [self._output(a) for a in outs]
            elif node.op == "call_function" and node not in self.skip and not self.is_const(node):
                self._lower(node)
        self.current = None
        self._depthwise_in_place(outputs)
        return Program(inputs, outputs, self.steps, self.consts, self.arena, self.kernel_files,
                       {"int8_layers": len(self.qlayers), "nm_layers": self.nm_layers,
                        "input_quantize": self.input_quant})

    @staticmethod
    def _input_quantize(node: fx.Node, pads: bool = False) -> dict | None:
        """(scale, zero point) when every reader of float input ``node`` is the same int8
        quantize_per_tensor (``pads``: or a zero pad only such quantizes read), else None."""
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dtype != torch.float32 or not node.users:
            return None
        params = set()
        readers = int8_elem.input_readers(node) if pads else list(node.users)
        for user in readers or ():
            if user.op != "call_function" or user.target != QUANTIZE_PER_TENSOR \
                    or user.args[0] not in (node, *node.users) or user.kwargs or len(user.args) != 6:
                return None
            scale, zp, qmin, qmax, dtype = user.args[1:6]
            if dtype != torch.int8 or (int(qmin), int(qmax)) != (-128, 127) \
                    or any(isinstance(a, fx.Node) for a in (scale, zp)):
                return None
            params.add((float(scale), int(zp)))
        if len(params) != 1:
            return None
        scale, zp = params.pop()
        return {"scale": scale, "zero_point": zp, "from_dtype": "float32"}

    def _output(self, node: fx.Node) -> Val:
        v = self.val(node) if node in self.vals or self.is_const(node) else None
        if v is None:
            raise Unsupported(f"output {node.name} was not generated")
        return v

    def _lower(self, node: fx.Node) -> None:
        try:
            if node in self._fused:  # computed by its streamed expand conv
                result = self._fused.pop(node)
            elif node in self.qlayers:
                result = self._qlayer(self.qlayers[node])
            elif node in self.qelems.elems:
                result = int8_elem.lower(self, self.qelems.elems[node])
            elif node in self.qelems.aliases:  # quantizes an int8 op's result: that result
                result = self.vals[self.qelems.aliases[node]]
            else:
                handler = HANDLERS.get(node.target)
                if handler is None:
                    raise Unsupported("no C kernel for this op")
                result = handler(self, node)
            self.vals[node] = result
        except Unsupported as exc:
            if not self.collect:
                raise Unsupported(f"{op_name(node)} at {module_path(node) or '<root>'}: {exc}") from None
            self.unsupported.append((op_name(node), module_path(node) or "<root>", str(exc)))
            self.vals[node] = self._placeholder_for(node)

    def _placeholder_for(self, node: fx.Node):
        """Keep going after an unsupported op (check mode): a fresh buffer of its shape."""
        val = node.meta.get("val")
        if isinstance(val, (list, tuple)):
            return tuple(self.new(tuple(int(s) for s in v.shape), TORCH_DTYPES.get(
                str(v.dtype).removeprefix("torch."), "f32")) if isinstance(v, torch.Tensor) else None
                for v in val)   # items keep their index (a backward's unneeded gradients are None)
        if isinstance(val, torch.Tensor):
            return self.new(tuple(int(s) for s in val.shape),
                            TORCH_DTYPES.get(str(val.dtype).removeprefix("torch."), "f32"))
        return None

    def _nm_arrays(self, name: str, packed: nm.NMWeight, dtype: str) -> tuple[Buf, Buf]:
        self.nm_layers += 1
        self.kernel_files.add("gr_int8.c")  # gr_nm.c's int8 kernels call gr_requantize
        vals = self.add_const(name + "_nm_values", packed.values, dtype)
        idx = self.add_const(name + "_nm_index", packed.indices, "u8")
        return vals, idx

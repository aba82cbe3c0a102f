"""ONNX import: numerics against onnxruntime, torch.export-ability, module paths, errors."""
from __future__ import annotations

import math
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from gradrewrite.errors import InputError
from gradrewrite.rewrite.graph import module_path, op_name
from gradrewrite.rewrite.onnx_import import SUPPORTED_OPS, onnx_to_module

import onnxruntime as ort


# ----------------------------------------------------------------------------- models
class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), nn.ReLU6(),
            nn.AvgPool2d(2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(),
                                 nn.Linear(16, 4), nn.LeakyReLU(0.1))

    def forward(self, x):
        return self.net(x).sigmoid()


class Attention(nn.Module):
    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(d), Attention(d), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(self.block(x))


class Shapes(nn.Module):
    """reshape/transpose/concat/slice, with sizes read from x.shape; two outputs."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)

    def forward(self, x):
        b, c, n = x.shape
        y = self.proj(x.transpose(1, 2)).reshape(b, n * 2, 3)
        z = torch.cat([y, y[:, ::2].repeat(1, 2, 1)[:, : n * 2]], dim=-1)
        return z[:, 1:-1, :5].flatten(1), y.permute(2, 0, 1).contiguous()[..., :n]


MODELS = {
    "cnn": (CNN, (2, 3, 16, 16),
            {"conv2d": {"features.0", "features.4"}, "relu": {"features.2"},
             "max_pool2d": {"features.3"}, "linear": {"fc"}}),
    "mlp": (MLP, (3, 12), {"linear": {"net.0", "net.2", "net.4"}, "tanh": {"net.3"}}),
    "encoder": (Encoder, (2, 5, 16),
                {"layer_norm": {"block.ln1", "block.ln2", "norm"},
                 "softmax": {"block.attn"}, "erf": {"block.mlp.1"}}),
    "shapes": (Shapes, (2, 6, 4), {"cat": {""}}),
}
DYNAMIC = {"shapes": {"x": {0: "batch"}}}  # legacy export keeps Shape->Gather->Reshape


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each model exported with the TorchScript (legacy) and the dynamo exporter."""
    root = tmp_path_factory.mktemp("onnx_models")
    files = {}
    torch.manual_seed(0)
    for name, (cls, shape, _) in MODELS.items():
        model = cls().eval()
        for m in model.modules():  # non-trivial BatchNorm statistics
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        x = torch.randn(shape)
        for dynamo in (False, True):
            path = root / f"{name}_{'dynamo' if dynamo else 'legacy'}.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if dynamo:
                    torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=18,
                                      verbose=False)
                else:
                    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                                      input_names=["x"], dynamic_axes=DYNAMIC.get(name))
            files[name, dynamo] = (path, model, shape)
    return files


def run_ort(path, inputs):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)})


def assert_close(module, path, inputs):
    ref = run_ort(path, inputs)
    with torch.no_grad():
        got = module(*inputs)
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert tuple(g.shape) == r.shape
        g = g.numpy()
        if r.dtype == np.bool_ or np.issubdtype(r.dtype, np.integer):
            np.testing.assert_array_equal(g, r)
        else:
            tol = 1e-5 if r.dtype.itemsize >= 4 else 2e-3  # half precision: ~1 ulp
            err = float(np.abs(g.astype(np.float64) - r).max()) if r.size else 0.0
            assert err <= tol * (1 + float(np.abs(r).max() if r.size else 0)), err


def assert_same(got, ref):
    """The exported program's module computes what the imported module computes."""
    got, ref = (x if isinstance(x, tuple) else (x,) for x in (got, ref))
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("name", list(MODELS))
def test_exported_models_match_onnxruntime(exported, name, dynamo):
    path, model, shape = exported[name, dynamo]
    shapes = [shape] if name in DYNAMIC and not dynamo else None
    module, example = onnx_to_module(path, input_shapes=shapes)
    assert not module.training
    assert [tuple(t.shape) for t in example] == [shape]
    assert_close(module, path, example)
    assert_close(module, path, (torch.randn(shape),))

    ep = torch.export.export(module, example, strict=False)
    calls = [n for n in ep.graph.nodes if n.op == "call_function"]
    assert not any("sym_size" in str(n.target) for n in calls)  # shapes became ints
    paths: dict[str, set[str]] = {}  # short op name (conv2d) -> module paths
    for node in calls:
        short = op_name(node).removeprefix("aten.").split(".")[0]
        paths.setdefault(short, set()).add(module_path(node))
    for op, expected in MODELS[name][2].items():
        assert paths.get(op) == expected, (op, paths)
    # Every op sits in a module that exists in the original PyTorch model.
    torch_paths = {p for p, _ in model.named_modules()}
    assert {module_path(n) for n in calls} <= torch_paths
    assert_same(ep.module()(*example), module(*example))


def test_weights_live_on_layer_modules(exported):
    module, _ = onnx_to_module(exported["cnn", False][0])
    names = {n for n, _ in module.named_parameters()}
    assert {"features.0.weight", "features.0.bias", "fc.weight", "fc.bias"} <= names
    assert all(p.dtype.is_floating_point and not p.requires_grad for p in module.parameters())
    module, _ = onnx_to_module(exported["encoder", True][0])
    lns = [module.get_submodule(p).weight for p in ("block.ln1", "block.ln2", "norm")]
    assert len({id(w) for w in lns}) == 3  # deduplicated initializers are untied again


def test_batch_norm_statistics_are_buffers(tmp_path):
    nodes = [N("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="/bn/BatchNorm")]
    path = make_model(tmp_path, nodes, [("x", F32, [2, 3, 4])], [("y", F32, [2, 3, 4])],
                      {"s": f32(3), "b": f32(3), "m": f32(3), "v": np.abs(f32(3))})
    module, _ = onnx_to_module(path)
    assert {n for n, _ in module.named_parameters()} == {"bn.weight", "bn.bias"}
    assert {n for n, _ in module.named_buffers()} == {"bn.running_mean", "bn.running_var"}


def test_dynamic_input_needs_shapes(exported):
    path = exported["shapes", False][0]
    with pytest.raises(InputError) as err:
        onnx_to_module(path)
    assert "--input" in err.value.one_line() and "'x'" in err.value.message
    module, example = onnx_to_module(path, input_shapes={"x": (5, 6, 4)})
    assert example[0].shape == (5, 6, 4)
    assert_close(module, path, example)
    with pytest.raises(InputError, match="1 input"):
        onnx_to_module(path, input_shapes=[(5, 6, 4), (1,)])
    with pytest.raises(InputError, match="no input named"):
        onnx_to_module(path, input_shapes={"y": (5, 6, 4)})
    with pytest.raises(InputError, match="fixed|shape"):
        onnx_to_module(exported["mlp", False][0], input_shapes=[(7, 12)])


# ------------------------------------------------------------------ single-op graphs
def make_model(tmp_path, nodes, inputs, outputs, inits=(), opset=17, name="m"):
    """A tiny ONNX file. inputs/outputs: (name, elem_type, shape) with shape None = any."""
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info(n, t, s) for n, t, s in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(inits).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


F32, I64 = TensorProto.FLOAT, TensorProto.INT64
N = helper.make_node
rng = np.random.default_rng(0)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def i64(values):
    return np.asarray(values, dtype=np.int64)


OP_CASES = {
    "gemm_transB_alpha_beta": (
        [N("Gemm", ["x", "w", "c"], ["y"], alpha=0.5, beta=2.0, transB=1)],
        [("x", F32, [3, 4])], {"w": f32(5, 4), "c": f32(5)}, 17),
    "gemm_transA_matrix_bias": (
        [N("Gemm", ["x", "w", "c"], ["y"], transA=1, alpha=1.5)],
        [("x", F32, [4, 3])], {"w": f32(4, 5), "c": f32(3, 5)}, 17),
    "gemm_linear": (
        [N("Gemm", ["x", "w", "c"], ["y"], transB=1)], [("x", F32, [3, 4])],
        {"w": f32(5, 4), "c": f32(5)}, 13),
    "clip_inputs": (
        [N("Clip", ["x", "lo", "hi"], ["y"])], [("x", F32, [2, 5])],
        {"lo": np.float32(-0.3), "hi": np.float32(0.4)}, 13),
    "clip_max_only": (
        [N("Clip", ["x", "", "hi"], ["y"])], [("x", F32, [2, 5])],
        {"hi": np.float32(0.1)}, 13),
    "clip_runtime_bounds": (
        [N("Clip", ["x", "lo"], ["y"])], [("x", F32, [2, 5]), ("lo", F32, [])], {}, 13),
    "reshape_zero_minus_one": (
        [N("Reshape", ["x", "s"], ["y"])], [("x", F32, [2, 3, 4])], {"s": i64([0, -1, 2])}, 14),
    "reshape_allowzero": (
        [N("Reshape", ["x", "s"], ["y"], allowzero=1)], [("x", F32, [2, 3, 4])],
        {"s": i64([4, 6])}, 14),
    "unsqueeze_axes_input": (
        [N("Unsqueeze", ["x", "a"], ["y"])], [("x", F32, [3, 4])], {"a": i64([0, -1])}, 13),
    "squeeze_axes_input": (
        [N("Squeeze", ["x", "a"], ["y"])], [("x", F32, [1, 3, 1, 4])], {"a": i64([2])}, 13),
    "unsqueeze_axes_attr_opset11": (
        [N("Unsqueeze", ["x"], ["y"], axes=[1])], [("x", F32, [3, 4])], {}, 11),
    "slice_steps": (
        [N("Slice", ["x", "st", "en", "ax", "sp"], ["y"])], [("x", F32, [4, 10, 6])],
        {"st": i64([1, -1, 0]), "en": i64([100, -11, 6]), "ax": i64([1, 2, 0]),
         "sp": i64([3, -2, 2])}, 13),
    "slice_defaults": (
        [N("Slice", ["x", "st", "en"], ["y"])], [("x", F32, [4, 10])],
        {"st": i64([1, 2]), "en": i64([-1, 9223372036854775807])}, 13),
    "conv_same_upper": (
        [N("Conv", ["x", "w", "b"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2])],
        [("x", F32, [1, 3, 9, 8])], {"w": f32(4, 3, 4, 3), "b": f32(4)}, 17),
    "conv_asym_pads_dilated": (
        [N("Conv", ["x", "w"], ["y"], pads=[0, 1, 2, 1], dilations=[2, 1], group=2)],
        [("x", F32, [1, 4, 9, 8])], {"w": f32(6, 2, 3, 3)}, 17),
    "conv1d_valid": (
        [N("Conv", ["x", "w"], ["y"], auto_pad="VALID", strides=[2])],
        [("x", F32, [2, 3, 11])], {"w": f32(5, 3, 3)}, 17),
    "maxpool_same_upper": (
        [N("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")],
        [("x", F32, [1, 2, 8, 7])], {}, 17),
    "avgpool_pads_exclude": (
        [N("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], pads=[1, 0, 2, 1])],
        [("x", F32, [1, 2, 7, 7])], {}, 17),
    "avgpool_ceil_include": (
        [N("AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1],
           count_include_pad=1)],
        [("x", F32, [1, 2, 6, 6])], {}, 17),
    "conv_transpose": (
        [N("ConvTranspose", ["x", "w", "b"], ["y"], strides=[2, 2], pads=[1, 0, 0, 1],
           output_padding=[1, 1])],
        [("x", F32, [1, 4, 5, 5])], {"w": f32(4, 3, 3, 3), "b": f32(3)}, 17),
    "conv_transpose_groups": (
        [N("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1], group=2)],
        [("x", F32, [1, 4, 5, 5])], {"w": f32(4, 2, 4, 4)}, 17),
    "conv_transpose_output_shape": (
        [N("ConvTranspose", ["x", "w"], ["y"], strides=[3, 2], output_shape=[13, 12]),
         N("ConvTranspose", ["x", "w"], ["z"], strides=[2, 2], auto_pad="SAME_UPPER")],
        [("x", F32, [1, 4, 5, 5])], {"w": f32(4, 3, 3, 3)}, 17),
    "conv_transpose_1d_dilated": (
        [N("ConvTranspose", ["x", "w", "b"], ["y"], strides=[2], dilations=[2], pads=[2, 0])],
        [("x", F32, [1, 4, 6])], {"w": f32(4, 3, 3), "b": f32(3)}, 17),
    "gelu_fp16": (
        [N("Gelu", ["x"], ["g"]), N("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
         N("Mul", ["h", "c"], ["m"])],
        [("x", F32, [3, 4])], {"c": np.float16(2.5)}, 20),
    "resize_nearest_default_modes": (
        [N("Resize", ["x", "", "sc"], ["y"], mode="nearest"),
         N("Resize", ["x", "", "", "sz"], ["z"], mode="nearest", axes=[3, 2])],
        [("x", F32, [1, 2, 8, 8])],
        {"sc": np.array([1, 1, 0.5, 0.75], np.float32), "sz": i64([3, 5])}, 18),
    "softmax_opset11_coerced": (
        [N("Softmax", ["x"], ["y"], axis=1), N("LogSoftmax", ["x"], ["z"])],
        [("x", F32, [2, 3, 4])], {}, 11),
    "softmax_axis": (
        [N("Softmax", ["x"], ["y"], axis=1)], [("x", F32, [2, 3, 4])], {}, 13),
    "norms": (
        [N("LayerNormalization", ["x", "s", "b"], ["y"], axis=-2, epsilon=1e-3),
         N("InstanceNormalization", ["x", "s2", "b2"], ["z"]),
         N("BatchNormalization", ["x", "s2", "b2", "m", "v"], ["u"])],
        [("x", F32, [2, 3, 4, 5])],
        {"s": f32(4, 5), "b": f32(4, 5), "s2": f32(3), "b2": f32(3), "m": f32(3),
         "v": np.abs(f32(3)) + 0.5}, 17),
    "activations": (
        [N("HardSigmoid", ["x"], ["a"], alpha=0.3), N("HardSwish", ["x"], ["b"]),
         N("Gelu", ["x"], ["c"], approximate="tanh"), N("Erf", ["x"], ["d"]),
         N("LeakyRelu", ["x"], ["e"], alpha=0.2), N("Reciprocal", ["x"], ["f"]),
         N("PRelu", ["x", "p"], ["g"]), N("Abs", ["x"], ["h0"]), N("Sqrt", ["h0"], ["h"]),
         N("Log", ["h0"], ["i"]), N("Exp", ["x"], ["j"]), N("Neg", ["x"], ["k"])],
        [("x", F32, [2, 3, 4])], {"p": f32(3, 1)}, 20),
    "arith_broadcast": (
        [N("Add", ["x", "y"], ["a"]), N("Sub", ["c", "x"], ["b"]), N("Mul", ["x", "c"], ["m"]),
         N("Div", ["x", "y"], ["d"]), N("Abs", ["x"], ["h"]), N("Pow", ["h", "e"], ["p"]),
         N("Min", ["x", "y", "c"], ["mn"]), N("Max", ["x", "y"], ["mx"]),
         N("Sum", ["x", "y", "c"], ["s"]), N("Mean", ["x", "y"], ["mean"])],
        [("x", F32, [2, 3, 4]), ("y", F32, [3, 1])],
        {"c": np.float32(1.5), "e": np.float32(2.5)}, 17),
    "int_div_and_cast": (
        [N("Cast", ["x"], ["xi"], to=TensorProto.INT64), N("Div", ["xi", "k"], ["d"]),
         N("Cast", ["d"], ["y"], to=TensorProto.FLOAT)],
        [("x", F32, [3, 4])], {"k": i64(3)}, 17),
    "logic_where": (
        [N("Greater", ["x", "y"], ["g"]), N("Less", ["x", "z"], ["l"]),
         N("Equal", ["g", "l"], ["e"]), N("Not", ["e"], ["n"]), N("And", ["g", "n"], ["a"]),
         N("Or", ["a", "l"], ["o"]), N("Where", ["o", "x", "z"], ["w"])],
        [("x", F32, [2, 3]), ("y", F32, [2, 3])], {"z": np.float32(0.25)}, 17),
    "reduce_axes_input_opset18": (
        [N("ReduceMean", ["x", "a"], ["m"]), N("ReduceSum", ["x", "a"], ["s"], keepdims=0),
         N("ReduceMax", ["x"], ["mx"], keepdims=0), N("ReduceMin", ["x", "a2"], ["mn"])],
        [("x", F32, [2, 3, 4])], {"a": i64([1, -1]), "a2": i64([0])}, 18),
    "reduce_axes_attr_opset13": (
        [N("ReduceMean", ["x"], ["m"], axes=[1]), N("ReduceSum", ["x", "a"], ["s"])],
        [("x", F32, [2, 3, 4])], {"a": i64([2])}, 13),
    "split_concat_transpose": (
        [N("Split", ["x", "sp"], ["a", "b"], axis=1), N("Transpose", ["a"], ["t"], perm=[0, 2, 1]),
         N("Concat", ["b", "a"], ["c"], axis=1), N("Split", ["x"], ["d", "e", "f"], axis=2,
                                                 num_outputs=3)],
        [("x", F32, [2, 5, 7])], {"sp": i64([2, 3])}, 18),
    "gather_flatten": (
        [N("Gather", ["x", "i"], ["g"], axis=1), N("Gather", ["x", "j"], ["h"], axis=-1),
         N("Flatten", ["x"], ["f"], axis=2), N("Gather", ["x", "k"], ["s"], axis=0)],
        [("x", F32, [3, 4, 5])], {"i": i64([[0, -1], [2, 2]]), "j": i64([1, 2, 3]), "k": i64(-1)},
        17),
    "gather_runtime_indices": (
        [N("Gather", ["t", "ids"], ["y"]), N("Gather", ["x", "ids"], ["z"], axis=1)],
        [("ids", I64, [2, 3]), ("x", F32, [2, 4])], {"t": f32(4, 6)}, 17),
    "shape_subgraph": (
        [N("Shape", ["x"], ["s"]), N("Gather", ["s", "zero"], ["b"]),
         N("Unsqueeze", ["b", "zero1"], ["b1"]), N("Concat", ["b1", "minus1"], ["shp"], axis=0),
         N("Reshape", ["x", "shp"], ["y"]), N("Shape", ["x"], ["tail"], start=-2),
         N("ConstantOfShape", ["tail"], ["ones"], value=helper.make_tensor("v", F32, [1], [1.0])),
         N("Add", ["x", "ones"], ["z"]), N("Size", ["x"], ["n"]),
         N("Cast", ["n"], ["nf"], to=TensorProto.FLOAT), N("Div", ["z", "nf"], ["w"])],
        [("x", F32, [2, 3, 4])],
        {"zero": i64(0), "zero1": i64([0]), "minus1": i64([-1])}, 17),
    "constant_range_tile_expand": (
        [N("Constant", [], ["c"], value_floats=[1.0, 2.0, 3.0]),
         N("Range", ["st", "lim", "dl"], ["r"]), N("Cast", ["r"], ["rf"], to=TensorProto.FLOAT),
         N("Mul", ["x", "rf"], ["m"]), N("Tile", ["m", "rep"], ["t"]),
         N("Expand", ["c", "es"], ["e"]), N("Add", ["e", "x"], ["y"])],
        [("x", F32, [2, 3])],
        {"st": i64(0), "lim": i64(6), "dl": i64(2), "rep": i64([2, 1]), "es": i64([2, 1])}, 17),
    "pad_modes": (
        [N("Pad", ["x", "p", "v"], ["a"]), N("Pad", ["x", "p2"], ["b"], mode="reflect"),
         N("Pad", ["x", "p3", "", "ax"], ["c"], mode="edge")],
        [("x", F32, [1, 2, 4, 5])],
        {"p": i64([0, 0, 1, -1, 0, 1, 2, 0]), "v": np.float32(0.5),
         "p2": i64([0, 0, 1, 2, 0, 0, 2, 1]), "p3": i64([1, 2]), "ax": i64([-1])}, 18),
    "resize_nearest_and_linear": (
        [N("Resize", ["x", "", "sc"], ["a"], mode="nearest",
           coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
         N("Resize", ["x", "", "", "sz"], ["b"], mode="nearest"),
         N("Resize", ["x", "", "sc"], ["c"], mode="linear"),
         N("Resize", ["x", "", "", "sz"], ["d"], mode="linear",
           coordinate_transformation_mode="align_corners"),
         N("Resize", ["x", "", "sc2"], ["e"], mode="nearest",
           coordinate_transformation_mode="half_pixel", nearest_mode="round_prefer_ceil")],
        [("x", F32, [1, 2, 4, 6])],
        {"sc": np.array([1, 1, 2, 1.5], np.float32), "sz": i64([1, 2, 3, 9]),
         "sc2": np.array([1, 1, 2, 2], np.float32)}, 18),
    "einsum_cumsum_trilu": (
        [N("Einsum", ["x", "y"], ["e"], equation="bij,bjk->bik"),
         N("CumSum", ["x", "ax"], ["c"], exclusive=1, reverse=1),
         N("CumSum", ["x", "ax"], ["c2"]),
         N("Trilu", ["x", "k"], ["t"]), N("Trilu", ["x"], ["l"], upper=0)],
        [("x", F32, [2, 3, 4]), ("y", F32, [2, 4, 2])], {"ax": i64(1), "k": i64(1)}, 17),
    "matmul_dropout_identity": (
        [N("MatMul", ["x", "w"], ["m"]), N("Dropout", ["m"], ["d"]), N("Identity", ["d"], ["y"]),
         N("GlobalAveragePool", ["z"], ["g"]), N("GlobalMaxPool", ["z"], ["h"])],
        [("x", F32, [2, 3, 4]), ("z", F32, [1, 2, 3, 3])], {"w": f32(4, 5)}, 17),
}


@pytest.mark.parametrize("case", list(OP_CASES))
def test_single_ops_match_onnxruntime(tmp_path, case):
    nodes, inputs, inits, opset = OP_CASES[case]
    # Every node output is a graph output, so intermediate values are checked too; shape
    # inference supplies their types.
    graph = helper.make_graph(
        nodes, case, [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs], [],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    model.graph.output.extend(inferred[o] for n in nodes for o in n.output)
    path = tmp_path / f"{case}.onnx"
    onnx.save(model, str(path))

    module, example = onnx_to_module(path)
    assert_close(module, path, example)
    ep = torch.export.export(module, example, strict=False)
    assert_same(ep.module()(*example), module(*example))


def test_naming_rules(tmp_path):
    nodes = [N("Relu", ["x"], ["a"], name="/features/features.0/Relu"),
             N("Relu", ["a"], ["b"], name="/layers.1/mlp/mlp.2/Relu"),
             N("MatMul", ["b", "w"], ["c"], name="/Flatten"),
             N("Relu", ["c"], ["d"], name="head.fc"),
             N("Relu", ["d"], ["e"]),
             N("Relu", ["e"], ["f"], name="/a-b/Relu"),
             N("Relu", ["f"], ["g"], name="/a_b/Relu"),
             N("Relu", ["g"], ["h"], name="/forward/Relu")]
    path = make_model(tmp_path, nodes, [("x", F32, [2, 3])], [("h", F32, [2, 3])],
                      {"w": f32(3, 3)})
    module, example = onnx_to_module(path)
    ep = torch.export.export(module, example, strict=False)
    paths = [module_path(n) for n in ep.graph.nodes if n.op == "call_function"]
    assert paths == ["features.0", "layers.1.mlp.2", "", "head.fc", "node_4", "a_b", "a_b_1",
                     "forward_"]
    assert "weight" in dict(module.named_parameters())  # root-level MatMul weight


def test_constant_weights_become_parameters_and_module_pickles(tmp_path):
    import pickle

    w = f32(4, 3, 3, 3)
    nodes = [N("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")),
             N("Conv", ["x", "w"], ["y"], name="/conv/Conv", pads=[1, 1, 1, 1]),
             N("Shape", ["y"], ["s"]), N("Slice", ["s", "zero", "two"], ["s2"]),
             N("Concat", ["s2", "minus1"], ["shape"], axis=0),
             N("Reshape", ["y", "shape"], ["z"], name="/Reshape")]
    path = make_model(tmp_path, nodes, [("x", F32, [1, 3, 5, 5])], [("z", F32, [1, 4, 25])],
                      {"zero": i64([0]), "two": i64([2]), "minus1": i64([-1])})
    module, example = onnx_to_module(path)
    assert [n for n, _ in module.named_parameters()] == ["conv.weight"]
    assert not list(module.named_buffers())  # the shape subgraph folded to Python ints
    assert_close(module, path, example)
    clone = pickle.loads(pickle.dumps(module))
    torch.testing.assert_close(clone(*example), module(*example))
    ep = torch.export.export(clone, example, strict=False)
    assert ep.graph_signature.user_inputs == ("x",)


# ------------------------------------------------------------------------ bad inputs
def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        onnx_to_module(tmp_path / "nope.onnx")


def test_truncated_file(tmp_path, exported):
    data = exported["mlp", False][0].read_bytes()
    path = tmp_path / "half.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as err:
        onnx_to_module(path)
    assert "truncated" in err.value.message and "\n" not in err.value.one_line()


def test_text_file_renamed(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("these are my notes, not a model\n" * 20)
    with pytest.raises(InputError, match="not .*ONNX"):
        onnx_to_module(path)


def test_zip_renamed(tmp_path):
    import zipfile
    path = tmp_path / "model.onnx"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", b"x")
    with pytest.raises(InputError, match="zip"):
        onnx_to_module(path)


def test_unsupported_ops_listed_together(tmp_path):
    nodes = [N("NonMaxSuppression", ["b", "s"], ["i"], name="/nms/NonMaxSuppression"),
             N("NonMaxSuppression", ["b", "s"], ["j"], name="nms2"),
             N("FancyOp", ["b"], ["k"], domain="com.example", name="fancy"),
             N("Relu", ["b"], ["r"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("b", F32, [1, 4, 4]),
                     helper.make_tensor_value_info("s", F32, [1, 1, 4])],
        [helper.make_tensor_value_info(o, I64, None) for o in ("i", "j")]
        + [helper.make_tensor_value_info(o, F32, None) for o in ("k", "r")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    path = tmp_path / "nms.onnx"
    onnx.save(model, str(path))
    with pytest.raises(InputError) as err:
        onnx_to_module(path)
    msg = err.value.message
    assert "NonMaxSuppression (2 nodes, e.g. '/nms/NonMaxSuppression')" in msg
    assert "com.example::FancyOp (1 node, e.g. 'fancy')" in msg
    assert "Relu" not in msg and ".pt2" in err.value.hint and "Conv" in err.value.hint


def test_runtime_shape_argument_is_rejected(tmp_path):
    nodes = [N("Cast", ["x"], ["s"], to=TensorProto.INT64), N("Reshape", ["y", "s"], ["z"])]
    path = make_model(tmp_path, nodes, [("x", F32, [2]), ("y", F32, [2, 3])],
                      [("z", F32, [3, 2])])
    with pytest.raises(InputError, match="shape/axes argument"):
        onnx_to_module(path)


def test_external_data(tmp_path, exported):
    model = onnx.load(str(exported["mlp", False][0]))
    path = tmp_path / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    module, example = onnx_to_module(path)
    assert_close(module, path, example)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(InputError, match="external"):
        onnx_to_module(path)


def test_supported_ops_cover_the_brief():
    required = """Conv ConvTranspose Gemm MatMul Add Sub Mul Div Pow Sqrt Exp Log Neg Abs
    Reciprocal Relu LeakyRelu Sigmoid Tanh Erf Gelu HardSigmoid HardSwish Clip Softmax
    LogSoftmax BatchNormalization LayerNormalization InstanceNormalization MaxPool AveragePool
    GlobalAveragePool GlobalMaxPool Flatten Reshape Transpose Squeeze Unsqueeze Concat Split
    Slice Gather Shape Constant ConstantOfShape Cast Identity Dropout Expand Where Equal Less
    Greater Not And Or ReduceMean ReduceSum ReduceMax ReduceMin Range Tile Pad Resize Einsum
    CumSum Trilu Min Max Sum Mean""".split()
    assert set(required) <= set(SUPPORTED_OPS)

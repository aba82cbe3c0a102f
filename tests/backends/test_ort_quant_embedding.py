"""groupwise_embedding on the backends: ONNX Runtime (com.microsoft.GatherBlockQuantized at
2/4/8 bits, gathered-row unpacking at 3 bits; a tied head's codes stored once; equal to
the torch graph within fp32 rounding), TVM (dequantized at import) and the mcu backend
(a clear refusal)."""
from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from gradrewrite.backends.base import get_backend
from gradrewrite.backends.ort import make_session
from gradrewrite.compiler import CompileOptions, compile_graph, run_pipeline
from gradrewrite.errors import BackendError
from gradrewrite.rewrite.capture import capture
from gradrewrite.rewrite.registry import PassContext
from tests.passes.test_quantize_embedding import _bert, _ids, _o1_init, _tied_llama


class TiedLM(torch.nn.Module):
    """Embedding dim 100 (not a multiple of the group: the last group is padded), one
    block, and an LM head that is the table itself."""

    def __init__(self, vocab=300, dim=100):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.fc = torch.nn.Linear(dim, dim)
        _o1_init(self)

    def forward(self, ids):
        h = self.emb(ids)
        h = F.layer_norm(h + torch.tanh(self.fc(h)), h.shape[-1:])
        return F.linear(h, self.emb.weight)


def _quantized(model, ids, bits=4):
    graph = capture(model.eval(), (ids,))
    run_pipeline(graph, f"quantize(mode=weight-only,bits={bits},group=32,embeddings=on)",
                 verify=False, ctx=PassContext())
    return graph


def _export(graph, tmp_path):
    get_backend("ort").compile(graph, tmp_path, options={})
    model = onnx.load(str(tmp_path / "model.onnx"))
    return model, make_session(tmp_path / "model.onnx")


def _run(session, *inputs):
    return session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})[0]


def _within_fp32_rounding(got, ref):
    assert np.abs(got - ref).max() <= 1e-5 * max(1.0, float(np.abs(ref).max()))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_tied_table_stored_once_and_equal_to_torch(bits, tmp_path):
    graph = _quantized(TiedLM(), _ids(300, (2, 3, 5), 0), bits)          # rank-3 indices
    model, session = _export(graph, tmp_path)
    ops = [n.op_type for n in model.graph.node]
    assert ("GatherBlockQuantized" in ops) == (bits in (2, 4, 8))
    packed = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.UINT8
              and i.dims and i.dims[0] == 300 and len(i.dims) == 3]
    assert len(packed) == 1                                  # the tied codes, once
    assert list(packed[0].dims) == [300, 4, 32 * bits // 8]
    assert sum(packed[0].name in n.input for n in model.graph.node) >= 2   # lookup and head
    floats = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert all(math.prod(i.dims) < 300 * 100 for i in floats)              # no fp32 table
    x = _ids(300, (2, 3, 5), 7)
    ref, = graph(x)
    assert ref.abs().max() > 0.5
    _within_fp32_rounding(_run(session, x), ref.numpy())


def test_tied_llama_on_ort(tmp_path):
    graph = _quantized(_tied_llama(), _ids(512, (2, 12), 0))
    model, session = _export(graph, tmp_path)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("GatherBlockQuantized") == 1 and "MatMulNBits" in ops
    table = [i for i in model.graph.initializer if i.dims and i.dims[0] == 512]
    assert sorted(onnx.helper.tensor_dtype_to_np_dtype(i.data_type).name for i in table) == \
        ["float16", "uint8", "uint8"]                        # codes, scales, zero points; once
    x = _ids(512, (2, 12), 3)
    _within_fp32_rounding(_run(session, x), graph(x)[0].numpy())


def test_bert_tables_on_ort(tmp_path):
    graph = _quantized(_bert(), _ids(1024, (2, 16), 0))
    model, session = _export(graph, tmp_path)
    assert [n.op_type for n in model.graph.node].count("GatherBlockQuantized") == 3
    x = _ids(1024, (2, 16), 4)
    _within_fp32_rounding(_run(session, x), graph(x)[0].numpy())


# ----------------------------------------------------------------------------- other backends
def _small_quantized():
    return _quantized(TiedLM(), _ids(300, (1, 8), 0))


@pytest.mark.slow
def test_tvm_dequantizes_the_table_at_import(tmp_path):
    pytest.importorskip("tvm")
    graph = _small_quantized()
    art = compile_graph(graph.clone(), tmp_path / "tvm", CompileOptions(
        backend="tvm", latency_runs=0, verify_inputs=1, backend_options={"target": "llvm"}))
    assert art.report["artifact"]["quantized"]["fp32_weights"] == {"groupwise_embedding": 1,
                                                                  "groupwise_linear": 2}
    x = _ids(300, (1, 8), 5)
    got, = art(x)
    _within_fp32_rounding(got, graph(x)[0].numpy())


def test_mcu_refuses_with_a_clear_error(tmp_path):
    with pytest.raises(BackendError, match="groupwise_embedding"):
        compile_graph(_small_quantized(), tmp_path / "mcu", CompileOptions(backend="mcu", latency_runs=0))

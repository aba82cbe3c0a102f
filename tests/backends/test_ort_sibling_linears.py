"""One MatMulNBits for the batch-1 low-bit layers that read one input
(``backends/ort_sibling_linears.py``): q/k/v and gate/up become one wide call and a
split; the ORT output equals the torch graph within fp32 rounding, the graph itself is
untouched, and what cannot share a call (other rows, 8 bits, different bits) does not."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from gradrewrite.backends.ort import export_onnx
from gradrewrite.backends.ort_outlier_terms import fuse as fuse_terms
from gradrewrite.backends.ort_sibling_linears import SIBLING_LINEARS, fuse
from gradrewrite.compiler import run_pipeline
from gradrewrite.rewrite.capture import capture
from gradrewrite.rewrite.quant_ops import GROUPWISE_LINEAR
from tests.model_zoo import IdsToTensor, hf_llama


class QKV(torch.nn.Module):
    """Three linears on one input (only the first with a bias), then one on their concat."""

    def __init__(self, k: int = 96):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.q = torch.nn.Linear(k, 64)
        self.k = torch.nn.Linear(k, 32, bias=False)
        self.v = torch.nn.Linear(k, 32, bias=False)
        self.o = torch.nn.Linear(128, 40)
        with torch.no_grad():
            for lin in (self.q, self.k, self.v, self.o):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.1)
            self.q.bias.copy_(torch.randn(64, generator=g))

    def forward(self, x):
        return self.o(torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1))


def _compile(tmp_path, model, example, spec):
    graph = capture(model.eval(), example)
    run_pipeline(graph, spec)
    path = tmp_path / "model.onnx"
    export_onnx(graph, path)
    return graph, path


def _run(path, feed):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: v for i, v in zip(sess.get_inputs(), feed)})[0]


def _close(got, ref):
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()))


def _nbits_widths(path) -> list[int]:
    return sorted(next(a.i for a in n.attribute if a.name == "N")
                  for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits")


@pytest.mark.parametrize("bits", [4, 3])
def test_qkv_one_call_equals_graph(tmp_path, bits):
    x = torch.randn(1, 1, 96, generator=torch.Generator().manual_seed(1))
    graph, path = _compile(tmp_path, QKV(), (x,), f"quantize(mode=weight-only,bits={bits},group=32)")
    _close(_run(path, [x.numpy()]), graph(x)[0].detach().numpy())
    assert _nbits_widths(path) == [40, 128]              # q+k+v in one call, o alone
    assert sum(n.op_type == "Split" for n in onnx.load(str(path)).graph.node) == 1


def test_view_equals_graph_and_leaves_it_untouched():
    x = torch.randn(1, 1, 96, generator=torch.Generator().manual_seed(2))
    graph = capture(QKV().eval(), (x,))
    run_pipeline(graph, "quantize(mode=weight-only,bits=4,group=32)")
    view, fused = fuse(graph, graph.gm)
    assert fused == 3 and view is not graph.gm
    assert sum(n.target is SIBLING_LINEARS for n in view.graph.nodes) == 1
    assert sum(n.target is GROUPWISE_LINEAR for n in graph.gm.graph.nodes) == 4
    torch.testing.assert_close(view(x)[0], graph(x)[0], rtol=0, atol=1e-5)


def test_outlier_term_is_the_wide_calls_bias():
    """With whole-column outliers the group's term feeds the wide call as it is."""
    x = torch.randn(1, 1, 96, generator=torch.Generator().manual_seed(3))
    graph = capture(QKV().eval(), (x,))
    run_pipeline(graph, "quantize(mode=weight-only,bits=4,group=32,outliers=0.05,criterion=magnitude,spread=cols)")
    view, _ = fuse_terms(graph)
    view, fused = fuse(graph, view)
    wide = [n for n in view.graph.nodes if n.target is SIBLING_LINEARS]
    assert fused == 3 and len(wide) == 1 and wide[0].args[5] is not None
    assert not any(n.target is torch.ops.aten.split_with_sizes.default and n.args[0] is wide[0].args[5]
                   for n in view.graph.nodes)           # the term's own split is gone
    torch.testing.assert_close(view(x)[0], graph(x)[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("rows,spec", [(4, "bits=4"), (1, "bits=8")])
def test_not_fused(tmp_path, rows, spec):
    """Prompt-shaped inputs and 8-bit layers (an fp32 MatMul) keep their own calls."""
    x = torch.randn(1, rows, 96, generator=torch.Generator().manual_seed(4))
    graph, path = _compile(tmp_path, QKV(), (x,), f"quantize(mode=weight-only,{spec},group=32)")
    assert fuse(graph, graph.gm)[1] == 0
    _close(_run(path, [x.numpy()]), graph(x)[0].detach().numpy())


def _qwen2():
    """Qwen2 (biases on q/k/v, none on o or the MLP), O(1) activations."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      use_cache=False, attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2:
                    p.normal_(0, 1 / p.shape[1] ** 0.5)
                elif name.endswith("bias"):
                    p.normal_(0, 0.5)
    return IdsToTensor(model.eval(), "logits").eval()


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("outliers", ["", ",outliers=0.02,criterion=magnitude,spread=cols"])
def test_transformers_decode_step(tmp_path, family, outliers):
    """One token through a Llama / Qwen2 config: q/k/v and gate/up each one call."""
    model = hf_llama(seq=1)[0] if family == "llama" else _qwen2()
    ids = torch.tensor([[7]])
    graph, path = _compile(tmp_path, model, (ids,), f"quantize(mode=weight-only,bits=4,group=32{outliers})")
    ref = graph(ids)[0].detach().numpy()
    assert float(np.abs(ref).std()) > 1e-3                # O(1) logits, not vanishing
    _close(_run(path, [ids.numpy()]), ref)
    # per layer: q+k+v (64 + 2*32), o (64), gate+up (2*128), down (64); the head (256)
    assert _nbits_widths(path) == sorted([128, 64, 256, 64] * 2 + [256])

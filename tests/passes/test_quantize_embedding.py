"""quantize(mode=weight-only) on embedding tables and tied LM heads: the op, structure
(tables replaced, a tie stored once, bits counted), numerics (half a step; fake-quant
equality on models we did not design) and the ``embeddings=auto`` decision."""
from __future__ import annotations

import math

import pytest
import torch

from gradrewrite.compiler import run_pipeline
from gradrewrite.errors import ConfigError, GradrewriteError
from gradrewrite.passes.quantize.embedding import MIN_SHARE, table_group
from gradrewrite.passes.quantize.weight_only import quantize_groupwise
from gradrewrite.rewrite.capture import capture
from gradrewrite.rewrite.graph import op_name
from gradrewrite.rewrite.quant_embedding_ops import GROUPWISE_EMBEDDING
from gradrewrite.rewrite.quant_ops import GROUPWISE_LINEAR
from gradrewrite.rewrite.registry import PassContext

aten = torch.ops.aten


def _o1_init(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """O(1) activations for a random-weight model: every matrix ~ N(0, 1/fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
    return model


class IdsModel(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids, return_dict=True)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _tied_llama(vocab=512, dim=96):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      use_cache=False, tie_word_embeddings=True, attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lm = LlamaForCausalLM(cfg)
    assert lm.lm_head.weight is lm.model.embed_tokens.weight
    return IdsModel(_o1_init(lm).eval()).eval()


def _bert(vocab=1024):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        bert = BertModel(cfg, add_pooling_layer=False)
    return IdsModel(_o1_init(bert).eval()).eval()


def _ids(vocab, shape, seed):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _quantize(graph, spec, calib=None):
    res = run_pipeline(graph, spec, verify=False, ctx=PassContext(calibration=calib))
    return res.records[-1].report


def _nodes(graph, target):
    return [n for n in graph.nodes if n.op == "call_function" and n.target == target]


# ----------------------------------------------------------------------------- the op
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_op_round_trips_within_half_a_step(bits):
    """dim 100 with group 32: four groups, the last one padded; every looked-up value is
    within half a quantization step of the fp32 table."""
    w = torch.randn(50, 100) * 0.3
    q = quantize_groupwise(w, bits, 32)
    idx = torch.tensor([[0, 7, 49], [3, 3, 12]])
    got = GROUPWISE_EMBEDDING(idx, q.packed, q.scales, q.zeros, bits, 32, 100)
    assert got.shape == (2, 3, 100) and got.dtype == torch.float32
    step = q.scales.float().repeat_interleave(32, dim=1)[:, :100]
    assert ((got - w[idx]).abs() <= step[idx] / 2 + 1e-7).all()
    assert torch.equal(got, q.dequantized()[idx])


@pytest.mark.parametrize("shape", [(7,), (2, 5), (2, 3, 4), ()])
def test_op_takes_indices_of_any_shape(shape):
    w = torch.randn(40, 64)
    q = quantize_groupwise(w, 4, 32)
    idx = _ids(40, shape, 1)
    got = GROUPWISE_EMBEDDING(idx, q.packed, q.scales, q.zeros, 4, 32, 64)
    assert got.shape == (*shape, 64)
    assert torch.equal(got, q.dequantized()[idx])


def test_table_group_never_exceeds_the_row():
    assert table_group(128, 384) == 128
    assert table_group(128, 64) == 64
    assert table_group(128, 100) == 64
    assert table_group(32, 100) == 32


# ----------------------------------------------------------------------------- structure
def test_bert_tables_replaced_and_counted():
    """Random-weight BertModel: word, position and token-type tables all become
    groupwise_embedding lookups (embeddings=on); bytes and bits are what is stored."""
    model = _bert()
    ids = _ids(1024, (2, 16), 0)
    graph = capture(model, (ids,))
    report = _quantize(graph, "quantize(mode=weight-only,bits=4,group=32,embeddings=on)")
    assert not _nodes(graph, aten.embedding.default)
    lookups = _nodes(graph, GROUPWISE_EMBEDDING)
    assert len(lookups) == 3
    tables = {t["path"].rsplit(".", 1)[-1]: t for t in report["embeddings"]["tables"]}
    assert set(tables) == {"word_embeddings", "position_embeddings", "token_type_embeddings"}
    word = tables["word_embeddings"]
    assert word["quantized"] and word["shape"] == [1024, 64] and word["group"] == 32
    # codes: 4 bits each; scales fp16 per 32; zero points 4 bits per group (packed per row)
    assert word["storage_bits"]["codes"] == 1024 * 64 * 4
    assert word["storage_bits"]["scales"] == 1024 * 2 * 16
    assert word["storage_bits"]["zero_points"] == 1024 * 1 * 8
    assert word["bytes_before"] == 1024 * 64 * 4
    assert word["bytes_after"] == sum(word["storage_bits"].values()) // 8
    assert word["bits_per_weight"] == pytest.approx(4 + 16 / 32 + 4 / 32)
    names = {str(n.target) for n in graph.nodes if n.op == "get_attr"}
    assert "model.embeddings.word_embeddings.weight" not in names      # fp32 table is gone
    assert "model.embeddings.word_embeddings.weight_packed" in names
    assert [r["kind"] for r in report["error_report"]].count("embedding") == 3
    # the fake registration lets the rewritten graph go through torch.export again
    ep = graph.to_exported_program()
    assert sum(1 for n in ep.graph.nodes if n.target == GROUPWISE_EMBEDDING) == 3


def test_tied_head_shares_one_quantized_copy():
    model = _tied_llama()
    ids = _ids(512, (2, 12), 0)
    graph = capture(model, (ids,))
    calib = [(_ids(512, (2, 12), s),) for s in range(1, 4)]
    report = _quantize(graph, "quantize(mode=weight-only,bits=4,group=32,embeddings=on)", calib)
    (lookup,) = _nodes(graph, GROUPWISE_EMBEDDING)
    heads = [n for n in _nodes(graph, GROUPWISE_LINEAR) if n.args[1] is lookup.args[1]]
    assert len(heads) == 1                                   # lm_head reads the same buffers
    assert heads[0].args[2] is lookup.args[2] and heads[0].args[3] is lookup.args[3]
    packed = [n for n in graph.nodes if n.op == "get_attr" and str(n.target).endswith("_packed")
              and graph.attr(n).shape[0] == 512]
    assert len(packed) == 1                                  # stored once
    assert not any(graph.attr(n).shape == (512, 96) for n in graph.nodes if n.op == "get_attr")
    (table,) = report["embeddings"]["tables"]
    assert table["tied_heads"] == ["model.lm_head"] and table["quantized"]
    assert "model.lm_head" not in [s["path"] for s in report["skipped"]]
    assert "model.lm_head" not in [r["path"] for r in report["layers"]]
    # the table is counted once in the whole-model figure
    lin_bits = sum(sum(r["storage_bits"].values()) for r in report["layers"])
    lin_numel = sum(r["shape"][0] * r["shape"][1] for r in report["layers"])
    tab_bits = sum(table["storage_bits"].values())
    assert report["bits_per_weight_with_embeddings"] == pytest.approx(
        (lin_bits + tab_bits) / (lin_numel + 512 * 96), abs=1e-4)


# ----------------------------------------------------------------------------- numerics
def _fake_quant(model, bits, group, skip=()):
    """Every Linear / Embedding weight replaced by its round-to-nearest dequantized value."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)) and name not in skip:
                w = mod.weight
                w.copy_(quantize_groupwise(w, bits, table_group(group, w.shape[1])).dequantized())
    return model


def test_tied_llama_equals_fake_quantized_eager_model():
    """The rewritten graph computes what the eager model computes with every linear and
    the tied table replaced by their round-to-nearest dequantized values."""
    graph = capture(_tied_llama(), (_ids(512, (2, 12), 0),))
    _quantize(graph, "quantize(mode=weight-only,bits=4,group=32,embeddings=on)")
    fake = _fake_quant(_tied_llama(), 4, 32, skip=("model.lm_head",))   # tied: done via the table
    assert fake.model.lm_head.weight is fake.model.model.embed_tokens.weight
    x = _ids(512, (2, 12), 9)
    got, = graph(x)
    with torch.no_grad():
        ref = fake(x)
    assert ref.abs().max() > 0.5                             # O(1) logits
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_bert_equals_fake_quantized_eager_model():
    graph = capture(_bert(), (_ids(1024, (2, 16), 0),))
    _quantize(graph, "quantize(mode=weight-only,bits=3,group=32,embeddings=on)")
    fake = _fake_quant(_bert(), 3, 32)
    x = _ids(1024, (2, 16), 5)
    got, = graph(x)
    with torch.no_grad():
        ref = fake(x)
        fp32 = _bert()(x)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (got - fp32).abs().max() > 1e-2                   # the tables really are 3-bit


# ----------------------------------------------------------------------------- auto
class TableThenMLP(torch.nn.Module):
    """ids -> embedding -> two linears. ``spike``: column 0 of every row is huge (and the
    next layer ignores it), so a group's range is set by it and the other values round
    to a coarse grid: quantizing this table costs far more error per bit than the linears."""

    def __init__(self, vocab: int, dim: int = 64, spike: bool = False):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, dim)
        self.fc1 = torch.nn.Linear(dim, 256)
        self.fc2 = torch.nn.Linear(256, 64)
        _o1_init(self)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(vocab, dim, generator=gen))
            if spike:
                self.emb.weight[:, 0] = 200.0 * torch.sign(torch.randn(vocab, generator=gen))
                self.fc1.weight[:, 0] = 0.0

    def forward(self, ids):
        return self.fc2(torch.relu(self.fc1(self.emb(ids))))


def _auto(model, vocab, bits=4):
    ids = _ids(vocab, (4, 16), 0)
    graph = capture(model.eval(), (ids,))
    calib = [(_ids(vocab, (4, 16), s),) for s in range(1, 5)]
    report = _quantize(graph, f"quantize(mode=weight-only,bits={bits},group=32)", calib)
    (table,) = report["embeddings"]["tables"]
    return graph, table


def test_auto_takes_a_large_well_behaved_table():
    graph, table = _auto(TableThenMLP(4096), 4096)
    assert table["share_of_weights"] > 0.5
    assert table["quantized"], table["reason"]
    assert _nodes(graph, GROUPWISE_EMBEDDING) and not _nodes(graph, aten.embedding.default)
    assert table["output_error_with_table"] >= table["output_error_before"] > 0


def test_auto_leaves_a_tiny_table():
    graph, table = _auto(TableThenMLP(16), 16)
    assert table["share_of_weights"] < MIN_SHARE
    assert not table["quantized"] and "too little to save" in table["reason"]
    assert _nodes(graph, aten.embedding.default) and not _nodes(graph, GROUPWISE_EMBEDDING)
    assert "output_error_with_table" in table                 # measured and shown anyway


def test_auto_leaves_a_table_that_costs_more_error_per_bit():
    graph, table = _auto(TableThenMLP(4096, spike=True), 4096)
    assert table["share_of_weights"] > 0.5
    assert not table["quantized"] and ">" in table["reason"], table["reason"]
    assert _nodes(graph, aten.embedding.default)
    # and embeddings=on does what it is told, at that cost
    ids = _ids(4096, (4, 16), 0)
    g2 = capture(TableThenMLP(4096, spike=True).eval(), (ids,))
    rep = _quantize(g2, "quantize(mode=weight-only,bits=4,group=32,embeddings=on)")
    assert rep["embeddings"]["tables"][0]["quantized"]


def test_off_and_exclude_leave_tables_alone():
    ids = _ids(4096, (4, 16), 0)
    graph = capture(TableThenMLP(4096).eval(), (ids,))
    report = _quantize(graph.clone(), "quantize(mode=weight-only,bits=4,embeddings=off)")
    assert report["embeddings"]["tables"] == []
    g = graph.clone()
    report = _quantize(g, "quantize(mode=weight-only,bits=4,embeddings=on,exclude=emb)")
    assert report["embeddings"]["skipped"] == [{"path": "emb", "reason": "excluded by 'emb'"}]
    assert _nodes(g, aten.embedding.default)


def test_bad_options_are_refused():
    graph = capture(TableThenMLP(64).eval(), (_ids(64, (1, 4), 0),))
    with pytest.raises(ConfigError, match="embeddings"):
        _quantize(graph, "quantize(mode=weight-only,bits=4,embeddings=maybe)")
    with pytest.raises(GradrewriteError, match="embedding_bits"):
        _quantize(graph, "quantize(mode=weight-only,bits=4,embedding_bits=5)")
    with pytest.raises(GradrewriteError, match="embeddings=on is for weight-only"):
        _quantize(graph, "quantize(mode=static,embeddings=on)")

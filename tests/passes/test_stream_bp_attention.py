"""stream-bp on every causal attention form: eager (matmul -> softmax -> matmul) attention,
Gemma2 soft-capping with sliding windows, Gemma3 (its (1 + w) norms), Falcon with ALiBi
(eager and SDPA), Bloom's ALiBi through baddbmm, models returning tuples; global token
mixing still refused by name.

Every gradient against plain autograd in fp32 on tiny random-weight models
(initializer_range 0.2: O(1) scores, so soft-caps and ALiBi bend the softmax), with left
padding (fully masked query rows), masked labels and chunks that do not divide T:
relative error < 1e-5 per parameter, as in test_stream_bp.py.
"""
from __future__ import annotations

import pytest
import torch
import transformers as tr

from examples.models import tiny_gpt
from gradrewrite.errors import InputError, PassError
from gradrewrite.passes.stream_bp import StreamBP, causal_lm_loss
from gradrewrite.passes.stream_bp import executor
from gradrewrite.training.stream_bp_step import gradient_check
from tests.passes.test_stream_bp import NonCausalSDPA

VOCAB = 128
T = 30


def _common(**kw) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                use_cache=False, initializer_range=0.2, **kw)


def _gemma(**kw) -> dict:
    return _common(head_dim=8, sliding_window=8, query_pre_attn_scalar=8, **kw)


MODELS = {
    "llama-eager": lambda: tr.LlamaForCausalLM(tr.LlamaConfig(**_common(attn_implementation="eager"))),
    "qwen2-eager": lambda: tr.Qwen2ForCausalLM(tr.Qwen2Config(**_common(attn_implementation="eager"))),
    "gemma2-softcap": lambda: tr.Gemma2ForCausalLM(tr.Gemma2Config(**_gemma(
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0, attn_implementation="eager"))),
    "gemma3-sdpa": lambda: tr.Gemma3ForCausalLM(tr.Gemma3TextConfig(**_gemma(attn_implementation="sdpa"))),
    "gemma3-eager": lambda: tr.Gemma3ForCausalLM(tr.Gemma3TextConfig(**_gemma(attn_implementation="eager"))),
    "falcon-alibi-eager": lambda: tr.FalconForCausalLM(tr.FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True, bias=True,
        new_decoder_architecture=False, multi_query=False, use_cache=False, initializer_range=0.2,
        attn_implementation="eager")),
    "falcon-alibi-sdpa": lambda: tr.FalconForCausalLM(tr.FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True, bias=True,
        new_decoder_architecture=False, multi_query=False, use_cache=False, initializer_range=0.2,
        attn_implementation="sdpa")),
    "bloom-alibi-eager": lambda: tr.BloomForCausalLM(tr.BloomConfig(   # ALiBi through baddbmm
        vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, use_cache=False, initializer_range=0.2,
        attn_implementation="eager")),
}


def model(kind: str) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return MODELS[kind]().float().eval()


def left_padded_batch(pad: int = 7):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, T), generator=gen)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[-1, :pad] = 0                # left padding: its query rows see no key at all
    labels = ids.clone()
    labels[0, 2:6] = -100             # masked labels (a prompt)
    return ids, mask, labels


def grads_vs_autograd(m, ids, labels, mask, **kw) -> tuple[float, StreamBP]:
    m.zero_grad(set_to_none=True)
    logits = m(input_ids=ids, attention_mask=mask).logits
    ref_loss = causal_lm_loss(logits, labels if mask is None else labels.masked_fill(mask == 0, -100))
    ref_loss.backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    sbp = StreamBP(m, **kw)
    loss = sbp.backward(ids, labels=labels, attention_mask=mask)
    assert abs(loss.item() - ref_loss.item()) < 1e-5 * abs(ref_loss.item())
    worst = 0.0
    for n, p in m.named_parameters():
        assert p.grad is not None, n
        worst = max(worst, ((p.grad - ref[n]).norm() / ref[n].norm()).item())
    return worst, sbp


@pytest.mark.parametrize("kind", list(MODELS))
def test_gradients_equal_autograd_fp32_left_padding(kind):
    m = model(kind)
    ids, mask, labels = left_padded_batch()
    err, _ = grads_vs_autograd(m, ids, labels, mask, chunk=7, logits_chunk=11)   # 7, 11 do not divide 30
    assert err < 1e-5, (kind, err)


def test_eager_attention_reads_keys_by_mask_kind():
    """A finite mask (transformers' finfo.min) with padding: every key per chunk, since a
    fully masked row spreads over all of them; the API's own all-ones mask: keys 0:e.
    The stash holds the keys before the grouped-query expansion."""
    m = model("llama-eager")
    ids, mask, labels = left_padded_batch()
    err, sbp = grads_vs_autograd(m, ids, labels, None, chunk=7)
    assert err < 1e-5
    layer = sbp.plan(ids).programs[1]
    assert layer.main.boundary_ranges == [("s", "e"), ("0", "e"), ("0", "e")]
    assert [tuple(n.meta["val"].shape) for n in layer.stash] == [(2, 2, T, 8), (2, T, 16)]  # Hkv = 2
    padded = sbp.plan(ids, mask).programs[1]
    assert padded.main.boundary_ranges == [("s", "e"), ("0", "T"), ("0", "T")]
    assert sbp.plan(ids).kinds["causal"] == 4          # softmax and P @ V per layer


class _Attn(NonCausalSDPA):
    """Its embedding, qkv projection and head, attention written out by the subclasses."""

    def qkv_of(self, ids):
        return self.qkv(self.emb(ids)).chunk(3, -1)


class MaskedFillCausal(_Attn):
    """Causal attention written by hand (masked_fill with -inf), no layer list."""

    def forward(self, ids):
        q, k, v = self.qkv_of(ids)
        n = ids.shape[1]
        keep = torch.ones(n, n, dtype=torch.bool).tril()
        scores = (q @ k.transpose(-1, -2)).masked_fill(~keep, float("-inf"))
        return self.head(torch.softmax(scores, -1) @ v)


def test_hand_written_causal_attention_is_exact_fp64():
    torch.manual_seed(0)
    m = MaskedFillCausal().double()
    ids = torch.randint(0, VOCAB, (2, 13))
    causal_lm_loss(m(ids), ids).backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    StreamBP(m, chunk=5, logits_chunk=4).backward(ids)
    for n, p in m.named_parameters():
        assert ((p.grad - ref[n]).norm() / ref[n].norm()).item() < 1e-12, n


class LinearAttention(_Attn):
    def forward(self, ids):
        q, k, v = self.qkv_of(ids)
        return self.head((q @ k.transpose(-1, -2)) @ v)


class SoftmaxWithoutMask(_Attn):
    def forward(self, ids):
        q, k, v = self.qkv_of(ids)
        return self.head(torch.softmax(q @ k.transpose(-1, -2) / 4, -1) @ v)


class CapAfterMask(_Attn):
    """The soft-cap applied after the mask turns -inf into -30: every key visible."""

    def forward(self, ids):
        q, k, v = self.qkv_of(ids)
        n = ids.shape[1]
        mask = torch.full((n, n), float("-inf")).triu(1)
        return self.head(torch.softmax(torch.tanh((q @ k.transpose(-1, -2) + mask) / 30) * 30, -1) @ v)


@pytest.mark.parametrize("cls,op,why", [
    (LinearAttention, "aten.matmul at <root>", "contracts over the sequence axis"),
    (SoftmaxWithoutMask, "aten.softmax.int at <root>", "non-causal attention"),
    (CapAfterMask, "aten.softmax.int at <root>", "non-causal attention"),
])
def test_global_attention_refused_naming_the_op(cls, op, why):
    m = cls()
    with pytest.raises(PassError) as err:
        StreamBP(m, chunk=4).backward(torch.randint(0, VOCAB, (1, 12)))
    msg = str(err.value)
    assert op in msg and why in msg and "\n" not in msg
    assert all(p.grad is None for p in m.parameters())


def test_bidirectional_eager_encoder_refused_naming_the_softmax():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        bert = tr.BertForMaskedLM(tr.BertConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=64, attn_implementation="eager")).eval()
    ids = torch.randint(0, VOCAB, (1, 12))
    with pytest.raises(PassError, match=r"aten\.softmax\.int at bert\.encoder\.layer\.0\.attention\.self "
                                        r"is non-causal attention"):
        StreamBP(bert, chunk=4).backward(ids, attention_mask=torch.ones_like(ids))


class TupleLM(torch.nn.Module):
    """Returns (loss placeholder, logits, hidden): the logits are found by shape."""

    def __init__(self):
        super().__init__()
        self.lm, _ = tiny_gpt(seq=24, vocab=VOCAB, d_model=32)

    def forward(self, ids):
        logits = self.lm(ids)
        return torch.zeros(()), logits, logits.sum(-1)


def test_tuple_output_in_the_step_check():
    torch.manual_seed(0)
    m = TupleLM()
    ids = torch.randint(0, VOCAB, (2, 24))
    check = gradient_check(m, ids, chunk=7, logits_chunk=5)
    assert check["max_relative_error"] < 1e-5
    assert executor.logits_of({"logits": ids}) is ids
    with pytest.raises(InputError, match="without logits"):
        executor.logits_of((torch.zeros(()),))


def test_old_transformers_refused_naming_the_minimum(monkeypatch):
    assert executor.MIN_TRANSFORMERS == "4.44"
    monkeypatch.setattr(executor, "MIN_TRANSFORMERS", "99.0")
    with pytest.raises(InputError, match=r"transformers \S+ is older than 99\.0, the oldest version stream-bp "
                                         r"supports; pip install 'transformers>=99\.0'"):
        StreamBP(model("llama-eager"))


def test_saved_model_output_program_loads_in_a_fresh_process(tmp_path):
    """A .pt2 of a transformers model names CausalLMOutputWithPast in its output spec:
    the loader imports that class's module (transformers not yet imported there)."""
    import subprocess
    import sys

    m = model("llama-eager")
    ids = torch.randint(0, VOCAB, (1, 12))
    torch.export.save(torch.export.export(m, (ids,), strict=False), tmp_path / "lm.pt2")
    code = ("import sys, torch\n"
            "from gradrewrite.rewrite.safe_load import load_exported_program\n"
            "assert 'transformers' not in sys.modules\n"
            f"out = load_exported_program({str(tmp_path / 'lm.pt2')!r}).module()(torch.zeros(1, 12, dtype=torch.long))\n"
            "print(type(out).__name__, tuple(out.logits.shape))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == f"CausalLMOutputWithPast (1, 12, {VOCAB})"


@pytest.mark.parametrize("padded", [False, True])
def test_grouped_query_sdpa_reads_unrepeated_keys(padded):
    """transformers' repeat_kv before SDPA becomes SDPA(enable_gqa=True) on the kv heads
    themselves: the stash holds Hkv = 2 heads, no expand is left before an attention, and
    every gradient still equals autograd (chunks 7 and logits 11 do not divide T)."""
    m = tr.LlamaForCausalLM(tr.LlamaConfig(**_common(attn_implementation="sdpa"))).float().train()
    ids, mask, labels = left_padded_batch()
    err, sbp = grads_vs_autograd(m, ids, labels, mask if padded else None, chunk=7, logits_chunk=11)
    assert err < 1e-5
    plan = sbp.plan(ids, mask if padded else None)
    sdpa = [n for n in plan.graph.gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert len(sdpa) == 2 and all(n.kwargs.get("enable_gqa") for n in sdpa)
    assert all(a.target is torch.ops.aten.add.Tensor and b.target is torch.ops.aten.transpose.int   # rotated k, v
               for a, b in (n.args[1:3] for n in sdpa))
    assert [tuple(n.meta["val"].shape) for n in plan.programs[1].stash] == [(2, 2, T, 8)] * 2


def test_repeated_heads_other_than_repeat_kv_are_left_alone():
    """An expand that repeats along another axis, or key and value repeated a different
    number of times, is not grouped-query attention: the graph keeps its SDPA."""
    class Repeats(torch.nn.Module):
        def forward(self, q, k, v):
            k4 = k[:, :, None].expand(1, 2, 2, 6, 8).reshape(1, 4, 6, 8)
            v4 = v[:, None].expand(1, 2, 2, 6, 8).reshape(1, 4, 6, 8)   # heads interleaved the other way
            return torch.nn.functional.scaled_dot_product_attention(q, k4, v4, is_causal=True)

    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    gm = torch.export.export(Repeats(), (q, k, v)).module()
    want = gm(q, k, v)
    executor.native_gqa(gm)
    sdpa = [n for n in gm.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default]
    assert len(sdpa) == 1 and not sdpa[0].kwargs.get("enable_gqa")
    torch.testing.assert_close(gm(q, k, v), want, rtol=0, atol=0)


@pytest.mark.parametrize("q0,q1,k1", [(5, 12, 12), (5, 12, 17), (0, 9, 9)])
def test_grouped_query_chunk_attention_gradients_fp64(q0, q1, k1):
    """Query rows [q0, q1) against 2 kv heads shared by 4 query heads (the flash kernel's
    prefix + diagonal blocks, merged): output and gradients equal SDPA on the repeated
    keys with the bottom-right causal mask, in fp64."""
    from gradrewrite.passes.stream_bp.attention import causal_chunk_mask, chunk_causal_attention

    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, q1 - q0, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(2, 2, k1, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(2, 2, k1, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    g = torch.randn(2, 4, q1 - q0, 8, dtype=torch.float64, generator=gen)
    out = chunk_causal_attention(q, k, v, q0, q1, 0, k1, scale=0.3, enable_gqa=True)
    got = torch.autograd.grad(out, (q, k, v), g)
    mask = torch.zeros(q1 - q0, k1, dtype=torch.bool)
    mask[:, :q1] = causal_chunk_mask(q, q0, q1, 0, q1)
    ref_out = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask, scale=0.3)
    ref = torch.autograd.grad(ref_out, (q, k, v), g)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)

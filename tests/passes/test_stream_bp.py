"""stream-bp: every parameter gradient against plain autograd, refusals, the API.

Tolerances: fp64 relative error < 1e-10 and fp32 < 1e-5 (rounding of a different
summation order). Llama and Qwen2 compute RMSNorm in float32 by design (they cast to
float32 whatever the model dtype), so in an fp64 model their gradients are exact only to
float32 rounding: there the fp64 bound is 1e-6, and the fp32 runs use 1e-5.
"""
from __future__ import annotations

import pytest
import torch
import transformers as tr

from examples.models import tiny_gpt
from gradrewrite.errors import GradrewriteError, PassError
from gradrewrite.passes.stream_bp import StreamBP, causal_lm_loss, count_targets
from gradrewrite.passes.stream_bp.attention import chunk_causal_attention

VOCAB = 256


def hf_causal(kind: str, dtype=torch.float64):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if kind == "llama":
            m = tr.LlamaForCausalLM(tr.LlamaConfig(
                vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                use_cache=False, attn_implementation="sdpa"))
        elif kind == "qwen2":
            m = tr.Qwen2ForCausalLM(tr.Qwen2Config(
                vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                use_cache=False, attn_implementation="sdpa"))
        else:
            m = tr.GPT2LMHeadModel(tr.GPT2Config(
                vocab_size=VOCAB, n_positions=128, n_embd=32, n_layer=2, n_head=4,
                bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, use_cache=False,
                attn_implementation="sdpa"))
    return m.to(dtype).eval()


def batch(T: int, B: int = 2, pad: int = 5, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[-1, T - pad:] = 0            # right padding on the last sequence
    labels = ids.clone()
    labels[0, 2:6] = -100             # masked labels (e.g. a prompt)
    return ids, mask, labels


def reference_grads(model, ids, labels, mask=None, hf=True):
    model.zero_grad(set_to_none=True)
    if hf:
        logits = model(input_ids=ids, attention_mask=mask).logits
        labels = labels.masked_fill(mask == 0, -100)
    else:
        logits = model(ids)
    loss = causal_lm_loss(logits, labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def max_rel_err(model, ref):
    worst = 0.0
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        err = ((p.grad - ref[name]).norm() / ref[name].norm().clamp(min=1e-30)).item()
        worst = max(worst, err)
    return worst


@pytest.mark.parametrize("kind,tol64", [("gpt2", 1e-10), ("llama", 1e-6), ("qwen2", 1e-6)])
def test_hf_gradients_fp64_padding_and_masked_labels(kind, tol64):
    model = hf_causal(kind)
    ids, mask, labels = batch(T=23)
    loss, ref = reference_grads(model, ids, labels, mask)
    for chunk, logits_chunk in [(23, 23), (5, 7), (8, 3)]:   # 5, 8, 3 do not divide 23
        model.zero_grad(set_to_none=True)
        got = StreamBP(model, chunk=chunk, logits_chunk=logits_chunk).backward(
            ids, labels=labels, attention_mask=mask)
        assert abs(got.item() - loss.item()) < 1e-10 * abs(loss.item())
        assert max_rel_err(model, ref) < tol64, (kind, chunk)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_hf_gradients_fp32(kind):
    model = hf_causal(kind, torch.float32)
    ids, mask, labels = batch(T=30, pad=7)
    _, ref = reference_grads(model, ids, labels, mask)
    StreamBP(model, chunk=7, logits_chunk=11).backward(ids, labels=labels, attention_mask=mask)
    assert max_rel_err(model, ref) < 1e-5


def test_hf_without_attention_mask():
    model = hf_causal("llama")
    ids, _, labels = batch(T=20)
    model.zero_grad()
    loss = causal_lm_loss(model(input_ids=ids).logits, labels)
    loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    sbp = StreamBP(model, chunk=6)
    sbp.backward(ids, labels=labels)
    assert max_rel_err(model, ref) < 1e-6
    # the all-ones mask the API supplies is exactly causal: chunks use the mask-free kernel
    layer = sbp.plan(ids).programs[1].main.gm
    assert chunk_causal_attention in [n.target for n in layer.graph.nodes]
    assert not any(n.target is torch.ops.aten.scaled_dot_product_attention.default
                   for n in layer.graph.nodes)


@pytest.mark.parametrize("chunk", [40, 16, 13, 1])
def test_tiny_gpt_gradients_fp64(chunk):
    model, (ids,) = tiny_gpt(seq=40)
    model = model.double()
    labels = ids.clone()
    labels[0, 10:20] = -100
    _, ref = reference_grads(model, ids, labels, hf=False)
    StreamBP(model, chunk=chunk, logits_chunk=9).backward(ids, labels=labels)
    assert max_rel_err(model, ref) < 1e-10


def test_tiny_gpt_gradients_fp32_and_tied_head():
    model, (ids,) = tiny_gpt(seq=48, tie_weights=True)
    assert model.lm_head.weight is model.tok_emb.weight
    _, ref = reference_grads(model, ids, ids, hf=False)
    StreamBP(model, n_chunks=5).backward(ids)
    assert max_rel_err(model, ref) < 1e-5


def test_frozen_parameters_get_no_gradient():
    model, (ids,) = tiny_gpt(seq=32)
    model = model.double()
    for p in model.tok_emb.parameters():
        p.requires_grad_(False)
    model.pos_emb.weight.requires_grad_(False)
    _, ref = reference_grads(model, ids, ids, hf=False)
    StreamBP(model, chunk=10).backward(ids)
    assert model.tok_emb.weight.grad is None
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for n, p in trained.items():
        assert ((p.grad - ref[n]).norm() / ref[n].norm()).item() < 1e-10, n


def test_gradient_accumulation_matches_one_big_batch():
    model = hf_causal("gpt2")
    ids, mask, labels = batch(T=20, B=4)
    _, ref = reference_grads(model, ids, labels, mask)
    total = count_targets(labels, mask)
    sbp = StreamBP(model, chunk=6)
    for part in (slice(0, 1), slice(1, 4)):      # micro-batches of unequal size
        sbp.backward(ids[part], labels=labels[part], attention_mask=mask[part], normalizer=total)
    assert max_rel_err(model, ref) < 1e-10


def _bert_mlm():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return tr.BertForMaskedLM(tr.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64, attn_implementation="sdpa")).eval()


def test_refuses_bidirectional_encoder_naming_the_attention():
    ids, mask, _ = batch(T=16)
    with pytest.raises(PassError) as err:
        StreamBP(_bert_mlm(), chunk=4).backward(ids, attention_mask=mask)
    msg = str(err.value)
    assert "aten.scaled_dot_product_attention" in msg
    assert "bert.encoder.layer.0.attention.self" in msg and "non-causal" in msg
    assert "\n" not in msg


class MeanPoolLM(torch.nn.Module):
    """Adds a sequence average to every token: a global token mix."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, 16)
        self.mix = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(16, VOCAB)

    def forward(self, ids):
        h = self.mix(self.emb(ids))
        return self.head(h + h.mean(dim=1, keepdim=True))


class NonCausalSDPA(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, 16)
        self.qkv = torch.nn.Linear(16, 48)
        self.head = torch.nn.Linear(16, VOCAB)

    def forward(self, ids):
        q, k, v = self.qkv(self.emb(ids)).unsqueeze(1).chunk(3, dim=-1)
        return self.head(torch.nn.functional.scaled_dot_product_attention(q, k, v).squeeze(1))


@pytest.mark.parametrize("model,op,where", [
    (MeanPoolLM(), "aten.mean.dim", "reduces over the sequence axis"),
    (NonCausalSDPA(), "aten.scaled_dot_product_attention", "non-causal attention"),
])
def test_refuses_global_token_mixing(model, op, where):
    ids = torch.randint(0, VOCAB, (1, 12))
    with pytest.raises(PassError, match=op) as err:
        StreamBP(model, chunk=4).backward(ids)
    assert where in str(err.value)
    assert all(p.grad is None for p in model.parameters())   # nothing half-done


def test_refuses_dropout_in_training_mode():
    model = hf_causal("gpt2").train()
    ids, mask, labels = batch(T=12)
    with pytest.raises(PassError, match="dropout"):
        StreamBP(model, chunk=4).backward(ids, labels=labels, attention_mask=mask)


def test_bad_input_ids_are_a_user_error():
    model, _ = tiny_gpt(seq=16)
    with pytest.raises(GradrewriteError, match="input_ids must be integer"):
        StreamBP(model, chunk=4).backward(torch.randn(1, 16))


def test_training_loop_converges_like_autograd():
    """Three SGD steps with stream-bp and with loss.backward() end at the same weights."""
    results = []
    for use_sbp in (True, False):
        model, (ids,) = tiny_gpt(seq=24)
        model = model.double()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        sbp = StreamBP(model, chunk=7)
        losses = []
        for _ in range(3):
            opt.zero_grad()
            if use_sbp:
                loss = sbp.backward(ids)
            else:
                loss = causal_lm_loss(model(ids), ids)
                loss.backward()
            opt.step()
            losses.append(loss.item())
        results.append((losses, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (l1, w1), (l2, w2) = results
    assert l1[-1] < l1[0]
    assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-10
    assert ((w1 - w2).norm() / w2.norm()).item() < 1e-12

"""FSDPStreamBP: two gloo processes with a Llama sharded by FSDP2 (fully_shard on each
decoder layer and the model), each on its own half of the batch (padding and masked
labels split unevenly, so the normaliser matters), give the gradients, the loss and
the SGD-updated parameters of one process running plain autograd on the whole batch
(fp32: relative error < 1e-5 per parameter)."""
from __future__ import annotations

import os

import pytest
import torch
import transformers as tr

from gradrewrite.errors import GradrewriteError
from gradrewrite.passes.stream_bp import causal_lm_loss
from tests.gloo import process_group, spawn

V, T = 128, 21


def _model():
    torch.manual_seed(0)
    return tr.LlamaForCausalLM(tr.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        use_cache=False, attn_implementation="sdpa"))


def _data():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (4, T), generator=gen)
    mask = torch.ones_like(ids)
    mask[3, -6:] = 0
    labels = ids.clone()
    labels[2:, :12] = -100             # rank 1 has far fewer valid labels than rank 0
    return ids, mask, labels


def _worker(rank: int, port: int, out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard

    from gradrewrite.training import FSDPStreamBP

    with process_group(rank, port):
        model = _model()
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        ids, mask, labels = _data()
        half = slice(2 * rank, 2 * rank + 2)
        sbp = FSDPStreamBP(model, chunk=6)
        loss = sbp.backward(ids[half], labels=labels[half], attention_mask=mask[half])
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        local = {n: tuple(p.grad.to_local().shape) for n, p in model.named_parameters()}
        opt.step()
        params = {n: p.full_tensor() for n, p in model.named_parameters()}
        torch.save({"loss": loss, "grads": grads, "params": params, "local": local},
                   os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_fsdp_gloo_processes_match_one(tmp_path):
    spawn(_worker, str(tmp_path))
    model = _model()
    ids, mask, labels = _data()
    loss = causal_lm_loss(model(input_ids=ids, attention_mask=mask).logits, labels.masked_fill(mask == 0, -100))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert abs(got["loss"].item() - loss.item()) < 1e-6 * loss.item()
        for name, p in model.named_parameters():
            full = tuple(p.shape)
            assert got["local"][name][0] < full[0], (name, "not sharded")  # each rank holds a part
            err = ((got["grads"][name] - grads[name]).norm() / grads[name].norm()).item()
            assert err < 1e-5, (rank, name, err)
            err = ((got["params"][name] - p.detach()).norm() / p.norm()).item()
            assert err < 1e-6, (rank, name, err)


def test_needs_a_sharded_model():
    from gradrewrite.training import FSDPStreamBP

    with pytest.raises(GradrewriteError, match="not initialised") as exc:
        FSDPStreamBP(_model())
    assert "\n" not in str(exc.value)

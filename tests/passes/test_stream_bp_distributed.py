"""stream-bp data parallel: two gloo processes on half a batch each give the gradients
of one process on the whole batch (labels split unevenly, so the normaliser matters)."""
from __future__ import annotations

import os

import torch

from examples.models import tiny_gpt
from gradrewrite.passes.stream_bp import StreamBP, causal_lm_loss
from tests.gloo import process_group, spawn

T = 24


def _data():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 512, (2, T), generator=gen)
    labels = ids.clone()
    labels[1, :15] = -100              # rank 1 has far fewer valid labels than rank 0
    return ids, labels


def _model():
    model, _ = tiny_gpt(seq=T)
    return model.double()


def _worker(rank: int, port: int, out_dir: str) -> None:
    with process_group(rank, port):
        model = _model()
        ids, labels = _data()
        loss = StreamBP(model, chunk=7).backward(ids[rank:rank + 1], labels=labels[rank:rank + 1])
        torch.save({"loss": loss, "grads": {n: p.grad for n, p in model.named_parameters()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))


def test_two_gloo_processes_match_one(tmp_path):
    spawn(_worker, str(tmp_path))
    model = _model()
    ids, labels = _data()
    loss = causal_lm_loss(model(ids), labels)
    loss.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert abs(got["loss"].item() - loss.item()) < 1e-10 * loss.item()
        for name, p in model.named_parameters():
            err = ((got["grads"][name] - p.grad).norm() / p.grad.norm()).item()
            assert err < 1e-10, (rank, name, err)

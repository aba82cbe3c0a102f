"""Train a causal LM with stream-bp: the backward runs layer by layer, chunk by chunk.

    python examples/stream_bp_train.py                    # tiny GPT, T=256
    python examples/stream_bp_train.py --model llama --seq 512 --chunk 128

``StreamBP(model, chunk=...).backward(ids, labels=..., attention_mask=...)`` replaces
``loss.backward()``: it returns the loss (mean next-token cross entropy over the valid
shifted labels) and leaves the same gradients as ordinary backprop in ``.grad``; the
optimizer step is unchanged. The first step is checked against plain autograd.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.models import tiny_gpt  # noqa: E402
from gradrewrite.passes.stream_bp import StreamBP, causal_lm_loss  # noqa: E402


def make_model(name: str, seq: int):
    if name == "tiny-gpt":
        model, _ = tiny_gpt(seq=seq)
        return model, 512, lambda ids, mask: model(ids)
    import transformers as tr

    torch.manual_seed(0)
    model = tr.LlamaForCausalLM(tr.LlamaConfig(
        vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq,
        use_cache=False, attn_implementation="sdpa"))
    return model, 1024, lambda ids, mask: model(input_ids=ids, attention_mask=mask).logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny-gpt", "llama"], default="tiny-gpt")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()

    model, vocab, logits_of = make_model(args.model, args.seq)
    model.train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, args.seq), generator=gen)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    if args.model == "llama":          # right-pad the second sequence
        mask[1, -args.seq // 4:] = 0
    labels[:, : args.seq // 8] = -100  # e.g. a prompt that is not trained on

    sbp = StreamBP(model, chunk=args.chunk)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(args.steps):
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = sbp.backward(ids, labels=labels,
                            attention_mask=mask if args.model == "llama" else None)
        took = time.perf_counter() - t0
        if step == 0:
            got = {n: p.grad.clone() for n, p in model.named_parameters()}
            opt.zero_grad(set_to_none=True)
            masked = labels.masked_fill(mask == 0, -100)
            causal_lm_loss(logits_of(ids, mask), masked).backward()
            worst = max(((got[n] - p.grad).norm() / p.grad.norm()).item()
                        for n, p in model.named_parameters())
            print(f"max relative gradient difference vs loss.backward(): {worst:.2e}")
            for n, p in model.named_parameters():
                p.grad = got[n]
        opt.step()
        print(f"step {step}: loss {loss.item():.4f}  ({took:.2f}s)")
    print("plan:", sbp.report())


if __name__ == "__main__":
    main()

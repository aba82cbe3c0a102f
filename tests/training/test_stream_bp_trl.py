"""StreamBPSFTTrainer: TRL's SFTTrainer whose training steps run StreamBP.

Same seed, data and arguments as a plain ``trl.SFTTrainer``: after a few SGD steps
(batches of sequences of different lengths, right-padded by SFTTrainer's collator,
gradient accumulation, a chunk that does not divide T) the losses and parameters equal
the plain run's to fp32 rounding (``bf16=False``: SFTConfig's default bf16=True would
run StreamBP's chunks under autocast while SFTTrainer's own CPU step stays fp32). Skipped where trl is not installed (the test extra
installs it).
"""
from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tr = pytest.importorskip("transformers")

from gradrewrite.errors import GradrewriteError  # noqa: E402
from gradrewrite.training.stream_bp_trl import StreamBPSFTTrainer  # noqa: E402

V = 96


def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return tr.LlamaForCausalLM(tr.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False, attn_implementation="sdpa"))


def tokenizer():
    from tokenizers import Tokenizer, models

    vocab = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, V)}}
    return tr.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
                                      pad_token="<pad>", eos_token="<eos>")


def dataset():
    g = torch.Generator().manual_seed(1)
    lengths = [20, 13, 24, 17, 9, 22, 24, 15]
    return datasets.Dataset.from_dict(
        {"input_ids": [torch.randint(2, V, (n,), generator=g).tolist() for n in lengths]})


def train(cls, tmp, steps: int = 3, **kw):
    model = tiny()
    args = trl.SFTConfig(
        output_dir=str(tmp), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=steps,
        learning_rate=0.05, optim="sgd", lr_scheduler_type="linear", warmup_steps=1, max_grad_norm=1.0,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0, dataloader_num_workers=0,
        disable_tqdm=True, max_length=None, gradient_checkpointing=False, bf16=False)
    trainer = cls(model=model, args=args, train_dataset=dataset(), processing_class=tokenizer(), **kw)
    trainer.train()
    return model, [h for h in trainer.state.log_history if "loss" in h]


def test_sgd_parameters_equal_plain_sft_trainer(tmp_path):
    ref, ref_log = train(trl.SFTTrainer, tmp_path)
    got, got_log = train(StreamBPSFTTrainer, tmp_path, chunk=7)
    # SFTTrainer sums the log-probabilities of its fused, tiled LM head: another order of
    # summation than StreamBP's chunked cross entropy (a wrong token count would be off by %)
    assert [h["loss"] for h in got_log] == pytest.approx([h["loss"] for h in ref_log], rel=2e-5)
    assert [h["num_tokens"] for h in got_log] == [h["num_tokens"] for h in ref_log]
    for (name, p), (_, q) in zip(ref.named_parameters(), got.named_parameters()):
        err = ((p - q).norm() / p.norm()).item()
        assert err < 1e-5, (name, err)
    moved = max((p - q).abs().max().item() for p, q in zip(tiny().parameters(), got.parameters()))
    assert moved > 1e-3  # the runs trained
    chunks = [h["stream_bp_chunks"] for h in got_log]   # the longest padded batch: T = 24 in 7-row chunks
    assert len(chunks) == 3 and max(chunks) == 4


def test_refuses_other_loss_types(tmp_path):
    args = trl.SFTConfig(output_dir=str(tmp_path), loss_type="dft", report_to=[], use_cpu=True, max_length=None,
                         gradient_checkpointing=False)
    with pytest.raises(GradrewriteError, match="loss_type"):
        StreamBPSFTTrainer(model=tiny(), args=args, train_dataset=dataset(), processing_class=tokenizer())

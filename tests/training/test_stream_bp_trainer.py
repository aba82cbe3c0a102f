"""StreamBPTrainer: a drop-in for transformers.Trainer whose training steps run StreamBP.

Same seed, data and arguments as a plain ``Trainer``: the parameters after a few
optimizer steps (gradient accumulation, left/right padding, masked labels, a chunk
that does not divide T) equal the plain run's to fp32 rounding. SGD keeps the
comparison at the gradients' rounding (relative 1e-5 per parameter); AdamW divides by
the root of the second moment, which magnifies the rounding of near-zero gradients, so
it is held to a bound in units of the learning rate.
"""
from __future__ import annotations

import logging

import pytest
import torch
import transformers as tr
from torch import nn

from gradrewrite.errors import GradrewriteError
from gradrewrite.passes.stream_bp import causal_lm_loss
from gradrewrite.training import StreamBPTrainer

V, T = 128, 24


def tiny(kind: str) -> nn.Module:
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               use_cache=False, attn_implementation="sdpa")
    if kind == "llama":
        return tr.LlamaForCausalLM(tr.LlamaConfig(**cfg))
    return tr.Qwen2ForCausalLM(tr.Qwen2Config(**cfg))


class Batches(torch.utils.data.Dataset):
    """Token ids with right padding (labels -100 there), a masked prompt on every other
    row and one row padded on the left."""

    def __init__(self, n: int = 8):
        self.ids = torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i]
        labels, mask = ids.clone(), torch.ones_like(ids)
        if i % 3 == 0:
            mask[-5:] = 0
            labels[-5:] = -100
        if i % 2 == 0:
            labels[:4] = -100
        if i == 5:
            mask[:3] = 0
            labels[:3] = -100
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def train(cls, kind: str = "llama", *, steps: int = 3, optim: str = "sgd", bf16: bool = False, tmp=None,
          **kw):
    model = tiny(kind)
    args = tr.TrainingArguments(
        output_dir=str(tmp), per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_steps=steps, learning_rate=0.05 if optim == "sgd" else 1e-2, optim=optim,
        lr_scheduler_type="linear", warmup_steps=1, max_grad_norm=1.0, logging_steps=1,
        report_to=[], use_cpu=True, save_strategy="no", seed=0, bf16=bf16,
        dataloader_num_workers=0, disable_tqdm=True)
    trainer = cls(model=model, args=args, train_dataset=Batches(), **kw)
    trainer.train()
    return model, trainer.state.log_history


def losses(history: list[dict]) -> list[float]:
    return [h["loss"] for h in history if "loss" in h]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_sgd_parameters_equal_plain_trainer(kind, tmp_path, caplog):
    ref, ref_log = train(tr.Trainer, kind, tmp=tmp_path)
    with caplog.at_level(logging.INFO, logger="gradrewrite.training.stream_bp_trainer"):
        got, got_log = train(StreamBPTrainer, kind, tmp=tmp_path, chunk=7)
    assert losses(got_log) == pytest.approx(losses(ref_log), rel=1e-6)
    for (name, p), (_, q) in zip(ref.named_parameters(), got.named_parameters()):
        err = ((p - q).norm() / p.norm()).item()
        assert err < 1e-5, (name, err)
    init = tiny(kind)
    moved = max((p - q).abs().max().item() for p, q in zip(init.parameters(), got.parameters()))
    assert moved > 1e-3  # the runs trained
    # the chunk count is in the Trainer's logs and in the module's log record
    assert [h["stream_bp_chunks"] for h in got_log if "loss" in h] == [4] * 3
    assert any("4 chunks of 7 rows" in r.getMessage() for r in caplog.records)


def test_adamw_and_scheduler_untouched(tmp_path):
    ref, ref_log = train(tr.Trainer, optim="adamw_torch", tmp=tmp_path)
    got, got_log = train(StreamBPTrainer, optim="adamw_torch", tmp=tmp_path, n_chunks=3)
    assert losses(got_log) == pytest.approx(losses(ref_log), rel=1e-6)
    assert [h["learning_rate"] for h in got_log if "loss" in h] == \
        [h["learning_rate"] for h in ref_log if "loss" in h]
    lr = 1e-2
    worst = max((p - q).abs().max().item() for p, q in zip(ref.parameters(), got.parameters()))
    assert worst < 1e-2 * lr, worst


def test_bf16_autocast_matches_plain_bf16(tmp_path):
    ref, ref_log = train(tr.Trainer, steps=1, bf16=True, tmp=tmp_path)
    got, got_log = train(StreamBPTrainer, steps=1, bf16=True, tmp=tmp_path, chunk=8)
    fp32, fp32_log = train(StreamBPTrainer, steps=1, tmp=tmp_path, chunk=8)
    ref_h, got_h, fp32_h = ref_log[0], got_log[0], fp32_log[0]
    assert got_h["loss"] == pytest.approx(ref_h["loss"], rel=1e-5)
    assert got_h["loss"] != fp32_h["loss"]  # the chunks ran under autocast
    assert got_h["grad_norm"] == pytest.approx(ref_h["grad_norm"], rel=2e-3)  # bf16 rounding


class MeanPool(nn.Module):
    """Adds the sequence mean to every token: global mixing StreamBP must refuse."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, 16)
        self.head = nn.Linear(16, V)

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = self.embed(input_ids)
        return self.head(h + h.mean(dim=1, keepdim=True))


def test_refused_model_is_one_line_error(tmp_path):
    args = tr.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1,
                                report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = StreamBPTrainer(model=MeanPool(), args=args, train_dataset=Batches(), chunk=8)
    with pytest.raises(GradrewriteError) as exc:
        trainer.train()
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("stream-bp: aten.mean.dim") and "sequence" in msg, msg


@pytest.mark.parametrize("kwargs,needle", [
    ({"label_smoothing_factor": 0.1}, "label_smoothing_factor"),
    ({"gradient_checkpointing": True}, "gradient_checkpointing"),
])
def test_refused_arguments(kwargs, needle, tmp_path):
    args = tr.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kwargs)
    with pytest.raises(GradrewriteError, match=needle) as exc:
        StreamBPTrainer(model=tiny("llama"), args=args, train_dataset=Batches())
    assert "\n" not in str(exc.value)


def test_bad_chunk_and_batch_keys(tmp_path):
    args = tr.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1,
                                remove_unused_columns=False, disable_tqdm=True)
    with pytest.raises(GradrewriteError, match="chunk=0"):
        StreamBPTrainer(model=tiny("llama"), args=args, train_dataset=Batches(), chunk=0)

    class WithPositions(Batches):
        def __getitem__(self, i):
            return {**super().__getitem__(i), "position_ids": torch.arange(T)}

    trainer = StreamBPTrainer(model=tiny("llama"), args=args, train_dataset=WithPositions())
    with pytest.raises(GradrewriteError, match="position_ids"):
        trainer.train()


def test_old_transformers_refused_naming_the_minimum(monkeypatch):
    from gradrewrite.training.stream_bp_trainer import MIN_TRANSFORMERS_TRAINER, check_trainer_version

    import transformers  # the module object the check imports at call time (in this run not always ``tr``)

    monkeypatch.setattr(transformers, "__version__", "4.45.2")
    with pytest.raises(GradrewriteError, match=MIN_TRANSFORMERS_TRAINER) as exc:
        check_trainer_version()
    assert "\n" not in str(exc.value)
    monkeypatch.setattr(transformers, "__version__", MIN_TRANSFORMERS_TRAINER + ".0")
    check_trainer_version()


class MeanLossLM(nn.Module):
    """A model without loss kwargs returning the micro-batch mean loss: the Trainer
    divides it by the accumulation steps (the other branch of its normalisation)."""

    def __init__(self):
        super().__init__()
        self.lm = tiny("llama")

    def forward(self, input_ids, attention_mask=None, labels=None):
        logits = self.lm(input_ids=input_ids, attention_mask=attention_mask).logits
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = causal_lm_loss(logits, labels)
        return out


def test_model_without_loss_kwargs_uses_micro_batch_means(tmp_path):
    def run(cls, **kw):
        model = MeanLossLM()
        args = tr.TrainingArguments(
            output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
            max_steps=2, learning_rate=0.05, optim="sgd", logging_steps=1, report_to=[], use_cpu=True,
            save_strategy="no", seed=0, dataloader_num_workers=0, disable_tqdm=True)
        trainer = cls(model=model, args=args, train_dataset=Batches(), **kw)
        assert not trainer.model_accepts_loss_kwargs
        trainer.train()
        return model, trainer.state.log_history

    ref, ref_log = run(tr.Trainer)
    got, got_log = run(StreamBPTrainer, chunk=5)
    assert losses(got_log) == pytest.approx(losses(ref_log), rel=1e-6)
    for (name, p), (_, q) in zip(ref.named_parameters(), got.named_parameters()):
        assert ((p - q).norm() / p.norm()).item() < 1e-5, name

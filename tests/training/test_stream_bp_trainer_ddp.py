"""StreamBPTrainer data parallel: two gloo processes launched as torchrun would (env
variables, the Trainer's accelerate DDP), each on its share of the batch with gradient
accumulation, end with the parameters of one process running the plain Trainer on the
whole batch (same rows per optimizer step: the dataset is one step per epoch)."""
from __future__ import annotations

import os

import pytest
import torch
import transformers as tr

from tests.gloo import spawn
from tests.training.test_stream_bp_trainer import Batches, tiny


def _args(out: str, batch: int, **kw) -> tr.TrainingArguments:
    return tr.TrainingArguments(output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=2,
                                num_train_epochs=2, learning_rate=0.05, optim="sgd", logging_steps=1,
                                report_to=[], use_cpu=True, save_strategy="no", seed=0,
                                dataloader_num_workers=0, disable_tqdm=True, **kw)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from gradrewrite.training import StreamBPTrainer

    model = tiny("llama")
    trainer = StreamBPTrainer(model=model, args=_args(out, 2, ddp_backend="gloo"), train_dataset=Batches(),
                              chunk=7)
    trainer.train()
    assert trainer.accelerator.num_processes == 2
    torch.save({"params": {n: p.detach() for n, p in model.named_parameters()},
                "log": trainer.state.log_history}, os.path.join(out, f"rank{rank}.pt"))


def test_two_ddp_processes_equal_one_plain_trainer(tmp_path):
    spawn(_worker, str(tmp_path))
    model = tiny("llama")
    trainer = tr.Trainer(model=model, args=_args(str(tmp_path), 4), train_dataset=Batches())
    trainer.train()
    ref_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert [h["loss"] for h in got["log"] if "loss" in h] == \
            pytest.approx(ref_losses, rel=1e-6)
        for name, p in model.named_parameters():
            err = ((got["params"][name] - p.detach()).norm() / p.norm()).item()
            assert err < 1e-6, (rank, name, err)

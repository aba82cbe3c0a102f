"""TRL's ``SFTTrainer`` with StreamBP's chunked backward: a drop-in subclass.

    from gradrewrite.training.stream_bp_trl import StreamBPSFTTrainer   # was: from trl import SFTTrainer
    trainer = StreamBPSFTTrainer(model=model, args=SFTConfig(..., gradient_checkpointing=False),
                                 train_dataset=ds,
                                 processing_class=tokenizer, chunk=1024)
    trainer.train()

It is ``StreamBPMixin`` (``stream_bp_trainer``) put before ``trl.SFTTrainer``: the
dataset preparation, collator, optimizer, scheduler, logging and checkpoints stay
SFTTrainer's; each training step's forward + backward runs as StreamBP and leaves the
gradients SFTTrainer's own step would (its default ``loss_type="nll"``: summed
next-token cross entropy over valid labels divided by the batch's token count).
``SFTConfig`` turns gradient checkpointing on by default: set
``gradient_checkpointing=False`` (StreamBP recomputes layer by layer itself). It also
defaults to ``bf16=True``: StreamBP's chunks then run under the Trainer's bf16 autocast
(as ``StreamBPTrainer`` does), where SFTTrainer's own step on CPU was measured to stay
fp32 (transformers 5.25, trl 1.16): pass ``bf16=False`` for fp32 steps equal to it.

Not supported (refused with a message): ``loss_type`` other than ``"nll"``,
``padding_free`` / packing with the ``bfd`` strategies (their batches carry
``position_ids``), ``activation_offloading`` (StreamBP already keeps one chunk's
activations), and the MoE router auxiliary loss. The per-token metrics SFTTrainer
computes inside its loss (``entropy``, ``mean_token_accuracy``) are not logged in
training; ``num_tokens`` is.
"""
from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from .stream_bp_trainer import StreamBPMixin


class StreamBPSFTMixin(StreamBPMixin):
    """StreamBPMixin plus the checks and bookkeeping SFTTrainer needs."""

    def _refuse_unsupported(self) -> None:
        super()._refuse_unsupported()
        args = self.args
        loss_type = getattr(args, "loss_type", "nll")
        if loss_type != "nll":
            raise ConfigError(f"StreamBPSFTTrainer: loss_type={loss_type!r} is not supported (the chunked "
                              "loss is next-token cross entropy)", "use loss_type='nll', or trl.SFTTrainer")
        if getattr(self, "padding_free", False):
            raise ConfigError("StreamBPSFTTrainer: padding-free batches (padding_free=True, or packing with "
                              "the bfd strategies) are not supported: they carry position_ids",
                              "set padding_free=False and packing=False (or packing_strategy='wrapped')")
        if getattr(args, "activation_offloading", False):
            raise ConfigError("StreamBPSFTTrainer: activation_offloading=True is not needed (StreamBP keeps "
                              "one chunk's activations)", "set activation_offloading=False")
        if getattr(self, "aux_loss_enabled", False):
            raise ConfigError("StreamBPSFTTrainer: the MoE router auxiliary loss is not supported",
                              "set output_router_logits=False in the model config, or use trl.SFTTrainer")

    def training_step(self, model: torch.nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        # SFTTrainer's collator adds nothing StreamBP needs beyond ids, mask and labels
        inputs = {k: v for k, v in inputs.items() if k != "use_cache"}
        loss = super().training_step(model, inputs, num_items_in_batch)
        if hasattr(self, "_total_train_tokens") and inputs.get("attention_mask") is not None:
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // getattr(self, "_tp_size", 1)
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return loss


def _sft_class():
    from trl import SFTTrainer

    class StreamBPSFTTrainer(StreamBPSFTMixin, SFTTrainer):
        """``trl.SFTTrainer`` whose training steps run StreamBP (see the module)."""

    StreamBPSFTTrainer.__module__ = __name__
    return StreamBPSFTTrainer


def __getattr__(name: str) -> Any:
    # trl is imported only when the trainer is asked for
    if name == "StreamBPSFTTrainer":
        cls = _sft_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)

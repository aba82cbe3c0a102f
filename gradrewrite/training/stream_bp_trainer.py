"""``transformers.Trainer`` with StreamBP's chunked backward: a drop-in subclass.

    from gradrewrite.training import StreamBPTrainer        # was: from transformers import Trainer
    trainer = StreamBPTrainer(model=model, args=args, train_dataset=ds, data_collator=collator,
                              chunk=1024)                    # rows per backward chunk
    trainer.train()

Only ``training_step`` changes: the micro-batch's forward + backward run as
:class:`~gradrewrite.passes.stream_bp.StreamBP` (layer by layer, ``chunk`` rows at a
time) and leave in ``.grad`` the gradients the plain ``Trainer`` would; gradient
accumulation, clipping, the optimizer, the scheduler, callbacks, evaluation and
checkpoints stay the Trainer's. The loss is the Trainer's own for causal LMs: the sum
of next-token cross entropy over valid shifted labels divided by the Trainer's
``num_items_in_batch`` (the whole accumulated batch, across devices when
``average_tokens_across_devices``), or the micro-batch mean divided by the
accumulation steps for a model without loss kwargs. One difference: a label at a
padded position (``attention_mask == 0``) never counts (the plain Trainer counts it
unless the collator wrote ``-100`` there, as ``DataCollatorForLanguageModeling`` does).

Mixed precision: ``bf16=True`` / ``fp16=True`` runs the chunks under the Trainer's
(accelerate's) autocast; the model is captured without it. Data parallel (``torchrun``,
DDP): each rank backpropagates its micro-batches and the gradients are summed once,
on the last micro-batch of an accumulation. The Trainer's own FSDP / DeepSpeed
integrations are refused; shard with ``gradrewrite.training.stream_bp_fsdp`` instead.

Supported ``transformers``: 4.46 or newer (the first whose ``training_step`` receives
``num_items_in_batch``); tested with 5.25.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ConfigError, InputError
from ..passes.stream_bp.api import StreamBP, _mask_labels
from ..passes.stream_bp.executor import IGNORE_INDEX, default_chunk, shifted_labels

MIN_TRANSFORMERS_TRAINER = "4.46"
INPUT_KEYS = ("input_ids", "attention_mask", "labels")

logger = logging.getLogger("gradrewrite.training.stream_bp_trainer")


def check_trainer_version() -> None:
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS_TRAINER):
        raise InputError(f"StreamBPTrainer: transformers {transformers.__version__} is older than "
                         f"{MIN_TRANSFORMERS_TRAINER} (its Trainer does not pass num_items_in_batch)",
                         f"pip install 'transformers>={MIN_TRANSFORMERS_TRAINER}', or call StreamBP "
                         "in your own loop")


@contextlib.contextmanager
def _without_autocast_wrapper(model: torch.nn.Module):
    """accelerate wraps ``model.forward`` in autocast for mixed precision (keeping the
    original as ``_original_forward``); the capture must see the plain forward."""
    original = model.__dict__.get("_original_forward")
    if original is None:
        yield
        return
    wrapped = model.__dict__["forward"]
    model.forward = original
    try:
        yield
    finally:
        model.forward = wrapped


class StreamBPMixin:
    """Put before a ``transformers.Trainer`` class (``class T(StreamBPMixin, SFTTrainer)``)
    to run its training steps with StreamBP. Keyword arguments: ``chunk`` (rows per
    backward chunk), ``logits_chunk`` (rows per LM-head/loss chunk, default = chunk),
    ``n_chunks`` (chunks per sequence when ``chunk`` is not given; default 4)."""

    def __init__(self, *args: Any, chunk: int | None = None, logits_chunk: int | None = None,
                 n_chunks: int | None = None, **kwargs: Any):
        check_trainer_version()
        for name, value in (("chunk", chunk), ("logits_chunk", logits_chunk), ("n_chunks", n_chunks)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"StreamBPTrainer: {name}={value!r}", f"give {name} as an integer >= 1")
        super().__init__(*args, **kwargs)
        self._refuse_unsupported()
        self.stream_bp_config = {"chunk": chunk, "logits_chunk": logits_chunk, "n_chunks": n_chunks}
        self._stream_bp: StreamBP | None = None
        self._stream_bp_model: torch.nn.Module | None = None
        self._stream_bp_logged: set = set()
        self.stream_bp_chunks: int | None = None

    def _refuse_unsupported(self) -> None:
        args = self.args
        if getattr(args, "label_smoothing_factor", 0):
            raise ConfigError(f"StreamBPTrainer: label_smoothing_factor={args.label_smoothing_factor} is not "
                              "supported (the chunked loss is plain next-token cross entropy)",
                              "set label_smoothing_factor=0, or use transformers.Trainer")
        if getattr(self, "compute_loss_func", None) is not None:
            raise ConfigError("StreamBPTrainer: a custom compute_loss_func is not supported (the chunked "
                              "loss is next-token cross entropy)", "drop compute_loss_func")
        if getattr(args, "gradient_checkpointing", False):
            raise ConfigError("StreamBPTrainer: gradient_checkpointing=True is not needed (StreamBP "
                              "recomputes layer by layer itself)", "set gradient_checkpointing=False")
        if getattr(args, "fsdp", None) or self.accelerator.distributed_type.value == "FSDP":
            raise ConfigError("StreamBPTrainer: the Trainer's FSDP integration is not supported",
                              "shard with gradrewrite.training.stream_bp_fsdp.FSDPStreamBP in your own loop")
        if getattr(args, "deepspeed", None) or self.accelerator.distributed_type.value == "DEEPSPEED":
            raise ConfigError("StreamBPTrainer: DeepSpeed is not supported",
                              "drop deepspeed=, or shard with gradrewrite.training.stream_bp_fsdp")
        if getattr(args, "n_gpu", 1) > 1:
            raise ConfigError(f"StreamBPTrainer: torch.nn.DataParallel over {args.n_gpu} GPUs is not "
                              "supported", "launch one process per GPU with torchrun (DDP)")

    # -- the step -------------------------------------------------------------------

    def _streambp_for(self, model: torch.nn.Module) -> StreamBP:
        inner = self.accelerator.unwrap_model(model)
        if self._stream_bp is None or self._stream_bp_model is not inner:
            cfg = self.stream_bp_config
            # sync=False: the gradients are summed over ranks here, once per accumulation
            self._stream_bp = StreamBP(inner, chunk=cfg["chunk"], logits_chunk=cfg["logits_chunk"],
                                       n_chunks=cfg["n_chunks"], sync=False)
            self._stream_bp_model = inner
        return self._stream_bp

    def _stream_bp_inputs(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        extra = sorted(k for k, v in inputs.items() if k not in INPUT_KEYS and v is not None)
        if extra:
            raise InputError(f"StreamBPTrainer: batch key(s) {', '.join(extra)} are not supported "
                             f"(StreamBP takes {', '.join(INPUT_KEYS)})",
                             "drop them in the collator, or set remove_unused_columns=True")
        if "input_ids" not in inputs:
            raise InputError("StreamBPTrainer: the batch has no input_ids",
                             "collate token ids as input_ids (e.g. DataCollatorForLanguageModeling)")
        ids = inputs["input_ids"]
        labels = inputs.get("labels")
        return ids, ids if labels is None else labels, inputs.get("attention_mask")

    def get_batch_samples(self, epoch_iterator, num_batches, *args, **kwargs):
        # labels at padded positions never count, also in the Trainer's num_items_in_batch
        return super().get_batch_samples(map(_mask_pad_labels, epoch_iterator), num_batches, *args, **kwargs)

    def training_step(self, model: torch.nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        ids, labels, mask = self._stream_bp_inputs(inputs)
        labels = _mask_labels(labels, mask)
        sbp = self._streambp_for(model)
        with _without_autocast_wrapper(sbp.model):
            plan = sbp.plan(ids, mask)
        self._note_plan(sbp, plan)
        scale, world = self._loss_scale(labels, num_items_in_batch)
        # StreamBP computes sum(CE) / normalizer and the gradients are summed over ranks;
        # the plain Trainer's loss is sum(CE) * scale and DDP averages its gradients over
        # ``world`` ranks: normalizer = world / scale
        with self.compute_loss_context_manager(), self.accelerator.autocast():
            part = sbp.backward(ids, labels=labels, attention_mask=mask, normalizer=world / scale)
        if world > 1 and self.accelerator.sync_gradients:
            self._sum_gradients(sbp.model)
        return (part * world).to(torch.float32).to(self.args.device)  # the plain Trainer's value

    def _loss_scale(self, labels: torch.Tensor, num_items_in_batch) -> tuple[float, int]:
        """The factor the plain Trainer multiplies the micro-batch's summed cross entropy
        by, and the number of data-parallel ranks its gradients are averaged over."""
        world = self.accelerator.num_processes
        scaled_for_ga = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled_for_ga is None:
            scaled_for_ga = bool(self.model_accepts_loss_kwargs and num_items_in_batch is not None)
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            scale = 1.0 / float(num_items_in_batch)
            if self.args.average_tokens_across_devices:
                scale *= self.accelerator.num_processes
        else:  # the model's own mean over this micro-batch
            count = int((shifted_labels(labels) != IGNORE_INDEX).sum())
            scale = 1.0 / max(count, 1)
        if not scaled_for_ga:
            scale /= self.current_gradient_accumulation_steps
        return scale, world

    @staticmethod
    def _sum_gradients(model: torch.nn.Module) -> None:
        for p in model.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)

    def _note_plan(self, sbp: StreamBP, plan) -> None:
        T = plan.T
        chunk = default_chunk(T, sbp.chunk, sbp.n_chunks)
        self.stream_bp_chunks = -(-T // chunk)
        key = (T, chunk)
        if key not in self._stream_bp_logged:
            self._stream_bp_logged.add(key)
            logger.info("stream-bp: %d layers, T=%d: %d chunks of %d rows, LM head %d rows per chunk",
                        len(plan.segments) - 2, T, self.stream_bp_chunks, chunk, sbp.logits_chunk or chunk)

    def log(self, logs: dict, *args: Any, **kwargs: Any) -> None:
        if self.stream_bp_chunks is not None and "loss" in logs:
            logs = {**logs, "stream_bp_chunks": self.stream_bp_chunks}
        return super().log(logs, *args, **kwargs)


def _mask_pad_labels(batch):
    if isinstance(batch, Mapping) and "labels" in batch and batch.get("attention_mask") is not None:
        batch = {**batch, "labels": _mask_labels(batch["labels"], batch["attention_mask"])}
    return batch


def _trainer_class():
    from transformers import Trainer

    class StreamBPTrainer(StreamBPMixin, Trainer):
        """``transformers.Trainer`` whose training steps run StreamBP (see the module)."""

    StreamBPTrainer.__module__ = __name__
    return StreamBPTrainer


def __getattr__(name: str):
    # transformers is imported only when the trainer is asked for
    if name == "StreamBPTrainer":
        cls = _trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(name)

"""The training-loop API: call ``StreamBP(model).backward(...)`` instead of ``loss.backward()``.

    sbp = StreamBP(model, chunk=1024, logits_chunk=1024)
    for batch in loader:
        loss = sbp.backward(batch["input_ids"], labels=batch["labels"],
                            attention_mask=batch["attention_mask"])
        opt.step(); opt.zero_grad()

``backward`` computes the mean next-token cross entropy over valid shifted labels
(``-100`` and padded positions excluded) and leaves exactly the gradients of ordinary
backprop in ``.grad``. Gradient accumulation: pass ``normalizer=`` (the valid-label
count of the whole accumulated batch, see :func:`count_targets`) to every micro-batch.
Data parallel: with ``torch.distributed`` initialised, the label count and the gradients
are summed over ranks, so N processes give the gradients of one process on the whole
batch (do not also wrap the model in DistributedDataParallel).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...errors import InputError
from .executor import IGNORE_INDEX, LogitsOf, Plan, capture, default_chunk, run_step, shifted_labels


def count_targets(labels: torch.Tensor, attention_mask: torch.Tensor | None = None) -> int:
    """How many shifted labels a batch contributes to the loss."""
    return int((shifted_labels(_mask_labels(labels, attention_mask)) != IGNORE_INDEX).sum())


def _mask_labels(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return labels
    return labels.masked_fill(attention_mask == 0, IGNORE_INDEX)


class StreamBP:
    """Exact sequence-chunked backward for a causal LM returning logits ``B x T x V``."""

    def __init__(self, model: nn.Module, chunk: int | None = None, logits_chunk: int | None = None,
                 n_chunks: int | None = None, sync: bool | None = None):
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        self.model = model
        self.wrapper = LogitsOf(model)
        self.chunk, self.logits_chunk, self.n_chunks = chunk, logits_chunk, n_chunks
        self.sync = sync
        self._plans: dict[Any, Plan] = {}

    def plan(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Plan:
        """Capture and analyse for this input shape (cached)."""
        inputs = self._inputs(input_ids, attention_mask)
        made_up_mask = attention_mask is None and "attention_mask" in inputs
        key = tuple((k, tuple(v.shape), v.dtype) for k, v in inputs.items()) + (made_up_mask,)
        if key not in self._plans:
            T = input_ids.shape[1]
            self._plans[key] = capture(self.wrapper, inputs, default_chunk(T, self.chunk, self.n_chunks),
                                       fixed_inputs=made_up_mask)
        return self._plans[key]

    def _inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict:
        if input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
            raise InputError(f"stream-bp: input_ids must be integer batch x seq, got "
                             f"{tuple(input_ids.shape)} {input_ids.dtype}",
                             "pass token ids shaped (batch, seq)")
        if attention_mask is None and self.wrapper.keywords:
            # transformers builds its causal mask from an explicit mask in a form the
            # analysis follows row by row; without one it uses a packed-sequence check.
            attention_mask = torch.ones_like(input_ids)
        inputs = {"input_ids": input_ids}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        return inputs

    def backward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 normalizer: float | None = None, sync_grads: bool = True) -> torch.Tensor:
        """One forward + chunked backward; returns the (detached) loss.

        Distributed with gradient accumulation: ``sync_grads=False`` on all but the last
        micro-batch, so the sum over ranks is taken once."""
        labels = input_ids if labels is None else labels
        labels = _mask_labels(labels, attention_mask)
        plan = self.plan(input_ids, attention_mask)
        T = plan.T
        chunk = default_chunk(T, self.chunk, self.n_chunks)
        logits_chunk = self.logits_chunk or chunk
        dist = self._distributed()
        if normalizer is None:
            count = (shifted_labels(labels) != IGNORE_INDEX).sum().to(torch.float64)
            if dist:
                torch.distributed.all_reduce(count)
            normalizer = count.clamp(min=1).item()
        inputs = self._inputs(input_ids, attention_mask)
        loss = run_step(plan, self.wrapper, inputs, labels, chunk, logits_chunk, normalizer)
        if dist and sync_grads:
            for p in self.model.parameters():
                if p.requires_grad:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    torch.distributed.all_reduce(p.grad)
            torch.distributed.all_reduce(loss)
        return loss

    def _distributed(self) -> bool:
        if self.sync is False:
            return False
        return torch.distributed.is_available() and torch.distributed.is_initialized()

    def report(self) -> dict[str, Any]:
        plans = list(self._plans.values())
        return {"chunk": self.chunk, "logits_chunk": self.logits_chunk, "n_chunks": self.n_chunks,
                **(plans[-1].report() if plans else {})}

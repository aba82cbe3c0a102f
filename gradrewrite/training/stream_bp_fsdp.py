"""StreamBP on a model sharded with PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``).

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.AdamW(model.parameters())            # over the shards, as usual
    sbp = FSDPStreamBP(model, chunk=1024)
    for batch in loader:                                   # each rank its own batch
        loss = sbp.backward(batch["input_ids"], labels=batch["labels"],
                            attention_mask=batch["attention_mask"])
        opt.step(); opt.zero_grad()

Each step gathers the full parameters (FSDP's ``unshard``), runs StreamBP's chunked
backward on this rank's batch, sums the gradients over ranks into each rank's shard
(``.grad`` of the sharded DTensor parameters, added to what is there, so gradient
accumulation works) and reshards. The loss and gradients are those of one process on
the union of the ranks' batches: the normaliser (valid shifted labels) is counted over
all ranks. Parameters and optimizer state stay sharded between steps; within a step the
full parameters are held, as with ZeRO-2 (``reshard_after_forward=False``). Works on
gloo (CPU) and NCCL.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError
from ..passes.stream_bp.api import StreamBP, _mask_labels
from ..passes.stream_bp.executor import IGNORE_INDEX, shifted_labels


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def _hooks_off(modules: list[nn.Module]):
    """FSDP's forward hooks (all-gather, reshard, backward hooks) stay out of the capture:
    the parameters are gathered already."""
    saved = [(m, m._forward_pre_hooks, m._forward_hooks) for m in modules]
    for m in modules:
        m._forward_pre_hooks, m._forward_hooks = OrderedDict(), OrderedDict()
    try:
        yield
    finally:
        for m, pre, post in saved:
            m._forward_pre_hooks, m._forward_hooks = pre, post


class FSDPStreamBP:
    """:class:`~gradrewrite.passes.stream_bp.StreamBP` for an FSDP2-sharded causal LM."""

    def __init__(self, model: nn.Module, chunk: int | None = None, logits_chunk: int | None = None,
                 n_chunks: int | None = None):
        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError("FSDPStreamBP: torch.distributed is not initialised",
                              "call torch.distributed.init_process_group first (or use StreamBP)")
        self.modules = fsdp_modules(model)
        if not self.modules or self.modules[0] is not model:
            raise ConfigError(f"FSDPStreamBP: {type(model).__name__} is not sharded with fully_shard",
                              "call torch.distributed.fsdp.fully_shard on its layers and on the model "
                              "itself, or use StreamBP")
        self.model = model
        self.sbp = StreamBP(model, chunk=chunk, logits_chunk=logits_chunk, n_chunks=n_chunks, sync=False)

    def backward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, normalizer: float | None = None) -> torch.Tensor:
        """One forward + chunked backward on this rank's batch; returns the loss of all
        ranks' batches together. ``normalizer``: the valid-label count of everything that
        is accumulated into one optimizer step, over all ranks (default: this call's)."""
        labels = input_ids if labels is None else labels
        labels = _mask_labels(labels, attention_mask)
        if normalizer is None:
            count = (shifted_labels(labels) != IGNORE_INDEX).sum().to(torch.float64)
            dist.all_reduce(count)
            normalizer = count.clamp(min=1).item()
        sharded = dict(self.model.named_parameters())
        self._unshard()
        try:
            with _hooks_off(self.modules):
                self.sbp.plan(input_ids, attention_mask)
            loss = self.sbp.backward(input_ids, labels=labels, attention_mask=attention_mask,
                                     normalizer=normalizer)
            self._reduce_into_shards(sharded)
        finally:
            self._reshard()
        dist.all_reduce(loss)
        return loss

    def _unshard(self) -> None:
        for m in self.modules:
            m.unshard()

    def _reshard(self) -> None:
        for m in reversed(self.modules):
            m.reshard()

    def _reduce_into_shards(self, sharded: dict[str, Any]) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        for name, full in self.model.named_parameters():
            shard = sharded[name]
            if not shard.requires_grad:
                continue
            grad = full.grad if full.grad is not None else torch.zeros_like(full)
            full.grad = None
            dist.all_reduce(grad)
            if isinstance(shard, DTensor):
                grad = distribute_tensor(grad, shard.device_mesh, shard.placements, src_data_rank=None)
            shard.grad = grad if shard.grad is None else shard.grad + grad

    def report(self) -> dict[str, Any]:
        return {**self.sbp.report(), "sharded_modules": len(self.modules)}

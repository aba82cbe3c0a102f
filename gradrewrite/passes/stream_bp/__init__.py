"""stream-bp: exact sequence-chunked backward (StreamBP) for causal language models.

The backward pass of a training step runs layer by layer and, inside each layer, chunk
by chunk along the sequence: rows [s, e) are recomputed (keys/values 0:e for causal
attention), their backward runs at once and is freed. The LM head and loss are
chunked too, with the exact normaliser (count of valid shifted labels). Gradients equal
ordinary backprop up to rounding; peak memory drops from O(layers x T x width) of
activations to the layer boundaries plus one chunk.

Modules: ``seq_axis`` (op kinds, sequence-axis tracking), ``partition`` (layers),
``chunk_program`` (per-layer fx program for rows [s, e)), ``executor`` (the step),
``api`` (:class:`StreamBP` for training loops). The registered pass checks that a
captured forward graph can be chunked (naming the op that prevents it) and records the
chunking config in ``graph.meta["stream_bp"]`` and the report; the chunked training
step itself runs through :class:`StreamBP`, in a training loop or as the artifact of
``compile --train --loss causal_lm -p stream-bp(...)`` (``gradrewrite.training.stream_bp_step``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import ConfigError, PassError
from ...rewrite.graph import Graph
from ...rewrite.registry import PassContext, PassResult, register_pass
from .api import StreamBP, count_targets
from .executor import analyse, causal_lm_loss

__all__ = ["StreamBP", "StreamBPPass", "count_targets", "causal_lm_loss"]


@register_pass("stream-bp")
@dataclass(frozen=True)
class StreamBPPass:
    """StreamBP: the causal LM's training step with an exact backward run chunk by chunk
    along the sequence (less activation memory at long sequences, same gradients)."""

    chunk: int = field(default=1024, metadata={"help": "sequence rows per backward chunk"})
    logits_chunk: int = field(default=0, metadata={"help": "rows per LM-head/loss chunk (0: = chunk)"})

    def __post_init__(self) -> None:
        if self.chunk < 1 or self.logits_chunk < 0:
            raise ConfigError(f"stream-bp: chunk={self.chunk}, logits_chunk={self.logits_chunk}",
                              "use chunk >= 1 and logits_chunk >= 0")

    def config(self) -> dict:
        return {"chunk": self.chunk, "logits_chunk": self.logits_chunk or self.chunk}

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        if graph.meta.get("train_step") or graph.meta.get("training"):
            raise PassError("stream-bp does not rewrite a captured training-step graph: it "
                            "builds its own chunked step from the forward",
                            "compile with --train --loss causal_lm, or call "
                            "gradrewrite.passes.stream_bp.StreamBP in a training loop")
        trainable = {name for name, p in graph.gm.named_parameters(remove_duplicate=False)
                     if p.dtype.is_floating_point}
        plan = analyse(graph, graph.gm, self.chunk, trainable)
        T = plan.T
        n_chunks = -(-T // self.chunk)
        graph.meta["stream_bp"] = self.config()
        report = {**self.config(), **plan.report(), "chunks_per_layer": n_chunks,
                  "layers": len(plan.segments) - 2}
        ctx.info(f"stream-bp: {report['layers']} layers, {n_chunks} chunks of {self.chunk} rows")
        # The chunked step is built at training time from this analysis; the captured
        # forward itself is left as it is.
        return PassResult(changed=False, report=report)

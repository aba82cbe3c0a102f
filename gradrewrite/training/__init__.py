"""Training steps as compile targets.

``compile_graph`` compiles three kinds of graph along one road (the same atomic OUT,
manifest, report, verification and ``run``):

- an inference graph (no ``train``);
- an SGD training step: forward, loss, backward and update captured together
  (``Train(loss="cross_entropy" | "mse")``), for any backend that runs it (torch,
  ort, tvm, mcu fp32 and int8);
- a StreamBP step (``Train(loss="causal_lm")`` with ``stream-bp`` ending the pipeline):
  a causal LM whose backward runs chunk by chunk (``stream_bp_step``).

For training loops: ``StreamBPTrainer`` / ``StreamBPMixin`` (``stream_bp_trainer``,
``transformers.Trainer`` with StreamBP steps) and ``FSDPStreamBP`` (``stream_bp_fsdp``,
StreamBP on an FSDP2-sharded model), imported on first use.

``prepare`` turns the captured inference graph into the graph kind ``train`` asks for:
the pipeline's inference passes (``fold-bn``, ``quantize`` ...) run first, on the
inference graph, then the step is captured and the remaining passes rewrite it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..errors import ConfigError
from ..rewrite.graph import Graph
from ..rewrite.pipeline import PassSpec, build_passes
from ..rewrite.registry import PassContext

LOSSES = ("cross_entropy", "mse", "causal_lm")
STREAM_BP = "stream-bp"


@dataclass(frozen=True)
class Train:
    """What training step to compile (the CLI's ``--train`` flags)."""

    loss: str = "cross_entropy"
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    label: str | None = None  # labels input spec, e.g. "8:int64:10" (default: from the output)
    # static int8 step: the logits' quantizer range is the calibrated one times this (>= 1;
    # 1 = as calibrated), so fine-tuned logits do not saturate (passes.qas.logit_headroom)
    logit_headroom: float = 8.0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}", f"valid losses: {', '.join(LOSSES)}")
        from ..passes.qas import check_logit_headroom
        check_logit_headroom(self.logit_headroom)

    def is_stream_bp(self, specs: Sequence[PassSpec]) -> bool:
        return self.loss == "causal_lm" or any(s.name == STREAM_BP for s in specs)


def split_inference_passes(specs: Sequence[PassSpec]) -> int:
    """How many leading passes work on the inference graph (before the step is captured)."""
    built = build_passes(list(specs))
    return next((i for i, p in enumerate(built) if "training-step" in getattr(p, "requires", ())), len(specs))


def run_inference_passes(graph: Graph, specs: Sequence[PassSpec], *, seed: int = 0, calibration: Any = None,
                         console=None) -> None:
    """Run ``specs`` (e.g. fold-bn, quantize(mode=static) calibrated on ``calibration``)
    on the inference graph in place, with the same progress a compile shows."""
    from ..rewrite.pass_manager import PassManager, VerifyEachPass, console_feedback

    if not specs:
        return
    shown, progress = console_feedback(console, calibration)  # these run before the capture: shown too
    PassManager(build_passes(list(specs)), [VerifyEachPass(seed=seed), *shown]).run(
        graph, PassContext(seed=seed, calibration=calibration, progress=progress))


def capture_sgd_step(graph: Graph, train: Train, *, seed: int = 0, status=None) -> Graph:
    """The inference graph -> one training-step graph; labels are an extra input."""
    from ..rewrite.capture import parse_input_spec
    from ..rewrite.quant_ops import DEQUANTIZE_PER_CHANNEL
    from ..rewrite.train_step import capture_train_step, default_labels

    headroom = None
    if any(n.target == DEQUANTIZE_PER_CHANNEL for n in graph.gm.graph.nodes):  # static int8: train the integers
        from ..passes.qas import logit_headroom, trainable_int8
        graph = trainable_int8(graph)
        headroom = logit_headroom(graph, train.logit_headroom)   # a different output scale, read by all
    out = graph(*graph.example_inputs)[0]
    spec = parse_input_spec(train.label, len(graph.inputs)) if train.label else default_labels(train.loss, out)
    labels = spec.random(torch.Generator().manual_seed(seed))
    with (status("capturing the training step …") if status else contextlib.nullcontext()):
        step = capture_train_step(graph, train.loss, (*graph.example_inputs, labels), optimizer=train.optimizer,
                                  lr=train.lr, momentum=train.momentum)
    if headroom is not None:
        step.meta["train_step"]["logit_headroom"] = headroom
    return step


def int8_step_chains(spec: PassSpec) -> PassSpec:
    """Static int8 quantization before an SGD step quantizes every layer output unless told
    otherwise (``outputs=all``): the int8 step (``qas``, the mcu integer step) requantizes
    every conv/linear, and a layer whose output ``outputs=auto`` leaves float has no
    integer reference there."""
    if spec.name != "quantize" or "outputs" in spec.options:
        return spec
    chains = PassSpec(spec.name, {**spec.options, "outputs": "all"})
    try:
        build_passes([chains])
    except ConfigError:   # weight-only quantization: no outputs option
        return spec
    return chains


def prepare(graph: Graph, specs: Sequence[PassSpec], train: Train | None, *, backend: str, seed: int = 0,
            calibration: Any = None, console=None) -> tuple[Graph, list[PassSpec]]:
    """``graph`` as the kind ``train`` asks for, and the passes still to run on it.

    Without ``train`` nothing changes. A StreamBP step keeps the inference graph (the
    ``stream-bp`` pass analyses it; ``stream_bp_step`` writes and checks the step);
    an SGD step runs the inference passes, then captures forward + loss + backward +
    update as one graph."""
    specs = list(specs)
    if train is None:
        if any(s.name == STREAM_BP for s in specs):
            raise ConfigError(f"{STREAM_BP} rewrites a training step", "add --train --loss causal_lm")
        return graph, specs
    if train.is_stream_bp(specs):
        from .stream_bp_step import check_request
        check_request(specs, train, backend)
        return graph, specs
    n = split_inference_passes(specs)
    specs[:n] = [int8_step_chains(s) for s in specs[:n]]
    run_inference_passes(graph, specs[:n], seed=seed, calibration=calibration, console=console)
    step = capture_sgd_step(graph, train, seed=seed,
                            status=console.status if console is not None else None)
    step.meta["train_step"]["captured_after"] = [sp.text() for sp in specs[:n]]
    return step, specs[n:]


def __getattr__(name: str):
    # the Trainer drop-in and the FSDP step import transformers / torch.distributed: on demand
    if name in ("StreamBPTrainer", "StreamBPMixin"):
        from . import stream_bp_trainer
        return getattr(stream_bp_trainer, name)
    if name == "FSDPStreamBP":
        from .stream_bp_fsdp import FSDPStreamBP
        return FSDPStreamBP
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

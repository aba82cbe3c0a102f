"""The StreamBP step: a causal LM's training step with a chunked, exact backward.

``compile(..., train=Train(loss="causal_lm"), passes="...,stream-bp(chunk=...)")``: the
passes before ``stream-bp`` rewrite the inference graph, ``stream-bp`` analyses it
(layers, op kinds; it names the op that blocks chunking), and ``write_step`` saves the
forward as ``model.pt2`` with the chunking config in ``stream_bp.json``, loads that file
back and checks on the example batch that the chunked step's gradients equal plain
autograd (``report.json["stream_bp"]["gradient_check"]``), measuring the deterministic
peak of live tensor bytes of both steps.

The artifact runs one training step: ``gradrewrite run OUT --input ids.npy
[--labels labels.npy]`` (labels default to the ids; ``-100`` is ignored) writes
``output_0`` = the loss (mean next-token cross entropy over valid shifted labels) and
``output_1...`` = the gradients of the trained parameters, in the order of
``report.json["stream_bp"]["outputs"]``. Gradients rather than updated weights: the
step is exact backprop, the optimizer is the caller's.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import ConfigError, InputError, VerificationError
from ..outputs import write_json
from ..passes.stream_bp.api import StreamBP
from ..passes.stream_bp.executor import IGNORE_INDEX, causal_lm_loss, logits_of, logits_only
from ..rewrite.graph import Graph
from ..rewrite.live_bytes import LiveBytes
from ..rewrite.pipeline import PassSpec
from ..rewrite.safe_load import load_exported_program

PASS = "stream-bp"
LOSS = "causal_lm"
CONFIG = "stream_bp.json"
MODEL = "model.pt2"
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def check_request(specs: Sequence[PassSpec], train, backend: str) -> int:
    """Refuse what this step kind cannot do, before any work; returns stream-bp's index."""
    loss, label_spec = train.loss, train.label
    names = [s.name for s in specs]
    if PASS not in names:
        raise ConfigError(f"--loss {LOSS} needs the {PASS} pass (the chunked training step computes it)",
                          f"add -p \"{PASS}(chunk=1024)\", or use --loss cross_entropy/mse")
    if loss != LOSS:
        raise ConfigError(f"{PASS} trains causal language models with --loss {LOSS}, not --loss {loss}",
                          f"pass --loss {LOSS} (next-token cross entropy), or drop {PASS} for --loss {loss}")
    at = names.index(PASS)
    if at != len(names) - 1:
        raise ConfigError(f"{PASS} must be the last pass of a --train pipeline (found "
                          f"{', '.join(names[at + 1:])} after it)", f"move {PASS} to the end")
    if backend != "torch":
        raise ConfigError(f"{PASS} training artifacts run on --backend torch, not {backend}",
                          "drop --backend or pass --backend torch")
    if label_spec:
        raise ConfigError(f"--label does not apply to --loss {LOSS}: labels default to the input ids",
                          "give labels at run time: gradrewrite run OUT --input ids.npy --labels labels.npy")
    return at


def token_input(graph: Graph):
    if len(graph.inputs) != 1 or graph.inputs[0].dtype.is_floating_point or len(graph.inputs[0].shape) != 2:
        got = ", ".join(f"{'x'.join(map(str, s.shape))}:{str(s.dtype).removeprefix('torch.')}"
                        for s in graph.inputs)
        raise InputError(f"--loss {LOSS} needs a model taking one integer batch x seq tensor of token "
                         f"ids, this one takes {got}", "pass e.g. --input 1x64:int64:VOCAB")
    return graph.inputs[0]


def write_step(graph: Graph, tmp: Path, analysis: dict, log=None) -> dict[str, Any]:
    """Write ``model.pt2`` and ``stream_bp.json`` into ``tmp`` (the compiler checked
    ``check_request`` and ``token_input`` before any work) and check the chunked
    gradients against autograd; returns the files, the report section and the
    verification record (a VerificationError when the gradients differ)."""
    from ..backends.base import reexport

    (log or (lambda *a, **k: None))("stream-bp: saving the forward, checking chunked gradients against "
                                    "autograd …")
    cfg = graph.meta["stream_bp"]
    forward = graph.clone()
    logits_only(forward.gm)  # a ModelOutput or tuple: its logits
    torch.export.save(reexport(forward), str(tmp / MODEL))
    del forward
    ids = graph.example_inputs[0]
    module = load_exported_program(tmp / MODEL).module()
    check = gradient_check(module, ids, cfg["chunk"], cfg["logits_chunk"])
    tol = TOLERANCE.get(check.pop("dtype"), 1e-5)
    if check["max_relative_error"] > tol:
        raise VerificationError(f"stream-bp gradients differ from autograd: relative error "
                                f"{check['max_relative_error']:.3g} > {tol:g}",
                                "this is a stream-bp bug; train with plain backprop meanwhile")
    outputs = ["loss"] + [f"grad:{n}" for n in check.pop("trained")]
    config = {**cfg, "loss": LOSS, "ignore_index": IGNORE_INDEX, "outputs": outputs}
    write_json(tmp / CONFIG, config)
    section = {**config, "layers": analysis.get("layers"),
               "chunks_per_layer": analysis.get("chunks_per_layer"),
               "op_kinds": analysis.get("op_kinds"),
               "segments": analysis.get("segments"),
               "labels": "--labels FILE.npy (int64, same shape as the ids; default: the ids)",
               "gradient_check": {**check, "tolerance": tol,
                                  "note": "on the example batch; peak live bytes count tensors "
                                          "a step creates (activations, gradients), not the "
                                          "weights; stream-bp saves memory at long sequences"}}
    verification = {"kind": "gradients against autograd", "relative_error": check["max_relative_error"],
                    "inputs_compared": 1, "checked": True, "tolerance": tol}
    return {"files": [MODEL, CONFIG], "format": "torch.export + stream_bp.json", "stream_bp": section,
            "verification": verification}


def _trained(module: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad and p.dtype.is_floating_point]


def gradient_check(module: torch.nn.Module, ids: torch.Tensor, chunk: int, logits_chunk: int) -> dict:
    """Plain autograd vs the StreamBP step on one batch (labels = ids): the worst
    per-parameter relative error ||g - g_ref|| / ||g_ref||, the loss of both, and the
    peak live tensor bytes of each step (capture excluded)."""
    module.zero_grad(set_to_none=True)
    with LiveBytes() as plain_mem:
        ref_loss = causal_lm_loss(logits_of(module(ids)), ids)
        ref_loss.backward()
    ref = {n: p.grad.clone() for n, p in _trained(module) if p.grad is not None}
    module.zero_grad(set_to_none=True)
    sbp = StreamBP(module, chunk=chunk, logits_chunk=logits_chunk)
    sbp.plan(ids)
    with LiveBytes() as stream_mem:
        loss = sbp.backward(ids)
    worst, worst_at = 0.0, None
    for n, g in ref.items():
        p = dict(module.named_parameters())[n]
        got = p.grad if p.grad is not None else torch.zeros_like(g)
        err = ((got - g).norm() / g.norm().clamp(min=1e-30)).item()
        if err >= worst:
            worst, worst_at = err, n
    module.zero_grad(set_to_none=True)
    return {"max_relative_error": worst, "worst_parameter": worst_at,
            "loss_autograd": ref_loss.item(), "loss_stream_bp": loss.item(),
            "batch": list(ids.shape), "trained": list(ref),
            "peak_live_bytes": {"autograd": plain_mem.peak, "stream_bp": stream_mem.peak},
            "dtype": next(iter(module.parameters())).dtype}


class StepRunner:
    """Loads ``model.pt2`` + ``stream_bp.json``; each call is one StreamBP step."""

    def __init__(self, path: Path, trust_pickle: bool = False):
        self.config = json.loads((path / CONFIG).read_text())
        self.module = load_exported_program(path / MODEL, trust_pickle=trust_pickle).module()
        self.sbp = StreamBP(self.module, chunk=self.config["chunk"], logits_chunk=self.config["logits_chunk"])
        self.params = dict(self.module.named_parameters())

    def __call__(self, ids: np.ndarray, labels: np.ndarray | None = None) -> list[np.ndarray]:
        ids_t = torch.as_tensor(np.asarray(ids))
        lab = ids_t if labels is None else torch.as_tensor(np.asarray(labels))
        if lab.shape != ids_t.shape or lab.dtype.is_floating_point:
            raise InputError(f"labels are shaped {tuple(lab.shape)} {str(lab.dtype).removeprefix('torch.')}, "
                             f"they must be integer token ids shaped like the input {tuple(ids_t.shape)}",
                             "save them with numpy.save as int64 (-100 = ignored)")
        self.module.zero_grad(set_to_none=True)
        loss = self.sbp.backward(ids_t, labels=lab.to(torch.int64))
        outs = [loss.to(next(iter(self.params.values())).dtype)]  # accumulated in fp64
        for name in self.config["outputs"][1:]:
            p = self.params[name.removeprefix("grad:")]
            outs.append(p.grad if p.grad is not None else torch.zeros_like(p))
        return [o.detach().numpy() for o in outs]


def load_step(path: str | Path, report: dict, trust_pickle: bool = False) -> StepRunner:
    return StepRunner(Path(path), trust_pickle)

"""quantize: static int8 PTQ (QDQ) and weight-only low-bit with GWQ outlier retention.

GRAPH CONTRACT (backends, including the microcontroller C backend, code against it):

Static int8 (``mode=static``):
- Activations: every quantized conv/linear reads its input through
  ``quantized_decomposed.quantize_per_tensor.default(x, scale: float, zero_point: int,
  -128, 127, torch.int8)`` followed by ``quantized_decomposed.dequantize_per_tensor
  .default(q, scale, zero_point, -128, 127, torch.int8)``; its output (after a ReLU /
  ReLU6 that is its only user, if any) gets the same pair where a reader can take int8
  (``outputs=auto``, the default): an output read only by LayerNorm, GELU, attention or a
  residual add with a float operand stays float, and every backend runs that layer int8
  with a float output (ORT / OpenVINO: QGemm / QLinearConv with a float output; mcu and
  tvm: ``rewrite/int8_layers.match_float_output``, the int32 accumulator times
  ``s_x * s_w[c]``). ``outputs=all`` quantizes every output. Scale and zero point are
  Python scalars in the node args (per-tensor affine int8). An input that already is a
  dequantize (the previous layer's output) is reused, not quantized twice. A residual
  add of two dequantized values whose sum is quantized for a later layer is read through
  that pair by its other readers too (``quantized_adds``): chained adds become
  ``quantize(add(dequantize(a), dequantize(b)))``.
- SmoothQuant (``smooth=auto|on|off``, ``smoothquant.py``) rescales the float graph first:
  weights ``W s``, ``1/s`` folded into a LayerNorm / previous linear, or an
  ``aten.mul(x, <weight>_smooth_inv_scale)`` in front of the layers. Layers whose output
  error exceeds ``max_layer_error`` stay float (report ``fallback``).
- Weights: int8 buffers ``<orig weight name>_int8`` (symmetric, [-127, 127]), fp32 1-D
  scales ``<name>_scale`` and int64 zero zero points ``<name>_zero_point``, fed through
  ``quantized_decomposed.dequantize_per_channel.default(w_int8, scales, zero_points,
  0, -127, 127, torch.int8)`` into the float conv/linear. Bias stays fp32 (integer
  backends compute round(b / (s_x * s_w[c])) into int32).

Weight-only (``mode=weight-only``, linear layers): ``aten.linear`` becomes
``gradrewrite::groupwise_linear(x, packed, scales, zeros, bias, outlier_values,
outlier_cols, outlier_counts, bits, group, in_features)`` (``rewrite/quant_ops.py``):
packed ``bits``-bit codes (uint8 ``[N, G, group*bits/8]``, MatMulNBits layout), fp16
scales ``[N, G]``, packed zero points, and optionally the GWQ outliers in compressed rows
(fp16 values; int16 cols holding ``col - 32768``, int32 ``col`` only when K > 65536;
per-row counts, uint8 unless a row holds more than 255); buffers are named
``<weight>_packed``, ``_scales``, ``_zeros``, ``_outlier_values``, ``_outlier_cols``,
``_outlier_counts``.

Embedding tables (``embeddings=auto|on|off``, ``embedding.py``): ``aten.embedding`` becomes
``gradrewrite::groupwise_embedding(indices, packed, scales, zeros, bits, group, dim)``
(``rewrite/quant_embedding_ops.py``, same buffers as above, named ``<table>_packed`` …); a
tied LM head becomes a ``groupwise_linear`` on the same buffers (stored once).

``method=gptq`` (weight-only, ``gptq.py``) changes only which codes, scales, zero points and
outlier values are stored (error-compensating, sequential GPTQ); the ops and buffers are
the same as round-to-nearest's (``method=rtn``, the default).

``method=awq`` / ``awq-gptq`` (``awq.py``) first rescales the float graph exactly: per-input-
channel scales searched on calibration data multiply the weights of the linear layers that
share an input, and their inverse is folded into the op before (a norm's weight, a previous
linear's rows) or, where nothing can absorb it, applied by an ``aten.mul(x, <weight>_awq_inv_scale)``
in front of those layers; then RTN (after a per-group range clip) or GPTQ rounds as above.

Both forms run in the torch backend (the ops dequantize: fake-quant) and export to
ONNX: QuantizeLinear/DequantizeLinear (ONNX Runtime runs QLinearConv/QLinearMatMul) and
com.microsoft.MatMulNBits plus a sparse term (``backends/ort_quant.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ...errors import ConfigError, InputError
from ...rewrite.calibration import normalise
from ...rewrite.graph import Graph
from ...rewrite.mapped_safetensors import release_pages
from ...rewrite.registry import PassContext, PassResult, register_pass
from .embedding import EmbeddingStep, check_options as check_embedding_options
from .error_report import layer_error
from .int8_static import quantize_static
from .layers import find_layers, layer_input, linear_form, observe
from .observer_search import AUTO as AUTO_OBSERVER, EVAL_SAMPLES, choose_observer
from .observers import OBSERVERS
from .awq import INPUT_MUL, awq_scale
from .gptq import FactorCache, choose_damp, gptq_quantize, hessian_relative_error, permuted_problem, visiting_order
from .gptq_calibration import LAYERWISE, gptq_calibration
from .padding import PaddingRows, resolve as resolve_padding
from .smoothquant import SMOOTH, smooth_linears
from .gradient_layerwise import gradient_stack, layerwise_gradient_scores
from .outliers import (AGGREGATIONS, CRITERIA, LOSSES, SPREADS, KeptIndices, choose_loss, gradient_scores,
                       hessian_scores, magnitude_scores, outlier_mask, top_k_mask)
from .weight_only import BITS, permuted_input, quantize_groupwise, replace_linear, rtn_dequantized

METHODS = ("rtn", "gptq", "awq", "awq-gptq")
ACT_GROUPS = ("static", "ordered")

MODES = ("auto", "static", "weight-only")
OUTPUTS = ("auto", "all")
ERROR_SAMPLES = 4   # recorded inputs per layer for the error report


@register_pass("quantize", requires=("inference-graph",))
@dataclass(frozen=True)
class Quantize:
    """Quantize conv/linear: static int8 QDQ, or weight-only low-bit with fp16 GWQ outliers.

    Outliers are chosen per layer by ``criterion`` (gradient | hessian | magnitude); weight-only
    codes by ``method`` (rtn | gptq | awq | awq-gptq)."""

    mode: str = field(default="auto", metadata={
        "help": "static (int8 W8A8 QDQ) | weight-only | auto (static when bits=8 and no outliers)"})
    bits: int = field(default=8, metadata={"help": "weight bits: 8 for static; 2, 3, 4, 8 weight-only"})
    group: int = field(default=128, metadata={"help": "weight-only group size (power of two >= 16)"})
    outliers: float = field(default=0.0, metadata={
        "help": "fraction of each layer's weights kept in fp16 (GWQ uses 0.01)"})
    criterion: str = field(default="gradient", metadata={"help": "outlier choice: gradient | hessian | magnitude"})
    spread: str = field(default="layer", metadata={
        "help": "outliers: the top fraction of each layer (layer), the same number in every "
                "output row (rows: no row padding in the ORT decode term), or whole input columns "
                "(cols: 16 bits per outlier, the fastest ORT decode term)"})
    aggregation: str = field(default="abs", metadata={"help": "gradient aggregation over samples: abs | square"})
    loss: Any = field(default="auto", metadata={
        "help": "gradient loss: auto | causal-lm | mse (Python: a callable (outputs, inputs) -> scalar)"})
    observer: str = field(default="minmax", metadata={
        "help": "static activation ranges: minmax | percentile | mse | entropy (KL, TensorRT-style) | "
                "auto (each tried on a copy; the one whose outputs move least on the calibration data)"})
    percentile: float = field(default=99.99, metadata={"help": "percentile observer's cut (per side)"})
    smooth: str = field(default="auto", metadata={
        "help": "static: SmoothQuant scale migration for linear layers (smoothquant.py): auto (groups "
                "whose input has outlier channels on the calibration data) | on | off"})
    smooth_alpha: float | str = field(default="auto", metadata={
        "help": "static: SmoothQuant migration strength alpha in (0, 1), or auto (per layer group, "
                "the value of 0.5-0.95 with the least int8 output error on calibration rows)"})
    outputs: str = field(default="auto", metadata={
        "help": "static: which layer outputs get a quantize/dequantize pair: auto (those a reader can "
                "take as int8; outputs read only by LayerNorm, GELU, attention or a residual add with a "
                "float operand stay float: every backend runs the layer int8 with a float output, and "
                "transformers lose far less accuracy) | all (every output)"})
    bias_correction: bool = field(default=False, metadata={
        "help": "static: each conv's bias absorbs the per-channel mean shift int8 puts on the "
                "conv's output on the calibration data (NNCF's fast bias correction; linears are "
                "left alone: it moved MiniLM's output further from fp32)"})
    max_layer_error: float = field(default=0.0, metadata={
        "help": "static: layers whose output error (relative L2 on calibration data) exceeds this stay "
                "float, listed in the report under fallback (0: off)"})
    select: str = field(default="op:linear|conv", metadata={"help": "layers to quantize (selector)"})
    exclude: str = field(default="", metadata={"help": "module-path globs to keep float, separated by |"})
    method: str = field(default="rtn", metadata={
        "help": "weight-only rounding: rtn (round to nearest) | gptq (error-compensating, "
                "sequential) | awq (activation-aware scales folded into the graph, then rtn) | "
                "awq-gptq (awq scales, then gptq); all but rtn need calibration data"})
    damp: float | str = field(default="auto", metadata={
        "help": "gptq: Hessian dampening, fraction of its mean diagonal, or auto (per layer, the "
                "value with the least error on held-out calibration samples)"})
    block: int = field(default=128, metadata={"help": "gptq: columns per lazy update block (power of two)"})
    act_order: bool = field(default=False, metadata={
        "help": "gptq: visit columns by decreasing input energy"})
    act_groups: str = field(default="static", metadata={
        "help": "gptq with act_order: static (groups of consecutive input features, set from the "
                "original weights) | ordered (groups follow the visiting order; the layer reads its "
                "input permuted by a stored 16-bit index, shared by layers that read the same input)"})
    layerwise: str = field(default="auto", metadata={
        "help": "gptq, and criterion=gradient: calibrate a stack of repeated layers (decoder blocks) "
                "one layer at a time in bounded memory (gptq: bit-identical to the whole graph; gradients: "
                "a streamed backward, the same gradients to rounding): auto (when such a stack holds the "
                "linears) | on (an error when none does) | off (run the graph up to each layer)"})
    clip: bool = field(default=True, metadata={
        "help": "awq / gptq: shrink each group's range where that cuts the error (awq: the "
                "layer's output error; gptq: the rounding error weighted by diag(H))"})
    input_mul: str = field(default="auto", metadata={
        "help": "awq: scales no previous op can absorb: auto (insert aten.mul of the input where it "
                "cuts the layers' error >= 5%) | always | never"})
    embeddings: str = field(default="auto", metadata={
        "help": "weight-only: quantize embedding tables and their tied LM heads: auto (where the "
                "report shows it pays, see embedding.py) | on | off"})
    embedding_bits: int = field(default=0, metadata={"help": "bits of embedding tables (0: same as bits)"})
    padding_mask: str = field(default="auto", metadata={
        "help": "weight-only calibration: leave padded tokens out of Hessians and statistics: auto "
                "(a 2-D input named attention_mask / *_mask) | off | an input name"})

    exact = False   # lossy: VerifyEachPass measures the change and does not fail on it

    def __post_init__(self) -> None:
        for key, value, valid in (("mode", self.mode, MODES), ("criterion", self.criterion, CRITERIA),
                                  ("aggregation", self.aggregation, AGGREGATIONS),
                                  ("spread", self.spread, SPREADS),
                                  ("observer", self.observer, (*OBSERVERS, AUTO_OBSERVER)),
                                  ("method", self.method, METHODS),
                                  ("act_groups", self.act_groups, ACT_GROUPS),
                                  ("layerwise", self.layerwise, LAYERWISE)):
            if value not in valid:
                raise ConfigError(f"unknown {key} {value!r} for quantize", f"use one of {', '.join(valid)}")
        if not callable(self.loss):
            resolve_loss_name(self.loss)
        check_embedding_options(self.embeddings, self.embedding_bits, self.resolved_mode() == "static")
        if self.bits not in BITS:
            raise ConfigError(f"bits={self.bits} is out of range", "use bits=2, 3, 4 or 8")
        if self.group < 16 or self.group & (self.group - 1) or self.group > 4096:
            raise ConfigError(f"group={self.group} is out of range",
                              "use a power of two from 16 to 4096 (default 128)")
        if not 0.0 <= self.outliers < 0.5:
            raise ConfigError(f"outliers={self.outliers} is out of range",
                              "give a fraction in [0, 0.5), e.g. outliers=0.01 for 1%")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile={self.percentile} is out of range", "use e.g. 99.99")
        if self.input_mul not in INPUT_MUL:
            raise ConfigError(f"unknown input_mul {self.input_mul!r} for quantize",
                              f"use one of {', '.join(INPUT_MUL)}")
        if self.outputs not in OUTPUTS:
            raise ConfigError(f"unknown outputs {self.outputs!r} for quantize", f"use one of {', '.join(OUTPUTS)}")
        if self.smooth not in SMOOTH:
            raise ConfigError(f"unknown smooth {self.smooth!r} for quantize", f"use one of {', '.join(SMOOTH)}")
        if isinstance(self.smooth_alpha, str) and self.smooth_alpha != "auto":
            raise ConfigError(f"smooth_alpha={self.smooth_alpha!r} is not a number", "use auto or a value in (0, 1)")
        if not isinstance(self.smooth_alpha, str) and not 0.0 < self.smooth_alpha < 1.0:
            raise ConfigError(f"smooth_alpha={self.smooth_alpha} is out of range",
                              "use a value in (0, 1), e.g. 0.5")
        if not self.max_layer_error >= 0.0:
            raise ConfigError(f"max_layer_error={self.max_layer_error} is out of range",
                              "give a relative error >= 0, e.g. 0.1 (0 turns the fallback off)")
        if self.resolved_mode() != "static" and (self.smooth == "on" or self.max_layer_error
                                                 or self.outputs != "auto" or self.bias_correction):
            raise ConfigError("smooth=on, outputs, bias_correction and max_layer_error are options of static int8 "
                              "quantization",
                              "use mode=static, or drop them")
        if self.method != "rtn" and self.resolved_mode() == "static":
            raise ConfigError(f"method={self.method} is for weight-only quantization",
                              "use mode=weight-only (e.g. quantize(mode=weight-only,bits=4,"
                              f"method={self.method}))")
        if self.method in ("gptq", "awq-gptq"):
            if isinstance(self.damp, str) and self.damp != "auto":
                raise ConfigError(f"damp={self.damp!r} is not a number", "use auto or a fraction in (0, 1]")
            if not isinstance(self.damp, str) and not 0.0 < self.damp <= 1.0:
                raise ConfigError(f"damp={self.damp} is out of range",
                                  "use a fraction in (0, 1], e.g. 0.01, or damp=auto")
            if self.act_groups == "ordered" and not self.act_order:
                raise ConfigError("act_groups=ordered needs act_order=true (it is the visiting order "
                                  "the groups follow)", "add act_order=true, or drop act_groups")
            if self.block < 1 or self.block & (self.block - 1) or self.block > 4096:
                raise ConfigError(f"block={self.block} is out of range",
                                  "use a power of two from 1 to 4096 (default 128)")
        if self.resolved_mode() == "static" and (self.bits != 8 or self.outliers):
            raise ConfigError(f"static quantization is int8 without outliers (got bits={self.bits}, "
                              f"outliers={self.outliers})", "use mode=weight-only for low-bit or outliers")

    def resolved_mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        return "static" if self.bits == 8 and not self.outliers else "weight-only"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        samples = normalise(ctx.calibration, graph.inputs)
        if self.resolved_mode() == "static":
            return self._static(graph, ctx, samples)
        return self._weight_only(graph, ctx, samples)

    # ------------------------------------------------------------------ static int8
    def _static(self, graph: Graph, ctx: PassContext, samples: list) -> PassResult:
        if not samples:
            raise InputError("static int8 quantization needs calibration data for its activation "
                             "ranges", "pass --calib FILE.npz (or .pt; arrays = model inputs, first axis "
                             "= samples), or PassContext(calibration=[...]) from Python")
        search = None
        observer = self.observer
        if observer == AUTO_OBSERVER:   # the graph becomes the best observer's rewritten copy
            observer, search, done = choose_observer(
                graph, samples, lambda g, name: self._static_rewrite(g, ctx, samples, name), progress=ctx.progress)
        else:
            done = self._static_rewrite(graph, ctx, samples, observer)
        layers, skipped, smooth, (records, pairs, fired, fallback) = done
        errors = []
        for rec in records:
            errors.append({"path": rec["path"], "kind": rec["kind"], "shape": rec["shape"],
                           "bits_per_weight": rec["bits_per_weight"], "outliers": 0,
                           **layer_error([(yf, yq) for _, yf, yq in pairs[rec["path"]]])})
        numel = [_numel(r["shape"]) for r in records]
        report = {"mode": "static", "observer": observer,
                  **({"observer_search": {"output_change": search, "samples": min(len(samples), EVAL_SAMPLES)}}
                     if search else {}),
                  "calibration_samples": len(samples),
                  "rewrites": fired, "layers": records, "skipped": skipped, "smoothquant": smooth,
                  "fallback": fallback,
                  "bits_per_weight": round(sum(r["bits_per_weight"] * n for r, n in zip(records, numel))
                                           / max(1, sum(numel)), 4),
                  "error_data": f"{len(samples)} calibration samples, first {ERROR_SAMPLES} per layer",
                  "error_report": errors}
        return PassResult(True, report)

    def _static_rewrite(self, graph: Graph, ctx: PassContext, samples: list, observer: str):
        """SmoothQuant, calibration with ``observer`` and the int8 rewrite, in place."""
        layers, skipped = find_layers(graph, self.select, self.exclude, kinds=("conv", "linear"),
                                      what="quantize")
        smooth = smooth_linears(graph, layers, samples, mode=self.smooth, alpha=self.smooth_alpha,
                                progress=ctx.progress)
        result = quantize_static(graph, layers, samples, observer=observer, percentile=self.percentile,
                                 progress=ctx.progress, keep_inputs=ERROR_SAMPLES,
                                 max_error=self.max_layer_error, outputs=self.outputs,
                                 bias_correction=self.bias_correction)
        return layers, skipped, smooth, result

    # ------------------------------------------------------------------ weight-only
    def _weight_only(self, graph: Graph, ctx: PassContext, samples: list) -> PassResult:
        linearized = linear_form(graph)   # GPT-2 Conv1D (addmm) layers become plain linears
        layers, skipped = find_layers(graph, self.select, self.exclude, kinds=("linear",),
                                      what="quantize (weight-only)")
        criterion = self.criterion if self.outliers > 0 else "none"
        if self.method != "rtn" and not samples:
            need = {"gptq": "each layer's input Hessian", "awq": "activation statistics for its scales",
                    "awq-gptq": "activation statistics and input Hessians"}[self.method]
            raise InputError(f"method={self.method} needs calibration data ({need})",
                             "pass --calib FILE.npz (or .pt), or PassContext(calibration=[...])")
        if criterion in ("gradient", "hessian") and not samples:
            raise InputError(f"outlier criterion {criterion!r} needs calibration data",
                             "pass --calib FILE.npz (or .pt), or use criterion=magnitude")
        pad_index, pad_reason = resolve_padding(graph, self.padding_mask)
        pad = PaddingRows(pad_index)   # real-token rows of calibration activations
        # inputs of every layer: E[x^2] per feature (hessian) and a few for the error report
        data = samples or [graph.random_inputs(ctx.seed + 500 + i) for i in range(2)]
        sq = {l.param: 0.0 for l in layers}
        rows = {l.param: 0 for l in layers}
        kept: dict[str, list[torch.Tensor]] = {l.param: [] for l in layers}
        watch = {}
        for l in layers:
            def fn(v, key=l.param):
                flat = pad.rows(v.detach()).float()
                sq[key] = sq[key] + (flat * flat).sum(0)
                rows[key] += flat.shape[0]
                if len(kept[key]) < ERROR_SAMPLES:
                    kept[key].append(flat.to(v.dtype).clone())
            x = layer_input(l)
            prev = watch.get(x)
            watch[x] = (lambda v, a=prev, b=fn: (a(v), b(v))) if prev else fn
        observe(graph, pad.track(data), watch, ctx.progress, "observing layer inputs")
        tables = EmbeddingStep(graph, self.embeddings, self.embedding_bits or self.bits, self.group,
                               self.exclude, data[:ERROR_SAMPLES])   # fp32 outputs, before any layer
        release_pages(graph)   # the float runs above paged in every mapped weight: each layer reads its own back

        loss_used = loss_reason = gradient_report = None
        if criterion == "gradient":
            loss_used, loss_reason = choose_loss(graph, self.loss)
            stack, why = gradient_stack(graph, layers, self.layerwise)
            if stack is None and self.layerwise == "on":
                raise ConfigError(f"layerwise=on: {why}", "use layerwise=auto or layerwise=off")
            grad_opts = dict(loss=loss_used, aggregation=self.aggregation, progress=ctx.progress,
                             rtn=lambda w: rtn_dequantized(w, self.bits, self.group))
            if stack is None:
                scores = gradient_scores(graph, layers, samples, **grad_opts)
                gradient_report = {"path": "whole-graph", "reason": why}
            else:   # a streamed backward: each layer's mask is chosen as soon as its gradient is summed
                scores = layerwise_gradient_scores(
                    graph, stack, layers, samples, **grad_opts,
                    reduce=lambda score: KeptIndices(top_k_mask(score, self.outliers, self.spread)))
                gradient_report = {"path": "layer-wise", "stack": stack.prefix, "layers": stack.count,
                                   "reason": why}
        elif criterion == "hessian":
            scores = hessian_scores(graph, layers, {k: sq[k] / max(1, rows[k]) for k in sq})
        elif criterion == "magnitude":
            scores = magnitude_scores(graph, layers)
        else:
            scores = {}

        awq = None
        if self.method in ("awq", "awq-gptq"):   # exact float rescaling first; rounding below
            awq = awq_scale(graph, layers, samples, self.bits, self.group,
                            masks={l.param: outlier_mask(scores[l.param], self.outliers, self.spread)
                                   for l in layers} if scores else None,
                            clip=self.clip and self.method == "awq", input_mul=self.input_mul,
                            progress=ctx.progress, padding=pad)
            for key, xs in kept.items():   # the error report compares what the layers now read
                kept[key] = [x / awq.scales[key] for x in xs]

        records, errors, total_bits, total_numel = [], [], 0, 0
        if self.method in ("gptq", "awq-gptq"):   # sequential: graph order, earlier layers quantized
            order = {n: i for i, n in enumerate(graph.nodes)}
            layers = sorted(layers, key=lambda l: order[l.node])
        hessian: tuple = (None, None, 0, None)   # (input node, H, rows, halves): one at a time
        calibration, calibration_report = (
            gptq_calibration(graph, [l.node for l in layers], samples, pad, ctx.progress, self.layerwise)
            if self.method in ("gptq", "awq-gptq") else (None, None))
        reordered: dict = {}               # act_groups=ordered: input node -> (order, permuted input)
        factors = FactorCache()            # inverse-Hessian factors shared by layers of one input
        for index, l in enumerate(layers):
            w = graph.attr(l.weight_node).detach().float()
            mask = outlier_mask(scores[l.param], self.outliers, self.spread) if scores else None
            gptq_stats = None
            if self.method in ("gptq", "awq-gptq"):
                x_node = layer_input(l)
                if hessian[0] is not x_node:
                    hessian = (None, None, 0, None)
                    factors.clear()
                    h, n_rows, halves = calibration.hessian(
                        x_node, f"gptq layer {index + 1}/{len(layers)} {l.path}: inputs")
                    hessian = (x_node, h, n_rows, halves)
                # the next layer reads the same input (q/k/v, gate/up): keep the factors
                factors.keep = index + 1 < len(layers) and layer_input(layers[index + 1]) is x_node
                opts = dict(outliers=mask, block=self.block, act_order=self.act_order, clip=self.clip,
                            factors=factors)
                w_fit, h_fit, halves = w, hessian[1], hessian[3]
                order = None
                if self.act_order and self.act_groups == "ordered":   # consecutive groups of the permuted problem
                    order = visiting_order(h_fit)
                    w_fit, h_fit, halves, opts["outliers"] = permuted_problem(w_fit, h_fit, halves, mask, order)
                    opts["act_order"] = False
                damp, damp_errors = self.damp, None
                if damp == "auto":
                    damp, damp_errors = choose_damp(w_fit, h_fit, halves, self.bits, self.group, **opts)
                q, gptq_stats = gptq_quantize(w_fit, h_fit, self.bits, self.group, damp=damp, **opts)
                if order is not None:
                    q.order = order.to(torch.int16 if w.shape[1] <= 32767 else torch.int32)
                    gptq_stats.update(act_order=True, act_groups="ordered")
                if damp_errors:
                    gptq_stats["damp_held_out_error"] = damp_errors
                gptq_stats["hessian_error_rtn"] = hessian_relative_error(
                    w, quantize_groupwise(w, self.bits, self.group, mask).dequantized(), hessian[1])
                gptq_stats["hessian_rows"] = hessian[2]
                gptq_stats = {k: round(v, 8) if isinstance(v, float) else v for k, v in gptq_stats.items()}
            else:   # awq: round the range-clipped weights (the float graph keeps w)
                q = quantize_groupwise(awq.to_round.get(l.param, w) if awq else w, self.bits,
                                       self.group, mask)
            w_q = q.dequantized()
            bias = l.node.args[2] if len(l.node.args) > 2 else None
            b = graph.attr(bias) if isinstance(bias, torch.fx.Node) else None
            with torch.no_grad():
                err = layer_error([(torch.nn.functional.linear(x.float(), w, b),
                                    torch.nn.functional.linear(x.float(), w_q, b)) for x in kept[l.param]])
            x_read = None
            if q.order is not None:
                x_read, q.order_bits = permuted_input(graph, l, q.order, reordered)
            bits = q.storage_bits()
            bpw = sum(bits.values()) / w.numel()
            total_bits += sum(bits.values())
            total_numel += w.numel()
            replace_linear(graph, l, q, x_read)
            release_pages(graph, graph.attr(l.weight_node))   # memory-mapped float weight: its pages go
            records.append({"path": l.path, "weight": l.param, "shape": list(w.shape),
                            "outliers": int(q.values.numel()), "bits_per_weight": round(bpw, 4),
                            "storage_bits": bits, **({"gptq": gptq_stats} if gptq_stats else {}),
                            **({"awq": awq.info[l.param]} if awq else {})})
            errors.append({"path": l.path, "kind": "linear", "shape": list(w.shape),
                           "bits_per_weight": round(bpw, 4), "outliers": int(q.values.numel()),
                           **err})
        embedding_report = tables.run(graph, total_bits, total_numel, skipped, errors)
        graph.commit()
        report = {"mode": "weight-only", "method": self.method, "bits": self.bits, "group": self.group,
                  "outliers": self.outliers, "criterion": criterion,
                  "aggregation": self.aggregation if criterion == "gradient" else None,
                  "loss": (loss_used if isinstance(loss_used, str) else
                           "user callable" if loss_used is not None else None),
                  "loss_reason": loss_reason,
                  **({"gradient_calibration": gradient_report} if gradient_report else {}),
                  "calibration_samples": len(samples),
                  "linearized": linearized,
                  "padding": pad.summary(pad_reason),
                  **({"gptq_calibration": calibration_report} if calibration_report else {}),
                  "bits_per_weight": round(total_bits / max(1, total_numel), 4),
                  "bits_per_weight_note": "stored bits of codes, fp16 scales, packed zero points, "
                                          "fp16 outlier values, int16 column indices and per-row counts, "
                                          "int16 input orders (act_groups=ordered, once per shared input), "
                                          "over the quantized layers' weights (biases stay fp32)",
                  "layers": records, "skipped": skipped,
                  "error_data": (f"{len(samples)} calibration samples, first {ERROR_SAMPLES} per layer"
                                 if samples else "2 seeded random inputs (no calibration data given)"),
                  "error_report": errors, **embedding_report}
        return PassResult(True, report)


def resolve_loss_name(loss: Any) -> None:
    if loss not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r} for quantize", f"use one of {', '.join(LOSSES)} "
                          "(or, from Python, a callable (outputs, inputs) -> scalar)")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


__all__ = ["Quantize", "MODES", "METHODS"]

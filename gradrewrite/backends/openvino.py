"""openvino backend: the rewritten graph as OpenVINO IR, compiled for CPU (or an Intel GPU).

The route is the ONNX the ort backend writes (``ort.export_onnx``), read by OpenVINO's
ONNX frontend, not ``torch.export`` through its PyTorch frontend: the quantize pass's
static int8 graphs (``quantized_decomposed`` Q/DQ) fail in the PyTorch frontend (convs
fed by ``dequantize_per_channel`` do not convert), while their ONNX QuantizeLinear /
DequantizeLinear pairs become FakeQuantize ops that OpenVINO's low-precision
transformations run as int8 kernels (VNNI/AMX on CPU). The export also reuses every ONNX
translation and export fix the ort backend already has, at the same cost (small_cnn:
ONNX export + read 4.3 s, ``convert_model(ExportedProgram)`` 4.3 s).

``compile`` writes ``model.xml``/``model.bin`` (IR, weights kept fp32:
``compress_to_fp16=False``) and ``openvino.json`` (device and precision), compiles it
once to fail at compile time, and reports the precision each runtime layer runs at
(``runtime_precisions``: e.g. ``Convolution: {i8: 5}`` for a static int8 CNN).

Options (``backends.options.OpenvinoOptions``):

- ``target``: ``auto`` (GPU when OpenVINO sees one, else CPU), ``cpu``, ``gpu`` (refused
  when OpenVINO sees no GPU).
- ``precision``: ``f32`` (the default: exact, checked to fp32 rounding), ``bf16``
  (lossy: OpenVINO's bf16 inference precision, checked within ``BF16_REL_TOL``), ``auto``
  (OpenVINO's own choice for the device, read back from the compiled model: bf16 on CPUs
  with bf16 units, f16 on GPU; checked within ``BF16_REL_TOL`` when it is not f32).

Verification: the compiler checks exact pipelines against the original model within
fp32 rounding, widened to ``BF16_REL_TOL`` when the model runs at half precision;
``check_artifact`` also checks every artifact against the rewritten graph it lowered
(what lossy pipelines are not checked against the original for): fp32 rounding, plus
``BF16_REL_TOL`` at half precision, plus ``INT8_REL_TOL`` when the graph holds Q/DQ
(int8 kernels against the graph's fake quantization), or beyond it twice the graph's own
``rounding_sensitivity`` (a deep int8 transformer's fake quantization moves a few percent
when only fp32 rounding changes). A graph quantized before the compile is an exact
pipeline for the compiler: its check against that graph is widened to the same.

Static int8 graphs reach OpenVINO in its own Q/DQ form (``openvino_qdq``: uint8
activations), not the pass's int8-with-zero-point form (convs ran f32 kernels) nor ORT's.
``runtime_precisions`` reads the kernel each layer runs (``primitiveType``).

Refused before the export: training steps, and weight-only graphs (``groupwise_linear``,
``groupwise_embedding``: com.microsoft MatMulNBits / GatherBlockQuantized in the ONNX;
OpenVINO 2026.4 read the 4-bit MatMulNBits but not the 2/3-bit codes widened at load).
A weight-only ``quantize`` in the pipeline, a GPU asked for where OpenVINO sees none, and
bf16 on GPU are refused by ``check_request`` before the capture.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendError, ConfigError, VerificationError
from ..rewrite.graph import Graph
from .base import Backend, BackendArtifact, register_backend
from .options import OpenvinoOptions, make_options

CONFIG = "openvino.json"
FP32_REL_TOL = 1e-4       # fp32 rounding: the compiler's tolerance for exact pipelines
BF16_REL_TOL = 2.0 ** -5  # 8 bf16 rounding units (2^-8): the example models measured 0.005-0.007
INT8_REL_TOL = 0.05       # int8 kernels against the graph's fake quantization (as the tvm/mcu int8 checks)
ROUNDING_PERTURBATION = 2.0 ** -20  # 8 fp32 rounding units: rounding_sensitivity
SENSITIVITY_MARGIN = 2.0  # an int8 artifact within 2x the graph's own rounding sensitivity passes
WEIGHT_ONLY_OPS = ("gradrewrite.groupwise_linear", "gradrewrite.groupwise_embedding")
QDQ_OPS = ("quantized_decomposed.quantize_per_tensor", "quantized_decomposed.dequantize_per_channel")
INT8_LAYER_TYPES = ("Convolution", "GroupConvolution", "FullyConnected", "MatMul", "Deconvolution")


def _ov():
    try:
        import openvino
    except ImportError as exc:
        raise BackendError("openvino is not installed", "pip install 'gradrewrite[openvino]'") from exc
    return openvino


def _device(core, target: str) -> str:
    gpus = [d for d in core.available_devices if d.startswith("GPU")]
    if target == "gpu" and not gpus:
        raise BackendError(f"--target gpu: OpenVINO sees no GPU (devices: {', '.join(core.available_devices)})",
                           "use --target cpu or auto (OpenVINO's GPU plugin runs on Intel GPUs)")
    return "GPU" if gpus and target in ("gpu", "auto") else "CPU"


def _compile_config(device: str, precision: str) -> dict[str, str]:
    if precision == "bf16" and device == "GPU":
        raise BackendError("--precision bf16: OpenVINO's GPU plugin has no bf16 inference",
                           "use --precision f32, or auto (f16 on GPU), or --target cpu")
    config = {} if precision == "auto" else {"INFERENCE_PRECISION_HINT": precision}
    if device == "CPU":  # no int8 activations behind the graph's back (compressed-weight layers)
        config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = "0"
    return config


def _compiled(core, model, device: str, precision: str):
    try:
        return core.compile_model(model, device, _compile_config(device, precision))
    except BackendError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BackendError(f"OpenVINO cannot compile the model for {device}: {first}",
                           "try --backend ort, or --precision f32") from exc


def _inference_precision(compiled) -> str:
    return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()  # f32, bf16, f16


def _kernel_precision(info) -> str:
    """The precision of the kernel a runtime layer runs: the suffix of its ``primitiveType``
    (``brgconv_avx512_amx_1x1_I8`` -> i8, ``brgconv_avx512_dw_f32`` -> f32), else its
    ``runtimePrecision``. ``runtimePrecision`` alone reads a layer's input precision: a conv
    fed int8 data that runs an f32 kernel on dequantized weights reads i8 there."""
    primitive = info["primitiveType"].astype(str) if "primitiveType" in info else ""
    suffix = primitive.rsplit("_", 1)[-1].lower() if "_" in primitive else ""
    if suffix in ("i8", "u8", "f32", "bf16", "f16", "i32", "i64"):
        return suffix
    return info["runtimePrecision"].astype(str)


def runtime_precisions(compiled) -> dict[str, dict[str, int]]:
    """How many runtime layers of each type run at each precision (``_kernel_precision``)."""
    table: dict[str, dict[str, int]] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = info["layerType"].astype(str)
        if kind in ("Const", "Input", "Output", "Reorder"):
            continue
        precision = _kernel_precision(info)
        table.setdefault(kind, {})
        table[kind][precision] = table[kind].get(precision, 0) + 1
    return {k: dict(sorted(v.items())) for k, v in sorted(table.items())}


def _weight_only_error(found: str) -> ConfigError:
    return ConfigError(f"--backend openvino does not take weight-only quantized graphs ({found}: "
                       "com.microsoft ops in ONNX, not read by OpenVINO in every form)",
                       "use --backend ort or tvm for weight-only, or quantize(mode=static) for OpenVINO int8")


def refuse(graph: Graph) -> None:
    """What this backend does not take, decided before the export."""
    if graph.meta.get("train_step"):
        raise ConfigError("--backend openvino compiles inference graphs, not training steps",
                          "compile the training step with --backend torch, ort or mcu")
    ops = graph.op_histogram()
    weight_only = {op: n for op, n in ops.items() if op in WEIGHT_ONLY_OPS}
    if weight_only:
        raise _weight_only_error(", ".join(f"{n} {op.split('.')[-1]}" for op, n in weight_only.items()))


def rounding_sensitivity(graph: Graph, *, n_inputs: int, seed: int) -> float:
    """How far the rewritten graph's outputs move (worst relative L2 over ``verify``'s
    inputs) when every float weight, scale and bias is scaled by ``1 + u``, ``|u| <=
    ROUNDING_PERTURBATION`` (a few fp32 rounding units, as another summation order gives):
    what separates two correct fp32 implementations of the same fake-quantized graph."""
    import torch

    from ..rewrite.verify import verify

    twin = graph.clone(share_weights=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in [*twin.gm.parameters(), *twin.gm.buffers()]:
            if t.is_floating_point():
                t.mul_(1 + ROUNDING_PERTURBATION * (2 * torch.rand(t.shape, generator=gen, dtype=t.dtype) - 1))
    return verify(twin, graph, graph, n_inputs=n_inputs, seed=seed).relative_error


def _half(precision: str) -> bool:
    return precision != "f32"


@register_backend("openvino")
class OpenvinoBackend(Backend):
    def availability(self) -> str | None:
        try:
            _ov()
        except BackendError as exc:
            return exc.one_line()
        return None

    def check_request(self, options: OpenvinoOptions, passes=()) -> None:
        """A missing GPU, bf16 on GPU, and a weight-only quantize pass: refused before the capture."""
        for p in passes:  # read by name: a backend does not import passes
            if getattr(p, "name", "") == "quantize" and getattr(p, "resolved_mode", lambda: "")() == "weight-only":
                raise _weight_only_error(f"quantize(mode=weight-only, bits={p.bits})")
        options = make_options("openvino", options)
        _compile_config(_device(_ov().Core(), options.target), options.precision)

    def compile(self, graph: Graph, out_dir: Path, *, options: OpenvinoOptions) -> BackendArtifact:
        from .openvino_qdq import openvino_form
        from .ort import export_onnx

        options = make_options("openvino", options)
        refuse(graph)
        ov = _ov()
        core = ov.Core()
        device = _device(core, options.target)
        _compile_config(device, options.precision)  # bad combinations fail before the export
        work = out_dir / ".onnx"
        work.mkdir()
        try:
            # standard ONNX Q/DQ, then OpenVINO's own form of it (openvino_qdq: uint8
            # activations, the form its int8 convolutions take), not ORT's
            facts = export_onnx(graph, work / "model.onnx", qdq_form="as-is")
            quantized = not graph.op_histogram().keys().isdisjoint(QDQ_OPS)  # one count of the graph's ops
            onnx_path, qdq = openvino_form(work / "model.onnx") if quantized else (work / "model.onnx", {})
            model = core.read_model(str(onnx_path))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        ov.save_model(model, str(out_dir / "model.xml"), compress_to_fp16=False)
        config = {"device": device, "precision": options.precision}
        (out_dir / CONFIG).write_text(json.dumps(config, indent=1) + "\n")
        compiled = _compiled(core, core.read_model(str(out_dir / "model.xml")), device, options.precision)
        inference = _inference_precision(compiled)
        layers = runtime_precisions(compiled)
        info: dict[str, Any] = {
            "device": device, "execution_devices": list(compiled.get_property("EXECUTION_DEVICES")),
            "precision": {"requested": options.precision, "inference": inference},
            "runtime_precisions": layers,
            "int8_layers": sum(n for kind in INT8_LAYER_TYPES for p, n in layers.get(kind, {}).items()
                               if p in ("i8", "u8")),
            "quantized_input": quantized, **({"qdq_form": qdq} if qdq else {}),
            "onnx_ops": facts["onnx_ops"], "opset": facts["opset"], "openvino_version": ov.__version__,
        }
        # the compiler widens its check of exact pipelines (a graph quantized before the
        # compile is one) to what this artifact computes: half precision, int8 kernels
        widen = (BF16_REL_TOL if _half(inference) else 0.0) + (INT8_REL_TOL if quantized else 0.0)
        if widen:
            info["rel_tol"] = widen
        return BackendArtifact(["model.xml", "model.bin", CONFIG], f"openvino-{device.lower()}-{inference}", info)

    def check_artifact(self, runner, graph: Graph, info: dict[str, Any], *, n_inputs: int,
                       seed: int) -> dict[str, Any] | None:
        """The artifact against the rewritten graph it lowered, within the tolerance of what
        it runs (recorded in ``info["lowering_check"]``); the compiler's check against the
        original model follows (None).

        An int8 graph beyond ``INT8_REL_TOL`` is judged against how far its own fake
        quantization moves when only fp32 rounding changes (``rounding_sensitivity``): a
        deep int8 network amplifies a rounding flip at one quantizer into a few percent of
        its output (the pretrained MiniLM at batch 8: 0.046 from perturbing its float
        weights by 1e-6), which any int8 kernel's different summation order also triggers."""
        import torch

        from ..rewrite.verify import verify

        half = BF16_REL_TOL if _half(info["precision"]["inference"]) else 0.0
        tol = FP32_REL_TOL + half + (INT8_REL_TOL if info.get("quantized_input") else 0.0)
        check = verify(lambda *xs: [torch.from_numpy(o) for o in runner(*(x.numpy() for x in xs))],
                       graph, graph, n_inputs=n_inputs, seed=seed).as_dict()
        record = {"against": "the rewritten graph", "relative_error": check["relative_error"],
                  "max_abs_error": check["max_abs_error"], "tolerance": tol,
                  "inputs_compared": check["inputs_compared"]}
        if info.get("quantized_input") and not check["relative_error"] <= tol:
            sensitivity = rounding_sensitivity(graph, n_inputs=n_inputs, seed=seed)
            tol = FP32_REL_TOL + half + max(INT8_REL_TOL, SENSITIVITY_MARGIN * sensitivity)
            record.update(rounding_sensitivity=sensitivity, tolerance=tol)
            info["rel_tol"] = max(info.get("rel_tol", 0.0), tol)   # the compiler's check of exact pipelines
        info["lowering_check"] = record
        if not check["relative_error"] <= tol:
            raise VerificationError(f"the openvino artifact disagrees with the rewritten graph: relative error "
                                    f"{check['relative_error']:.3g} > {tol:.3g} "
                                    f"({info['precision']['inference']}"
                                    f"{', int8 Q/DQ' if info.get('quantized_input') else ''})",
                                    "try --precision f32, or --backend ort")
        return None

    def load(self, out_dir: Path, artifact: dict[str, Any]):
        ov = _ov()
        path = Path(out_dir)
        if not (path / CONFIG).is_file():
            raise BackendError(f"{str(out_dir)!r} has no {CONFIG}", "compile the model with --backend openvino")
        config = json.loads((path / CONFIG).read_text())
        core = ov.Core()
        device = _device(core, config["device"].lower())
        request = _compiled(core, core.read_model(str(path / "model.xml")), device,
                            config["precision"]).create_infer_request()
        n_in, n_out = len(request.model_inputs), len(request.model_outputs)

        def run(*inputs: np.ndarray) -> list[np.ndarray]:
            if len(inputs) != n_in:
                raise BackendError(f"the model takes {n_in} inputs, got {len(inputs)}",
                                   "pass one --input per model input")
            request.infer([np.ascontiguousarray(np.asarray(x)) for x in inputs])
            return [np.array(request.get_output_tensor(i).data, copy=True) for i in range(n_out)]

        return run

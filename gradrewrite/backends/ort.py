"""ort backend: export to ONNX (torch.onnx dynamo exporter) and run with ONNX Runtime.

Uses the CUDA execution provider when onnxruntime-gpu sees a GPU, else the CPU one;
the provider actually used is read back from the session (a CUDA request can fall
back to CPU silently). Models whose weights exceed ``external_data_bytes`` store them
in ``model.onnx.data`` next to the graph (ONNX's protobuf limit is 2 GiB).
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BackendError
from ..rewrite.graph import Graph
from ..rewrite.mapped_safetensors import release_pages
from .options import OrtOptions, field_default, make_options
from .base import Backend, BackendArtifact, register_backend
from . import onnx_export_fixes, onnx_stream_writer, ort_errors
from . import ort_int8, ort_outlier_terms, ort_quant, ort_quant_embedding, ort_sibling_linears, ort_tied_weights  # ONNX translations of the quantized ops

DEFAULT_OPSET = field_default("ort", "opset")
EXTERNAL_DATA_BYTES = 1 << 30


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:
        raise BackendError("onnxruntime is not installed",
                           "pip install 'gradrewrite[cpu]' (or '[gpu]' for onnxruntime-gpu)") from exc
    return onnxruntime


def providers() -> list[str]:
    available = _ort().get_available_providers()
    chosen = [p for p in ("CUDAExecutionProvider",) if p in available and _cuda_ok()]
    return chosen + ["CPUExecutionProvider"]


def _cuda_ok() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


@contextlib.contextmanager
def _quiet():
    """The exporter logs per-op chatter and torchvision notices, and its constant folding
    warns on casts torch computes the same way (T5's log(0) position buckets); keep the CLI clean."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def export_onnx(graph: Graph, path: Path, *, opset: int = DEFAULT_OPSET,
                external_data: bool | None = None, nbits_accuracy_level: int = 0,
                qdq_form: str = "ort") -> dict[str, Any]:
    """Write ``graph`` as an ONNX model at ``path``; returns facts for the report.
    ``qdq_form="ort"`` writes the forms ONNX Runtime runs fastest (its contrib ops
    included); ``"as-is"`` keeps standard ONNX for other readers (OpenVINO)."""
    import torch

    weight_bytes = sum(t.numel() * t.element_size()
                       for t in list(graph.gm.parameters()) + list(graph.gm.buffers()))
    if external_data is None:  # memory-mapped weights (a large model) stream out tensor by tensor
        external_data = weight_bytes > EXTERNAL_DATA_BYTES or "mapped_weights" in graph.meta
    input_names = [s.name for s in graph.inputs]
    try:
        # batch-1 layers sharing an input get one outlier term (ort_outlier_terms) and one
        # MatMulNBits (ort_sibling_linears), in a view: the graph stays as it is
        view, fused = ort_outlier_terms.fuse(graph)
        view, siblings = ort_sibling_linears.fuse(graph, view)
        ep = graph.to_exported_program(view if fused or siblings else None)
        fixes = onnx_export_fixes.apply(ep)
        with _quiet():
            program = torch.onnx.export(ep, (), dynamo=True, input_names=input_names,
                                        opset_version=opset, verbose=False,
                                        custom_translation_table={**ort_quant.translation_table(
                                                                      accuracy_level=nbits_accuracy_level),
                                                                  **ort_quant_embedding.translation_table(),
                                                                  **ort_outlier_terms.translation_table(),
                                                                  **ort_sibling_linears.translation_table(
                                                                      accuracy_level=nbits_accuracy_level)})
            program.optimize()
            ort_quant.resolve_at_load(program.model)   # after the exporter's folding: see ort_quant
            qdq = ort_int8.ort_form(program.model) if qdq_form == "ort" else None
            tied = ort_tied_weights.read_in_place(program.model) if qdq_form == "ort" else 0
            _add_metadata(program, graph.meta.get("export_metadata", {}))
            if external_data:   # tensor by tensor from the weights' own memory (onnx_stream_writer)
                onnx_stream_writer.save_with_external_data(program.model, path)
            else:
                program.save(str(path), external_data=False)
            del program
        release_pages(graph)  # memory-mapped weights were read to write them: not resident for the session
    except Exception as exc:
        raise ort_errors.export_error(exc, graph) from exc
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    files = [path.name] + ([path.name + ".data"] if (path.parent / (path.name + ".data")).exists() else [])
    return {
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset),
        "onnx_nodes": len(model.graph.node),
        "onnx_ops": sorted({n.op_type for n in model.graph.node}),
        "external_data": external_data,
        "export_fixes": fixes,
        **({"weights_read_transposed": tied} if tied else {}),
        **({"qdq_form": qdq} if qdq and any(qdq.values()) else {}),
        "weight_bytes": weight_bytes,
        "files": files,
        "input_names": [i.name for i in model.graph.input],
        "output_names": [o.name for o in model.graph.output],
    }


def _add_metadata(program, metadata: dict[str, Any]) -> None:
    """Passes leave facts for deployment (e.g. N:M masks) in ``export_metadata``;
    they travel as ONNX ``metadata_props`` (``gradrewrite.<key>`` = JSON)."""
    import json

    for key, value in metadata.items():
        program.model.metadata_props[f"gradrewrite.{key}"] = json.dumps(value, sort_keys=True, default=str)


def make_session(path: Path, *, threads: int | None = None, spinning: bool | None = None,
                 prepack: bool = True):
    """An ORT CPU session; ``spinning=False`` stops idle intra-op workers from busy-waiting
    (several sessions timed in turn on few cores would otherwise steal each other's CPU);
    ``prepack=False`` keeps weights as stored: no packed copy of a weight that another op
    also reads (a tied embedding and head), for a session that runs a few times."""
    ort = _ort()
    opts = ort.SessionOptions()
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        opts.intra_op_num_threads = threads
    if spinning is not None:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers())
    except Exception as exc:
        raise BackendError(f"onnxruntime cannot load {path.name}: {str(exc).strip().splitlines()[0]}",
                           "an op in the graph has no ONNX Runtime kernel; try --backend torch") from exc


def _prepack_is_cheap(path: Path, facts: dict[str, Any]) -> bool:
    """Whether sessions of this model should prepack its weights. Prepacking copies the
    B operand of a float MatMul/Gemm (a whole fp32 LM head or tied embedding again: what
    a model with an external data file cannot afford), while MatMulNBits packs 4-bit
    codes into a blob about their own size and runs ~10x slower unpacked (it unpacks
    every call). So: always for a small model; for a large one, only when its float
    matmul weights are under a tenth of its weight bytes."""
    if not (path.parent / (path.name + ".data")).exists():
        return True
    import math

    import onnx

    floats = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2}
    model = onnx.load(str(path), load_external_data=False)
    sizes = {t.name: math.prod(t.dims) * floats[t.data_type] for t in model.graph.initializer
             if t.data_type in floats}
    float_b = sum(sizes.get(n.input[1], 0) for n in model.graph.node
                  if n.op_type in ("MatMul", "Gemm", "FusedMatMul") and len(n.input) > 1)
    return float_b <= 0.1 * max(int(facts.get("weight_bytes") or 0), 1)


@register_backend("ort")
class OrtBackend(Backend):
    def availability(self) -> str | None:
        try:
            _ort()
        except BackendError as exc:
            return exc.one_line()
        return None

    def compile(self, graph: Graph, out_dir: Path, *, options: OrtOptions) -> BackendArtifact:
        options = make_options("ort", options)
        facts = export_onnx(graph, out_dir / "model.onnx", opset=options.opset, external_data=options.external_data,
                            nbits_accuracy_level=options.nbits_accuracy_level,
                            qdq_form=options.qdq_form)
        # fail at compile time, not at run time (a load check: nothing worth packing)
        session = make_session(out_dir / "model.onnx", prepack=False)
        facts["providers"] = session.get_providers()
        facts["prepack"] = _prepack_is_cheap(out_dir / "model.onnx", facts)
        target = "onnxruntime-" + ("cuda" if "CUDAExecutionProvider" in facts["providers"] else "cpu")
        return BackendArtifact(facts.pop("files"), target, facts)

    def load(self, out_dir: Path, artifact: dict[str, Any]):
        # artifacts from before the "prepack" fact: a model large enough for an
        # external data file was loaded unpacked
        prepack = artifact.get("prepack", not (out_dir / "model.onnx.data").exists())
        session = make_session(out_dir / "model.onnx", prepack=prepack)
        names = [i.name for i in session.get_inputs()]

        def run(*inputs: np.ndarray) -> list[np.ndarray]:
            if len(inputs) != len(names):
                raise BackendError(f"the model takes {len(names)} inputs ({', '.join(names)}), got {len(inputs)}",
                                   "pass one --input per model input")
            feeds = {n: np.ascontiguousarray(np.asarray(x)) for n, x in zip(names, inputs)}
            return session.run(None, feeds)

        return run

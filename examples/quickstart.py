"""Python API tour: capture a model, rewrite it, compile for ONNX Runtime, run it.

    python examples/quickstart.py [OUT_DIR]
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gradrewrite as gr  # noqa: E402
from examples.models import mobilenet_v2  # noqa: E402


def main(out: Path) -> None:
    model, inputs = mobilenet_v2()
    graph = gr.capture(model, inputs, source="mobilenet_v2")
    print(f"captured {graph.node_count()} compute nodes, {graph.parameter_count():,} parameters")

    # Rewrite a copy and look at what changed.
    g = graph.clone()
    result = gr.run_pipeline(g, "fold-bn,dce")
    for rec in result.records:
        print(f"  {rec.name}: {rec.nodes_before} -> {rec.nodes_after} nodes, report {rec.report.get('fired', rec.report)}")

    # Compile (runs the pipeline again on its own copy), verify and write an artifact.
    art = gr.compile(graph, out, passes="fold-bn,dce", backend="ort", force=True)
    v = art.report["verification"]
    print(f"artifact {art.path}: max abs error {v['max_abs_error']:.2e} over {v['inputs_compared']} inputs")

    logits, = art(*inputs)
    with torch.no_grad():
        ref = model(*inputs).numpy()
    print(f"top-1 class {int(logits.argmax())} (eager: {int(ref.argmax())}), "
          f"max |diff| {float(np.abs(logits - ref).max()):.2e}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "mbv2")
